"""Deterministic sample order: a weighted mix per epoch, cut into global batches, sharded by rank.

The order is a pure function of (source sizes, weights, seed), so step ``s`` always sees the same samples
whatever the number of ranks or micro-batches: this is what makes 1x4, 2x2 and 1x1 runs equivalent.
"""

from __future__ import annotations

import math
import random


def epoch_order(sizes: list[int], weights: list[float], seed: int, epoch: int) -> list[tuple[int, int]]:
    """One epoch of ``(source, record)`` pairs, each source drawn in proportion to its weight.

    An epoch has ``sum(sizes)`` samples; source ``i`` gets ``round(total * w_i / sum(w))`` of them, taken
    from reshuffled passes over its records (so a small source is repeated, a large one subsampled).

    Example:
        >>> epoch_order([2, 2], [1.0, 0.0], seed=0, epoch=0)   # all four from source 0, each record twice
        [(0, 1), (0, 1), (0, 0), (0, 0)]
    """
    total, wsum = sum(sizes), sum(w for n, w in zip(sizes, weights) if n)
    if wsum <= 0:
        return []
    counts = [round(total * w / wsum) if n else 0 for n, w in zip(sizes, weights)]
    rng = random.Random(f"{seed}:{epoch}")
    order: list[tuple[int, int]] = []
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

    Args:
        sizes: Records per source.
        weights: Mixing weight per source.
        seed: Shuffle seed.
        global_batch_size: Samples per optimizer step over all ranks.
    """

    def __init__(self, sizes: list[int], weights: list[float], seed: int, global_batch_size: int):
        self.sizes, self.weights, self.seed = sizes, weights, seed
        self.global_batch_size = global_batch_size
        self._epochs: dict[int, list[tuple[int, int]]] = {}
        self.epoch_len = len(self._epoch(0))
        if self.epoch_len == 0:
            raise ValueError("the data mix is empty: every source has zero records or zero weight")

    def _epoch(self, e: int) -> list[tuple[int, int]]:
        if e not in self._epochs:
            self._epochs = {e: epoch_order(self.sizes, self.weights, self.seed, e)}  # keep one epoch cached
        return self._epochs[e]

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps that cover ``epochs`` passes (at least one)."""
        return max(1, math.floor(epochs * self.epoch_len / self.global_batch_size))

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """The ``global_batch_size`` samples of optimizer step ``step`` (0-based)."""
        start = step * self.global_batch_size
        out = []
        for pos in range(start, start + self.global_batch_size):
            out.append(self._epoch(pos // self.epoch_len)[pos % self.epoch_len])
        return out

    def micro_batches(self, step: int, rank: int, world: int, micro_batch_size: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches for ``step``: a contiguous 1/world slice, cut into micro-batches.

        Example: global batch [a b c d e f g h], world 2, micro 2 -> rank 0: [[a b], [c d]]; rank 1: [[e f], [g h]].
        """
        batch = self.global_batch(step)
        per_rank = len(batch) // world
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
