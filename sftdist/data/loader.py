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

from sftdist.data.packing import pack

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
    rng = random.Random(f"{seed}:{epoch}")
    order: list[Sample] = []
    for src, (n, count) in enumerate(zip(sizes, counts)):
        drawn: list[int] = []
        while len(drawn) < count:
            perm = list(range(n))
            rng.shuffle(perm)
            drawn += perm
        order += [(src, i) for i in drawn[:count]]
    rng.shuffle(order)
    return order


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
        self._cached: tuple[int, list[list[Sample]]] = (-1, [])
        self._epoch_lens: list[int] = []
        if not self.epoch(0):
            raise ValueError("the data mix is empty: every source has zero records or zero weight")

    def epoch(self, e: int) -> list[list[Sample]]:
        """The sequences of epoch ``e``, in training order."""
        if self._cached[0] != e:
            order = epoch_order(self.sizes, self.counts, self.seed, e)
            if self.lengths is None:
                seqs = [[s] for s in order]
            else:
                bins = pack([self.lengths[src][i] for src, i in order], self.max_length)
                seqs = [[order[j] for j in b] for b in bins]
                random.Random(f"{self.seed}:{e}:bins").shuffle(seqs)  # mix long and short bins over steps
            self._cached = (e, seqs)
        return self._cached[1]

    def _epoch_len(self, e: int) -> int:
        while len(self._epoch_lens) <= e:  # packed epochs differ in length, so lengths are computed in order
            self._epoch_lens.append(len(self.epoch(len(self._epoch_lens))))
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
            take = self.epoch(epoch)[pos:pos + self.global_batch_size - len(out)]
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
