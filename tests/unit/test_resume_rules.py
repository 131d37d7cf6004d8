"""The pure parts of resuming: stop rules, run-settings comparison, moving a rollback's later checkpoints
aside, cleaning crashed saves, and RNG state that round-trips through ``torch.load(weights_only=True)``."""

import doctest
import json
import random

import numpy as np
import pytest
import torch

import sftdist.engine.distributed
import sftdist.lifecycle.resume_check
import sftdist.lifecycle.stopping
from sftdist.config import ConfigError
from sftdist.lifecycle.checkpoint import latest_checkpoint, rng_state, set_rng_state
from sftdist.lifecycle.resume_check import check_unchanged
from sftdist.lifecycle.rundir import clean_partial_saves, retire_newer_checkpoints
from sftdist.lifecycle.stopping import StopRule


@pytest.mark.parametrize("module", [sftdist.lifecycle.stopping, sftdist.lifecycle.resume_check, sftdist.engine.distributed])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_stop_rules():
    assert StopRule().reason(step=100, steps_run=100, step_seconds=1, save_seconds=1) is None
    assert StopRule(at_step=3).reason(step=3, steps_run=1, step_seconds=1, save_seconds=0) == "train.stop_at_step=3"
    assert StopRule(at_step=3).reason(step=2, steps_run=2, step_seconds=1, save_seconds=0) is None
    minutes = StopRule(minutes=1.0, started=0.0)
    assert not minutes.out_of_time(step_seconds=10, save_seconds=5, now=40)  # 40+15 <= 60
    assert minutes.out_of_time(step_seconds=10, save_seconds=5, now=50)
    # Only the ranks' agreed flag stops a run: a rank's own clock alone never does (#1).
    assert minutes.reason(step=1, steps_run=1, step_seconds=10, save_seconds=5, now=50) is None
    assert minutes.reason(step=1, steps_run=1, out_of_time=True, step_seconds=10, save_seconds=5, now=50).startswith(
        "train.stop_after_minutes=1")


def test_changed_settings_are_named_or_allowed():
    saved = {"train.seed": 1, "train.global_batch_size": 8, "data.sources[a].weight": 1.0}
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 8 -> 16; data.sources\[a\].weight: 1.0 -> 2.0"):
        check_unchanged(saved, {**saved, "train.global_batch_size": 16, "data.sources[a].weight": 2.0},
                        checkpoint="ck", allow=False)
    assert check_unchanged(saved, {**saved, "train.seed": 2}, checkpoint="ck", allow=True) == ["train.seed: 1 -> 2"]
    assert check_unchanged(saved, {**saved, "new.key": 3}, checkpoint="ck", allow=False) == []


def fake_checkpoint(root, step):
    (root / f"step-{step}").mkdir(parents=True)
    (root / f"step-{step}" / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))


def test_rollback_moves_later_checkpoints_aside(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 6, 8):
        fake_checkpoint(root, step)
    (root / "step-8.universal").mkdir()
    (root / "latest").write_text("step-8\n")
    aside = retire_newer_checkpoints(tmp_path, 4)
    assert aside == root / "abandoned-after-step-4"
    assert sorted(p.name for p in aside.iterdir()) == ["step-6", "step-8", "step-8.universal"]
    assert latest_checkpoint(tmp_path) == root / "step-4"
    fake_checkpoint(root, 5)  # a second rollback to the same step keeps the first set too
    assert retire_newer_checkpoints(tmp_path, 4).name == "abandoned-after-step-4-2"
    assert retire_newer_checkpoints(tmp_path, 4) is None  # nothing newer: nothing moved
    # Resuming from another directory's step 2: this directory's later checkpoints go, and `latest` with them.
    assert retire_newer_checkpoints(tmp_path, 2) is not None and not (root / "latest").exists()


def test_clean_partial_saves(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    for name in ("step-3.tmp", "step-2.universal.tmp"):
        (root / name).mkdir()
    (root / "latest.tmp").write_text("step-3\n")
    (tmp_path / "final.tmp").mkdir()
    removed = clean_partial_saves(tmp_path)
    assert sorted(p.name for p in removed) == ["final.tmp", "latest.tmp", "step-2.universal.tmp", "step-3.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["step-2"] and not (tmp_path / "final.tmp").exists()


def test_rng_state_round_trips_with_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
