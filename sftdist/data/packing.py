"""Best-fit-decreasing bin packing of example lengths into sequences of at most ``max_len`` tokens."""

from __future__ import annotations

from heapq import heappop, heappush

import numpy as np


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Group example indices into bins whose lengths sum to at most ``max_len`` (best fit decreasing).

    Items are placed longest first (equal lengths in index order). Each goes into the open bin with the
    smallest remaining room that still fits it (the earliest-created such bin on a tie), or opens a new bin.
    The result is a pure function of the inputs.

    Runs in O(n log n + n log max_len): a Fenwick tree over remaining capacities counts the open bins of
    each capacity, so the smallest capacity >= a length is one tree descent, and a heap per capacity holds
    the bins that have it. Full bins leave the tree, since nothing fits them any more.

    Example (max_len = 8)::

        lengths = [3, 5, 4, 2, 4]        placed as idx 1, 2, 4, 0, 3 (lengths 5, 4, 4, 3, 2)
        idx 1 -> new bin 0               bin 0 = [1]      room 3
        idx 2 -> new bin 1               bin 1 = [2]      room 4
        idx 4 -> bin 1 (room 4, best)    bin 1 = [2, 4]   room 0
        idx 0 -> bin 0 (room 3, best)    bin 0 = [1, 0]   room 0
        idx 3 -> new bin 2               bin 2 = [3]      room 6

        >>> pack([3, 5, 4, 2, 4], max_len=8)
        [[1, 0], [2, 4], [3]]

    Args:
        lengths: Token count of each example; ``lengths[i]`` belongs to example ``i``.
        max_len: Capacity of one bin (the packed sequence length).

    Returns:
        Bins in creation order, each the list of its example indices in placement order.

    Raises:
        ValueError: if ``max_len < 1``, or naming the first example whose length is not in ``[1, max_len]``.
    """
    bin_of = pack_bins(np.asarray(lengths, dtype=np.int64), max_len)
    bins: list[list[int]] = [[] for _ in range(int(bin_of.max()) + 1 if len(bin_of) else 0)]
    for i in placement_order(np.asarray(lengths, dtype=np.int64)).tolist():
        bins[bin_of[i]].append(i)
    return bins


def placement_order(lengths: np.ndarray) -> np.ndarray:
    """The order ``pack`` places items in: longest first, equal lengths in index order.

    Example:
        >>> placement_order(np.array([3, 5, 4, 2, 4])).tolist()
        [1, 2, 4, 0, 3]
    """
    return np.argsort(-lengths, kind="stable")


CHUNK = 1 << 16  # items turned into Python ints at a time


def pack_bins(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """``pack`` as one array: the bin of each item (bins numbered in creation order). Memory stays within a
    few arrays of the items' size (no list per bin, no Python int per item held at once), so a
    million-sample epoch packs in ~30 MB more on every rank, where the lists took ~300 MB.

    Example:
        >>> pack_bins(np.array([3, 5, 4, 2, 4]), max_len=8).tolist()   # the bins of pack's example
        [0, 0, 1, 2, 1]

    Raises:
        ValueError: as ``pack``.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    bad = np.flatnonzero((lengths < 1) | (lengths > max_len))
    if len(bad):
        raise ValueError(f"example {int(bad[0])} has length {int(lengths[bad[0]])}, outside [1, max_len={max_len}]")
    tree = [0] * (max_len + 1)  # Fenwick tree: open bins per remaining capacity 1..max_len
    by_room: list[list[int]] = [[] for _ in range(max_len + 1)]  # min-heaps of bin ids per remaining capacity
    top = 1 << (max_len.bit_length() - 1)
    bin_of = np.empty(len(lengths), dtype=np.int32)
    bins = 0
    order = placement_order(lengths)
    for at in range(0, len(order), CHUNK):
        chunk = order[at:at + CHUNK]
        for i, n in zip(chunk.tolist(), lengths[chunk].tolist()):
            # The smallest capacity >= n is the (bins with capacity < n) + 1-th open bin in capacity order.
            k, j = 1, n - 1
            while j:
                k += tree[j]
                j &= j - 1
            room, step = 0, top
            while step:
                if room + step <= max_len and tree[room + step] < k:
                    room += step
                    k -= tree[room]
                step >>= 1
            room += 1
            if room > max_len:
                b, room = bins, max_len
                bins += 1
            else:
                b = heappop(by_room[room])
                j = room
                while j <= max_len:
                    tree[j] -= 1
                    j += j & -j
            bin_of[i] = b
            room -= n
            if room:
                heappush(by_room[room], b)
                j = room
                while j <= max_len:
                    tree[j] += 1
                    j += j & -j
    return bin_of
