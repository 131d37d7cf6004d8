"""Faults in the training loop and checkpoint saving, through the real CLI in subprocesses:

- a process killed at each point of a checkpoint save leaves ``latest`` naming the previous complete
  checkpoint, and the same command resumes from it to the losses of an uninterrupted run;
- a full disk (a failing writer, and a real full tmpfs where this may mount one) ends the run with one
  line and exit 1, removes the partial directory, and leaves the previous checkpoint resumable; the same
  for ``final/`` and the merged LoRA model;
- SIGTERM stops the run after the step with a checkpoint and exit status 75 (``preemption.RESUMABLE_EXIT``),
  and the same command resumes to the losses of an uninterrupted run (1 process and 2 ranks);
- a NaN or exploding step stops the run (``train.on_nonfinite=stop``) naming the step and the source, with
  nothing saved from that state, or is skipped (``skip``), up to ``train.max_consecutive_nonfinite``.

``WRAPPER`` runs ``sftdist.train.main()`` with one fault planted by patching sftdist or library functions
(``SFTDIST_TEST_FAULT``), so the product code carries no test hooks. A real trigger is used where one
exists: a huge learning rate makes the gradient norm infinite from step 2 on.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from sftdist.lifecycle.checkpoint import latest_checkpoint
from tests.conftest import FAST, read_metrics, run_cmd, start_cmd, train_single, train_torchrun

WRAPPER = r'''
import errno, os, signal
import torch
import sftdist.lifecycle.checkpoint as ckpt
import sftdist.engine.forward as forward
import sftdist.train as train

fault, _, where = os.environ.get("SFTDIST_TEST_FAULT", "").partition(":")
at_step = int(os.environ.get("SFTDIST_TEST_STEP", "0"))
saving = [None]  # the step save_checkpoint is writing

def wrap(module, name, before=None, after=None):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        before and before(*args, **kwargs)
        result = real(*args, **kwargs)
        after and after(*args, **kwargs)
        return result
    setattr(module, name, wrapper)

def die(*args, **kwargs):
    if saving[0] == at_step:
        os.kill(os.getpid(), signal.SIGKILL)

wrap(ckpt, "save_checkpoint", before=lambda engine, run_dir, step, **kw: saving.__setitem__(0, step))
if fault == "kill":  # SIGKILL at one point of the save of step at_step
    name, when = {"before_rng": ("rng_state", "before"), "before_state": ("write_trainer_state", "before"),
                  "before_rename": ("write_trainer_state", "after"), "before_latest": ("point_latest", "before")}[where]
    wrap(ckpt, name, **{when: die})
elif fault == "enospc" and where == "checkpoint":  # the optimizer shard of step at_step hits a full disk
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if saving[0] == at_step and str(f).endswith("optim_states.pt"):
            open(f, "wb").write(b"\0" * 4096)  # what a full disk leaves: a partial file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif fault == "enospc":  # safetensors hits a full disk writing final/ or final_merged/ (where)
    import transformers.modeling_utils as modeling
    from safetensors import SafetensorError
    real_save_file = modeling.safe_save_file
    def save_file(tensors, filename, *args, **kwargs):
        if os.path.basename(os.path.dirname(filename)) == where + ".tmp":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)
    modeling.safe_save_file = save_file
elif fault == "nan":  # the token losses of source `where` are NaN in the training step at_step
    real_losses = forward.LossHead.losses
    def losses(self, engine, batch):
        token_losses, supervised = real_losses(self, engine, batch)
        if engine.training and torch.is_grad_enabled() and engine.global_steps + 1 == at_step:
            poisoned = forward.at_supervised(batch["token_source"], supervised) == int(where)
            token_losses = torch.where(poisoned, token_losses * float("nan"), token_losses)
        return token_losses, supervised
    forward.LossHead.losses = losses
elif fault == "usr1_in_eval":  # SIGUSR1 arrives while the eval after step at_step runs
    import sftdist.observe.evaluation as evaluation
    real_run = evaluation.EvalPlan.run
    def run(self, engine, data, head, *, step, metrics):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_run(self, engine, data, head, step=step, metrics=metrics)
    evaluation.EvalPlan.run = run
train.main()
'''

KILL_RUN = [*FAST, "train.max_steps=4", "train.lr=1e-2", "train.save_every=1"]
LONG_RUN = [*FAST, "train.max_steps=24", "train.lr=1e-2"]  # long enough to signal mid-run
EXPLODING = ["train.lr=1e6", "train.grad_clip=0"]  # grad_norm is inf from step 2 on (weights blown up at step 1)


def with_fault(fault: str, step: int, args: list[str]) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-c", WRAPPER, *args], check=False,
                   env={"SFTDIST_TEST_FAULT": fault, "SFTDIST_TEST_STEP": str(step)})


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def latest_name(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def saved_step(checkpoint) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["step"]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The console error: one ``sftdist: error:`` line and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sftdist: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, by name: ``kill`` (KILL_RUN), ``long`` (LONG_RUN, 1 process), ``long2`` (2 ranks)."""
    root, runs = tmp_path_factory.mktemp("reference"), {}

    def get(name):
        if name not in runs:
            args = {"kill": KILL_RUN, "long": LONG_RUN, "long2": LONG_RUN}[name] + [f"output_dir={root / name}"]
            train_torchrun(2, args) if name == "long2" else train_single(args)
            runs[name] = losses(root / name)
        return runs[name]

    return get


