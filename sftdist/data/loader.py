"""Deterministic sample order: a weighted mix per epoch, optionally packed, cut into global batches and
sharded by rank.

The order is a pure function of (source sizes, mix counts, seed), so step ``s`` always sees the same
samples whatever the number of ranks or micro-batches: this is what makes 1x4, 2x2 and 1x1 runs
equivalent, and what lets a resumed run continue exactly where it stopped.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import numpy as np

from sftdist.data.packing import pack_bins, placement_order

Sample = tuple[int, int]  # (source, record)


def mix_counts(sizes: list[int], weights: list[float], *, mix_by: str = "samples",
               mean_supervised: Optional[list[float]] = None) -> list[int]:
    """Samples drawn from each source per epoch.

    An epoch is as large as the data: ``sum(sizes)`` samples (``mix_by=samples``), or as many supervised
    tokens as the data holds (``mix_by=tokens``). Each source gets its weight's share of that, so with
    tokens, weights 1:1 put half the trained tokens on each source however long its samples are.

    Example:
        >>> mix_counts([100, 100], [1, 1], mix_by="samples")
        [100, 100]
        >>> mix_counts([100, 100], [1, 1], mix_by="tokens", mean_supervised=[10.0, 40.0])  # 2500 tokens each
        [250, 62]
    """
    active = [w if n else 0.0 for n, w in zip(sizes, weights)]
    wsum = sum(active)
    if wsum <= 0:
        return [0] * len(sizes)
    if mix_by == "samples":
        return [round(sum(sizes) * w / wsum) for w in active]
    total_tokens = sum(n * m for n, m in zip(sizes, mean_supervised))
    return [round(total_tokens * w / wsum / m) if w else 0 for w, m in zip(active, mean_supervised)]


def epoch_order(sizes: list[int], counts: list[int], seed: int, epoch: int) -> list[Sample]:
    """One epoch of ``(source, record)`` pairs: ``counts[i]`` draws from source ``i``, shuffled together.

    Draws come from reshuffled passes over a source's records, so a small source is repeated and a large
    one subsampled, and no record repeats before every record of its source has been drawn.

    Example:
        >>> epoch_order([2, 2], [4, 0], seed=0, epoch=0)   # all four from source 0, each record twice
        [(0, 1), (0, 1), (0, 0), (0, 0)]
    """
    src, idx = epoch_arrays(sizes, counts, seed, epoch)
    return list(zip(src.tolist(), idx.tolist()))


def epoch_arrays(sizes: list[int], counts: list[int], seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """``epoch_order`` as two arrays (sources, records), 12 bytes a sample where a list of tuples takes ~100.

    ``random.shuffle`` swaps by position only, so shuffling a list of positions and gathering gives exactly
    the order of shuffling the pairs themselves (the same draws from the same RNG).
    """
    rng = random.Random(f"{seed}:{epoch}")
    srcs, idxs = [], []
    for src, (n, count) in enumerate(zip(sizes, counts)):
        passes, drawn = [], 0
        while drawn < count:
            perm = list(range(n))
            rng.shuffle(perm)
            passes.append(np.array(perm, dtype=np.int64))
            drawn += n
        srcs.append(np.full(count, src, dtype=np.int32))
        idxs.append(np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64))
    positions = list(range(sum(counts)))
    rng.shuffle(positions)
    order = np.array(positions, dtype=np.int64)
    return np.concatenate(srcs)[order], np.concatenate(idxs)[order]


class Epoch:
    """One epoch's sequences, compact: the samples of every sequence in order (``src``, ``idx``) and where each
    sequence starts (``starts``, one more than there are sequences)."""

    def __init__(self, src: np.ndarray, idx: np.ndarray, starts: np.ndarray):
        self.src, self.idx, self.starts = src, idx, starts

    def __len__(self) -> int:
        return len(self.starts) - 1

    def sequences(self, lo: int, hi: int) -> list[list[Sample]]:
        """Sequences ``lo .. hi - 1`` as lists of ``(source, record)``."""
        hi = min(hi, len(self))
        if lo >= hi:
            return []
        a, b = int(self.starts[lo]), int(self.starts[hi])
        pairs = list(zip(self.src[a:b].tolist(), self.idx[a:b].tolist()))
        cuts = (self.starts[lo:hi + 1] - a).tolist()
        return [pairs[cuts[k]:cuts[k + 1]] for k in range(hi - lo)]


def packed_epoch(src: np.ndarray, idx: np.ndarray, lengths: list[np.ndarray], max_length: int, shuffle: random.Random) -> Epoch:
    """The samples ``(src, idx)`` packed best-fit-decreasing into rows, the rows shuffled by ``shuffle`` (which
    draws as ``shuffle.shuffle`` of the list of rows would)."""
    lens = np.zeros(len(src), dtype=np.int64)
    for s, source_lengths in enumerate(lengths):
        mine = src == s
        lens[mine] = np.asarray(source_lengths)[idx[mine]]
    bin_of = pack_bins(lens, max_length)
    placed = placement_order(lens)
    flat = placed[np.argsort(bin_of[placed], kind="stable")]  # each bin's samples, in the order they went in
    sizes = np.bincount(bin_of, minlength=int(bin_of.max()) + 1 if len(bin_of) else 0)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = list(range(len(sizes)))
    shuffle.shuffle(rows)  # mix long and short bins over steps
    rows = np.array(rows, dtype=np.int64)
    new_sizes = sizes[rows]
    new_starts = np.concatenate([[0], np.cumsum(new_sizes)])
    at = np.repeat(starts[rows] - new_starts[:-1], new_sizes) + np.arange(len(flat))
    order = flat[at]
    return Epoch(src[order], idx[order], new_starts)


class SampleSchedule:
    """The infinite stream of epochs, addressed by optimizer step.

    A *sequence* is what fills one row of a batch: one sample, or with packing several samples whose
    lengths sum to at most ``max_length``. ``global_batch_size`` counts sequences.

    Args:
        sizes: Records per source.
        counts: Samples drawn per source per epoch (``mix_counts``).
        seed: Shuffle seed.
        global_batch_size: Sequences per optimizer step over all ranks.
        lengths: Per source, the token length of every record; given together with ``max_length`` it
            turns packing on.
        max_length: Row length for packing.
    """

    def __init__(self, sizes: list[int], counts: list[int], seed: int, global_batch_size: int, *,
                 lengths: Optional[list[list[int]]] = None, max_length: Optional[int] = None):
        self.sizes, self.counts, self.seed = sizes, counts, seed
        self.global_batch_size = global_batch_size
        self.lengths, self.max_length = lengths, max_length
        self._cached: tuple[int, Optional[Epoch]] = (-1, None)
        self._epoch_lens: list[int] = []
        if not len(self.compact(0)):
            raise ValueError("the data mix is empty: every source has zero records or zero weight")

    def epoch(self, e: int) -> list[list[Sample]]:
        """The sequences of epoch ``e``, in training order (a list built on each call: for tests and small
        sets; the schedule itself keeps the compact ``Epoch``)."""
        return self.compact(e).sequences(0, len(self.compact(e)))

    def compact(self, e: int) -> Epoch:
        """Epoch ``e`` as an ``Epoch`` (the last one asked for is kept)."""
        if self._cached[0] != e:
            self._cached = (-1, None)  # (the old epoch goes before the new one is built)
            src, idx = epoch_arrays(self.sizes, self.counts, self.seed, e)
            if self.lengths is None:
                epoch = Epoch(src, idx, np.arange(len(src) + 1, dtype=np.int64))
            else:
                epoch = packed_epoch(src, idx, self.lengths, self.max_length, random.Random(f"{self.seed}:{e}:bins"))
            self._cached = (e, epoch)
        return self._cached[1]

    def _epoch_len(self, e: int) -> int:
        while len(self._epoch_lens) <= e:  # packed epochs differ in length, so lengths are computed in order
            self._epoch_lens.append(len(self.compact(len(self._epoch_lens))))
        return self._epoch_lens[e]

    @property
    def epoch_len(self) -> int:
        """Sequences in the first epoch."""
        return self._epoch_len(0)

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps that cover ``epochs`` passes (at least one)."""
        return max(1, math.floor(epochs * self.epoch_len / self.global_batch_size))

    def global_batch(self, step: int) -> list[list[Sample]]:
        """The ``global_batch_size`` sequences of optimizer step ``step`` (0-based)."""
        pos, epoch = step * self.global_batch_size, 0
        while pos >= self._epoch_len(epoch):
            pos -= self._epoch_len(epoch)
            epoch += 1
        out: list[list[Sample]] = []
        while len(out) < self.global_batch_size:
            take = self.compact(epoch).sequences(pos, pos + self.global_batch_size - len(out))
            out += take
            pos, epoch = 0, epoch + 1
        return out

    def micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[list[list[Sample]]]:
        """This rank's micro-batches for ``step``: a contiguous 1/world slice, cut into micro-batches.

        Example: global batch [a b c d e f g h], world 2, micro 2 -> rank 0: [[a b], [c d]]; rank 1: [[e f], [g h]].
        """
        batch = self.global_batch(step)
        per_rank = len(batch) // world
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
