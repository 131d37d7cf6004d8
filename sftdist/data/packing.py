"""Best-fit-decreasing bin packing of example lengths into sequences of at most ``max_len`` tokens."""

from __future__ import annotations

from heapq import heappop, heappush


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
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_len:
            raise ValueError(f"example {i} has length {n}, outside [1, max_len={max_len}]")
    tree = [0] * (max_len + 1)  # Fenwick tree: open bins per remaining capacity 1..max_len
    by_room: list[list[int]] = [[] for _ in range(max_len + 1)]  # min-heaps of bin ids per remaining capacity
    top = 1 << (max_len.bit_length() - 1)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):  # reverse keeps ties stable
        n = lengths[i]
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
            b, room = len(bins), max_len
            bins.append([i])
        else:
            b = heappop(by_room[room])
            bins[b].append(i)
            j = room
            while j <= max_len:
                tree[j] -= 1
                j += j & -j
        room -= n
        if room:
            heappush(by_room[room], b)
            j = room
            while j <= max_len:
                tree[j] += 1
                j += j & -j
    return bins