# point -> (step killed during its save, what the kill leaves in checkpoints/)
KILL_POINTS = {
    "before_rng": (2, "step-2.tmp"),  # DeepSpeed's shards written, not the RNG file
    "before_state": (2, "step-2.tmp"),  # RNG written, not trainer_state.json
    "before_rename": (2, "step-2.tmp"),  # step-2.tmp complete, not yet renamed
    "before_latest": (2, "step-2"),  # renamed, `latest` not yet moved
    "first_save_before_latest": (1, "step-1"),  # as above for the run's first checkpoint: no `latest` yet
}


@pytest.mark.parametrize("case", sorted(KILL_POINTS))
def test_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path, reference, case):
    step, left = KILL_POINTS[case]
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [*KILL_RUN, f"output_dir={run_dir}"]
    proc = with_fault(f"kill:{case.removeprefix('first_save_')}", step, args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (root / left).is_dir() and read_metrics(run_dir)[-1]["step"] == step
    # What a resume would pick: always the complete step-1, never step-2.tmp or a step-2 `latest` does not name.
    assert latest_checkpoint(run_dir) == root / "step-1" and saved_step(root / "step-1") == 1
    if step == 1:  # the run's first save: `latest` was never written
        assert not (root / "latest").exists()
    else:
        assert latest_name(run_dir) == "step-1"
        assert (root / "step-2" / "trainer_state.json").exists() == (left == "step-2")
    rerun = train_single(args)  # the same command
    assert f"resumed from {root / 'step-1'} after step 1" in rerun.stdout
    if left.endswith(".tmp"):
        assert f"removed {root / left}, left by a save that crashed" in rerun.stdout
    elif step == 2:  # the complete step-2 of the killed run is moved aside, not resumed
        assert (root / "abandoned-after-step-1" / "step-2").is_dir()
    assert losses(run_dir) == reference("kill")  # bit for bit: fp32, one process
    assert latest_name(run_dir) == "step-3" and (run_dir / "final" / "model.safetensors").exists()
    assert not list(root.glob("*.tmp"))


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, reference):
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [*KILL_RUN, f"output_dir={run_dir}"]
    proc = with_fault("enospc:checkpoint", 2, args)
    assert proc.returncode == 1
    assert one_line_error(proc) == (
        f"sftdist: error: could not save checkpoint step-2 to {root / 'step-2'}: No space left on device; the "
        f"previous checkpoint step-1 is intact; free space and rerun the same command to resume")
    assert sorted(p.name for p in root.glob("step-*")) == ["step-1"] and latest_name(run_dir) == "step-1"
    rerun = train_single(args)
    assert f"resumed from {root / 'step-1'} after step 1" in rerun.stdout
    assert losses(run_dir) == reference("kill")


def test_full_disk_writing_final_leaves_no_final(tmp_path):
    run_dir = tmp_path / "run"
    args = [*KILL_RUN, f"output_dir={run_dir}"]
    proc = with_fault("enospc:final", 0, args)
    error = one_line_error(proc)
    assert proc.returncode == 1 and error.startswith(f"sftdist: error: could not write the final model to "
                                                     f"{run_dir / 'final'}: ") and "No space left on device" in error
    assert error.endswith("the previous checkpoint step-3 is intact; free space and rerun the same command to resume")
    assert not (run_dir / "final").exists() and not (run_dir / "final.tmp").exists()
    rerun = train_single(args)  # resumes from step 3, trains step 4 again, writes final/
    assert "after step 3" in rerun.stdout and (run_dir / "final" / "model.safetensors").exists()


