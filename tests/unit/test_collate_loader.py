"""Collation with per-example shifted targets, and the deterministic, rank-independent sample schedule."""

from collections import Counter

import pytest
import torch

from sftdist.data.collate import collate, shift_labels
from sftdist.data.loader import SampleSchedule, epoch_order, mix_counts


def test_collate_pads_and_shifts_per_example():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "source": 1},
                     {"input_ids": [8, 9], "labels": [8, 9]}], pad_id=0)
    assert {k: v.tolist() for k, v in batch.items()} == {
        "input_ids": [[5, 6, 7], [8, 9, 0]],
        "attention_mask": [[1, 1, 1], [1, 1, 0]],
        "position_ids": [[0, 1, 2], [0, 1, 0]],
        "targets": [[6, 7, -100], [9, -100, -100]],
        "token_source": [[1, 1, 1], [0, 0, -1]],
        "sample_index": [[0, 0, 0], [1, 1, -1]],
    }
    assert all(v.dtype == torch.long for v in batch.values())


def test_shift_labels():
    assert shift_labels([1, 2, 3]) == [2, 3, -100]


def counts(sizes, weights, **kw):
    return mix_counts(sizes, weights, **kw)


def test_epoch_order_is_deterministic_and_weighted():
    c = counts([100, 50], [3.0, 1.0])
    assert c == [round(150 * 0.75), round(150 * 0.25)]
    a = epoch_order([100, 50], c, seed=1, epoch=0)
    assert a == epoch_order([100, 50], c, seed=1, epoch=0)
    assert a != epoch_order([100, 50], c, seed=1, epoch=1)
    assert Counter(src for src, _ in a) == {0: c[0], 1: c[1]}
    # Source 1 has 50 records but 38 draws: no record is drawn twice before every record is drawn once.
    assert max(Counter(i for s, i in a if s == 1).values()) == 1


def test_small_source_is_repeated_to_its_share():
    order = epoch_order([10, 90], counts([10, 90], [1.0, 1.0]), seed=0, epoch=0)
    per_record = Counter(i for s, i in order if s == 0)
    assert sum(per_record.values()) == 50 and set(per_record.values()) == {5}


def test_mix_by_tokens_balances_supervised_tokens_not_samples():
    # Source 0: short replies (10 supervised tokens), source 1: long documents (40); weights 1:1.
    c = counts([100, 100], [1.0, 1.0], mix_by="tokens", mean_supervised=[10.0, 40.0])
    assert c[0] * 10 == pytest.approx(c[1] * 40, rel=0.02)
    assert counts([100, 0], [1.0, 1.0]) == [100, 0]  # an empty source gets nothing


def schedule(sizes, weights, gbs, **kw):
    return SampleSchedule(sizes, counts(sizes, weights), seed=3, global_batch_size=gbs, **kw)


@pytest.mark.parametrize("world,micro", [(1, 8), (1, 2), (2, 2), (4, 1)])
def test_rank_slices_reassemble_the_global_batch(world, micro):
    sched = schedule([30, 7], [1.0, 1.0], 8)
    for step in (0, 3, 4, 9):  # steps 4 and 9 straddle epoch boundaries (epoch = 37 samples)
        parts = [s for r in range(world) for mb in sched.micro_batches(step, r, world, micro) for s in mb]
        assert parts == sched.global_batch(step)
        assert all(len(mb) == micro for r in range(world) for mb in sched.micro_batches(step, r, world, micro))


def test_global_batches_walk_through_epochs_in_order():
    sched = schedule([30, 7], [1.0, 1.0], 8)
    stream = [seq for step in range(10) for seq in sched.global_batch(step)]
    assert stream == (sched.epoch(0) + sched.epoch(1) + sched.epoch(2))[:80]


def test_packed_schedule_respects_max_length_and_keeps_the_token_ratio():
    import random

    rng = random.Random(0)
    lengths = [[rng.randint(5, 40) for _ in range(300)], [rng.randint(50, 120) for _ in range(300)]]
    mean = [sum(x) / len(x) for x in lengths]  # text source: every token supervised
    c = counts([300, 300], [1.0, 1.0], mix_by="tokens", mean_supervised=mean)
    sched = SampleSchedule([300, 300], c, seed=0, global_batch_size=4, lengths=lengths, max_length=128)
    tokens = [0, 0]
    for seq in sched.epoch(0):
        assert sum(lengths[s][i] for s, i in seq) <= 128
        for s, i in seq:
            tokens[s] += lengths[s][i]
    assert tokens[0] / sum(tokens) == pytest.approx(0.5, abs=0.03)  # the 1:1 token ratio survives packing
    assert sum(len(seq) for seq in sched.epoch(0)) == sum(c)  # every drawn sample is packed exactly once
    assert len(sched.epoch(0)) < sum(c) / 2  # and rows hold several samples


def test_steps_for_epochs():
    sched = schedule([30, 10], [1.0, 1.0], 8)
    assert sched.steps_for_epochs(1.0) == 5 and sched.steps_for_epochs(2.5) == 12
    assert sched.steps_for_epochs(0.01) == 1


def test_empty_mix_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        schedule([5], [0.0], 2)
