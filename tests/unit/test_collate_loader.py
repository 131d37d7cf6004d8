"""Collation with per-example shifted targets, and the deterministic, rank-independent sample schedule."""

from collections import Counter

import pytest
import torch

from sftdist.data.collate import collate, shift_labels
from sftdist.data.loader import SampleSchedule, epoch_order


def test_collate_pads_and_shifts_per_example():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "source": 1},
                     {"input_ids": [8, 9], "labels": [8, 9]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["targets"].tolist() == [[6, 7, -100], [9, -100, -100]]
    assert batch["source"].tolist() == [1, 0]


def test_shift_labels():
    assert shift_labels([1, 2, 3]) == [2, 3, -100]


def test_epoch_order_is_deterministic_and_weighted():
    a = epoch_order([100, 50], [3.0, 1.0], seed=1, epoch=0)
    assert a == epoch_order([100, 50], [3.0, 1.0], seed=1, epoch=0)
    assert a != epoch_order([100, 50], [3.0, 1.0], seed=1, epoch=1)
    counts = Counter(src for src, _ in a)
    assert counts == {0: round(150 * 0.75), 1: round(150 * 0.25)}
    # Source 1 has 50 records but 38 draws: no record is drawn twice before every record is drawn once.
    assert max(Counter(i for s, i in a if s == 1).values()) == 1


def test_small_source_is_repeated_to_its_share():
    order = epoch_order([10, 90], [1.0, 1.0], seed=0, epoch=0)
    per_record = Counter(i for s, i in order if s == 0)
    assert sum(per_record.values()) == 50 and set(per_record.values()) == {5}


@pytest.mark.parametrize("world,micro", [(1, 8), (1, 2), (2, 2), (4, 1)])
def test_rank_slices_reassemble_the_global_batch(world, micro):
    sched = SampleSchedule([30, 7], [1.0, 1.0], seed=3, global_batch_size=8)
    for step in (0, 3, 4, 9):  # steps 4 and 9 straddle epoch boundaries (epoch = 37 samples)
        parts = [s for r in range(world) for mb in sched.micro_batches(step, r, world, micro) for s in mb]
        assert parts == sched.global_batch(step)
        assert all(len(mb) == micro for r in range(world) for mb in sched.micro_batches(step, r, world, micro))


def test_steps_for_epochs():
    sched = SampleSchedule([30, 10], [1.0, 1.0], seed=0, global_batch_size=8)
    assert sched.steps_for_epochs(1.0) == 5 and sched.steps_for_epochs(2.5) == 12
    assert sched.steps_for_epochs(0.01) == 1


def test_empty_mix_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        SampleSchedule([5], [0.0], seed=0, global_batch_size=2)