def test_full_disk_writing_the_merged_lora_model(tmp_path):
    run_dir = tmp_path / "run"
    proc = with_fault("enospc:final_merged", 0, [*FAST, "train.max_steps=2", "peft=lora", "peft.merge_on_save=true",
                                                 f"output_dir={run_dir}"])
    error = one_line_error(proc)
    assert proc.returncode == 1 and "No space left on device" in error and error.startswith(
        f"sftdist: error: could not write the merged model to {run_dir / 'final_merged'}: ")
    assert f"free space and write the merged model with: sftdist-export --merge {run_dir}" in proc.stderr
    assert (run_dir / "final" / "adapter_model.safetensors").exists()  # the adapter is complete
    assert not (run_dir / "final_merged").exists() and not (run_dir / "final_merged.tmp").exists()
    run_cmd([sys.executable, "-m", "sftdist", "export", "--merge", str(run_dir)])
    assert (run_dir / "final_merged" / "model.safetensors").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 20 MiB tmpfs: room for one checkpoint of the tiny model (13.6 MB), not two. Skipped where this
    process may not mount one (not root, or no CAP_SYS_ADMIN in a container)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_really_full_disk(small_tmpfs, reference):
    run_dir, root = small_tmpfs / "run", small_tmpfs / "run" / "checkpoints"
    args = [*KILL_RUN, f"output_dir={run_dir}"]
    proc = train_single(args, check=False)
    assert proc.returncode == 1
    error = one_line_error(proc)
    assert error.startswith(f"sftdist: error: could not save checkpoint step-2 to {root / 'step-2'}: No space "
                            f"left on device") and "the previous checkpoint step-1 is intact" in error
    assert sorted(p.name for p in root.glob("step-*")) == ["step-1"] and latest_name(run_dir) == "step-1"
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)  # "free space"
    rerun = train_single(args)
    assert f"resumed from {root / 'step-1'} after step 1" in rerun.stdout
    assert losses(run_dir) == reference("kill")


def sigterm_after_first_step(proc, run_dir, log_path) -> None:
    """SIGTERM to the whole process group (the launcher and every rank) once step 1 is in metrics.jsonl."""
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and read_metrics(run_dir)):
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_exits_75_and_the_same_command_resumes(tmp_path, reference, nproc):
    run_dir, log_path = tmp_path / "run", tmp_path / "log.txt"
    args = [*LONG_RUN, f"output_dir={run_dir}"]
    launcher = [sys.executable, "-m", "sftdist.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sftdist.train"]
    # The real torchrun for 2 ranks: its own handling of the SIGTERM is part of what is tested.
    proc = start_cmd([*launcher, *args], log_path, fresh=nproc == 2)
    sigterm_after_first_step(proc, run_dir, log_path)
    out = log_path.read_text()
    step = read_metrics(run_dir)[-1]["step"]
    assert 1 <= step < 24 and "stopping early (SIGTERM received)" in out, out[-4000:]
    assert f"stopped after step {step} of 24" in out and "exit status 75: stopped by SIGTERM, resumable" in out
    if nproc == 1:
        assert proc.returncode == 75, out[-4000:]
    else:  # torchrun got the SIGTERM too: it waits for its workers, then fails with its own SignalException
        assert proc.returncode != 0 and "got signal: 15" in out, out[-4000:]
    assert latest_name(run_dir) == f"step-{step}"
    assert len(list((run_dir / "checkpoints" / f"step-{step}").glob("rng_state_rank*.pt"))) == nproc
    rerun = (train_single if nproc == 1 else lambda a: train_torchrun(2, a))(args)  # the same command
    assert f"after step {step}" in rerun.stdout and (run_dir / "final").exists()
    got = losses(run_dir)
    assert len(got) == 24
    if nproc == 1:
        assert got == reference("long")  # bit for bit
    else:  # resumed multi-rank DeepSpeed runs drift by ~1e-9 relative (see tests/slurm/test_training_jobs.py)
        assert got == pytest.approx(reference("long2"), rel=1e-4)


def test_sigusr1_during_start_up_stops_before_the_first_step(tmp_path):
    """SLURM's warning can come while the data stage or the model load still runs: it is kept, and the run
    stops before its first step with the resumable status, instead of dying of the signal (#4)."""
    run_dir, log_path = tmp_path / "run", tmp_path / "log.txt"
    proc = start_cmd([sys.executable, "-m", "sftdist.train", *LONG_RUN, f"output_dir={run_dir}"], log_path,
                     env={"SFTDIST_CACHE": str(tmp_path / "cache")})  # nothing cached: the data stage takes a while
    deadline = time.time() + 300
    while "tokenising" not in log_path.read_text():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGUSR1)
    proc.wait(timeout=300)
    out = log_path.read_text()
    assert proc.returncode == 75, out[-4000:]
    assert "SIGUSR1 received during start-up: stopping before step 1" in out
    assert "exit status 75: stopped by SIGUSR1, resumable" in out
    assert not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir)
    assert not (run_dir / "checkpoints").exists()


