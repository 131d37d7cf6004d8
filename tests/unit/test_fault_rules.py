"""The pure parts of fault handling: non-finite steps (nonfinite.py), which failed writes count as a full
disk, where `latest` points after a crash, and the exit status of a stop signal."""

import doctest
import errno
import json
import os
import signal

import pytest

import sftdist.lifecycle.nonfinite
import sftdist.lifecycle.stopping as preemption
from sftdist.lifecycle.checkpoint import latest_checkpoint, publish, write_failure
from sftdist.lifecycle.nonfinite import NonFiniteGuard

NAN, INF = float("nan"), float("inf")


def test_docstring_examples():
    result = doctest.testmod(sftdist.lifecycle.nonfinite)
    assert result.attempted > 0 and result.failed == 0


def test_guard_stops_or_skips_and_counts_only_steps_in_a_row():
    stop = NonFiniteGuard("stop")
    assert stop.check(step=1, loss=2.0, grad_norm=1.0, source_losses={"a": 2.0}, update_applied=True) is None
    assert stop.check(step=2, loss=NAN, grad_norm=NAN, source_losses={"a": NAN, "b": 1.0, "c": None},
                      update_applied=False) == "step 2: loss nan (source a), grad_norm nan (train.on_nonfinite=stop)"
    skip = NonFiniteGuard("skip", max_consecutive=2)
    finite = dict(loss=2.0, grad_norm=1.0, source_losses={}, update_applied=True)
    bad = dict(loss=INF, grad_norm=INF, source_losses={"a": INF, "b": INF}, update_applied=False)
    assert [skip.check(step=s, **bad) for s in (1, 2)] == ["skipped", "skipped"]
    assert skip.check(step=3, **finite) is None  # a finite step resets the count
    assert [skip.check(step=s, **bad) for s in (4, 5)] == ["skipped", "skipped"]
    assert skip.check(step=6, **bad).startswith("step 6: loss inf (sources a, b), grad_norm inf; 3 non-finite")
    # An update DeepSpeed applied cannot be taken back: stop even in skip mode.
    applied = NonFiniteGuard("skip").check(step=7, **{**bad, "update_applied": True})
    assert applied.startswith("step 7:") and "cannot be skipped" in applied


def test_write_failures_are_told_from_bugs(tmp_path):
    assert write_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp_path) == "No space left on device"
    # torch.save's zip writer on a full disk (measured on a full tmpfs), with the disk not full any more:
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2954624 vs 2954512")
    torch_error.__context__ = RuntimeError("basic_ios::clear: iostream error")
    assert write_failure(torch_error, tmp_path) == "basic_ios::clear: iostream error"
    assert write_failure(RuntimeError("size mismatch for lm_head.weight"), tmp_path) is None  # a bug: re-raised
    assert write_failure(KeyError("module"), tmp_path) is None


def fake_checkpoint(root, name, step):
    (root / name).mkdir(parents=True)
    (root / name / "trainer_state.json").write_text(json.dumps({"step": step}))


def test_latest_without_a_pointer_is_the_newest_complete_step(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None
    fake_checkpoint(root, "step-1", 1)
    fake_checkpoint(root, "step-3", 3)
    (root / "step-4.tmp").mkdir()
    (root / "step-5").mkdir()  # incomplete: no trainer_state.json
    assert latest_checkpoint(tmp_path) == root / "step-3"  # killed before its first `latest` was written
    (root / "abandoned-after-step-2").mkdir()  # retire_newer_checkpoints removed `latest` on purpose
    assert latest_checkpoint(tmp_path) is None


def test_latest_naming_a_missing_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    """`latest` names a step deleted by hand: the older complete checkpoints still count, so neither a resume
    nor train.overwrite=true (which deletes a run that cannot resume) loses them (#17)."""
    from sftdist.lifecycle.rundir import resolve_resume

    root = tmp_path / "checkpoints"
    fake_checkpoint(root, "step-2", 2)
    fake_checkpoint(root, "step-4", 4)
    (root / "latest").write_text("step-6\n")
    assert latest_checkpoint(tmp_path) == root / "step-4"
    (root / "step-6").mkdir()  # there, but incomplete
    assert latest_checkpoint(tmp_path) == root / "step-4"
    (tmp_path / "metrics.jsonl").write_text('{"step": 6}\n')
    assert resolve_resume(tmp_path, resume="auto", overwrite=True) == root / "step-4"


def test_publish_never_removes_what_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, "step-2", 2)
    (root / "latest").write_text("step-2\n")
    fake_checkpoint(root, "step-2.tmp", 2)
    (root / "step-2.tmp" / "new").touch()
    publish(root, "step-2")  # the same step again: `latest` keeps its complete copy
    assert not (root / "step-2.tmp").exists() and not (root / "step-2" / "new").exists()
    fake_checkpoint(root, "step-3", 3)  # a leftover `latest` does not name
    fake_checkpoint(root, "step-3.tmp", 3)
    (root / "step-3.tmp" / "new").touch()
    publish(root, "step-3")
    assert (root / "step-3" / "new").exists() and (root / "latest").read_text() == "step-3\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-3"]


def test_stop_signal_exit_status(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert preemption.requeue_after("SIGUSR1") == (False, None)  # outside SLURM nothing is requeued
    preemption.install_stop_handlers()
    try:
        assert preemption.exit_code() == 0
        assert preemption.record_stop(requeued=False) == preemption.RESUMABLE_EXIT == 75
        assert preemption.exit_code() == 75
        assert preemption.record_stop(requeued=True) == 0  # SLURM reruns the job: no failure in its record
        # The same signal twice within the window (process group + torchrun) is one request: no kill.
        preemption._handler(signal.SIGTERM, None)
        preemption._handler(signal.SIGTERM, None)
        assert preemption.received() == "SIGTERM"
    finally:
        for signum in preemption.STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        preemption._received = None
        preemption._exit_code = 0


def test_a_submitit_job_takes_over_sigusr2(monkeypatch):
    """In a submitit sweep point sftdist catches submitit's SIGUSR2 itself (submitit's handler would exit
    mid-step) and asks for a requeue after it; outside submitit SIGUSR2 stays as it was."""
    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    try:
        preemption.install_stop_handlers()
        assert signal.getsignal(signal.SIGUSR2) is before
        monkeypatch.setenv("SUBMITIT_FOLDER", "/tmp/sweep/.submitit/%j")
        preemption.install_stop_handlers()
        assert signal.getsignal(signal.SIGUSR2) is preemption._handler
        preemption._handler(signal.SIGUSR2, None)
        assert preemption.received() == "SIGUSR2"
        summed = [a + b for a, b in zip(preemption.signal_flags("SIGUSR2"), preemption.signal_flags(None))]
        assert preemption.agreed_signal(summed) == "SIGUSR2"  # one rank got it: all act on it
    finally:
        for signum in (*preemption.STOP_SIGNALS, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, before)
        preemption._received = None
        preemption._exit_code = 0


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_config_keys(mode):
    from sftdist.config import ConfigError, TrainConfig

    assert TrainConfig(on_nonfinite=mode).on_nonfinite == mode
    with pytest.raises(ConfigError, match="train.on_nonfinite='maybe'"):
        TrainConfig(on_nonfinite="maybe")
    with pytest.raises(ConfigError, match="train.max_consecutive_nonfinite"):
        TrainConfig(max_consecutive_nonfinite=0)