def test_sigusr1_during_the_last_eval_checkpoints_and_the_rerun_writes_final(tmp_path):
    """A stop signal after the loop (the last step's eval, before final/) is honoured: the last step is
    checkpointed, the job exits 75 (or requeues), and the same command then only writes final/ (#23)."""
    run_dir = tmp_path / "run"
    proc = with_fault("usr1_in_eval", 4, [*KILL_RUN, f"output_dir={run_dir}"])
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SIGUSR1 received after the last step: checkpoint saved" in proc.stdout
    assert "exit status 75: stopped by SIGUSR1, resumable" in proc.stdout
    assert latest_name(run_dir) == "step-4" and not (run_dir / "final").exists()
    # The summary's tokens/s is the steps' own rate: a checkpoint after every step is not training time (#20).
    rows = read_metrics(run_dir)
    rate = float(re.search(r"([\d,]+) tokens/s", proc.stdout).group(1).replace(",", ""))
    assert rate == pytest.approx(sum(r["tokens"] for r in rows) / sum(r["step_time_s"] for r in rows), rel=0.01)
    rerun = train_single([*KILL_RUN, f"output_dir={run_dir}"])
    assert "after step 4" in rerun.stdout and (run_dir / "final").exists()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]  # nothing trained twice


def test_nan_in_one_source_stops_before_saving(tmp_path):
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = with_fault("nan:0", 3, [*KILL_RUN, f"output_dir={run_dir}"])  # source 0 is demo_chat
    assert proc.returncode == 1
    error = one_line_error(proc)
    assert error.startswith("sftdist: error: non-finite training at step 3: loss nan (source demo_chat)"), error
    assert f"the last good checkpoint is {root / 'step-2'}" in error and "train.grad_clip" in error
    assert latest_name(run_dir) == "step-2" and saved_step(root / "step-2") == 2
    assert not (root / "step-3").exists() and not list(root.glob("*.tmp")) and not (run_dir / "final").exists()
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 3 and math.isnan(last["loss"]) and math.isnan(last["loss/demo_chat"])
    assert last["loss/demo_generic"] is None or math.isfinite(last["loss/demo_generic"])


def test_exploding_grad_norm_stops_before_saving(tmp_path):
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = train_single([*KILL_RUN, *EXPLODING, f"output_dir={run_dir}"], check=False)
    assert proc.returncode == 1
    error = one_line_error(proc)
    assert error.startswith("sftdist: error: non-finite training at step 2: grad_norm inf (train.on_nonfinite=stop)")
    assert latest_name(run_dir) == "step-1" and not (root / "step-2").exists() and not (run_dir / "final").exists()


def module_weights(checkpoint) -> dict:
    return torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_skip_drops_the_nan_step_and_finishes(tmp_path, stage):
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = with_fault("nan:0", 2, [*KILL_RUN, f"parallelism={stage}", "train.on_nonfinite=skip", "train.keep_last=4",
                                   f"output_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2: non-finite loss or grad_norm, update skipped (train.on_nonfinite=skip)" in proc.stdout
    rows = read_metrics(run_dir)
    assert [r.get("skipped_nonfinite") for r in rows] == [None, 1, None, None]
    assert math.isnan(rows[1]["loss"]) and all(math.isfinite(r["loss"]) for r in rows[2:])
    assert rows[2]["lr"] == rows[1]["lr"]  # the skipped step did not advance the lr schedule
    # The update of step 2 was dropped: step 2's weights are step 1's, and training went on from them.
    before, after = module_weights(root / "step-1"), module_weights(root / "step-2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in module_weights(root / "step-3").values())
    assert (run_dir / "final" / "model.safetensors").exists()


def test_skip_stops_after_too_many_in_a_row(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_single([*KILL_RUN, "train.max_steps=6", *EXPLODING, "train.on_nonfinite=skip",
                         "train.max_consecutive_nonfinite=2", f"output_dir={run_dir}"], check=False)
    assert proc.returncode == 1
    assert one_line_error(proc).startswith(
        "sftdist: error: non-finite training at step 4: grad_norm inf; 3 non-finite steps in a row "
        "(train.max_consecutive_nonfinite=2)")
    assert [r.get("skipped_nonfinite") for r in read_metrics(run_dir)] == [None, 1, 1, None]
    assert latest_name(run_dir) == "step-3" and not (run_dir / "checkpoints" / "step-4").exists()
    assert re.search(r"the last good checkpoint is \S+step-3", proc.stderr)
