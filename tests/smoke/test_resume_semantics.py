"""What "run the same command again" does: a loop of reruns reaches max_steps and matches the uninterrupted
run; a rollback retires the later checkpoints instead of pruning the new one; overwrite never discards a
resumable run; a changed batch, seed or data set is refused by name; crashed saves are cleaned up; LoRA
checkpoints hold only the trainable state."""

import json

import pytest
import torch

from tests.conftest import FAST, SHARED, read_metrics, train_single

SIX = [*FAST, "train.max_steps=6", "train.lr=1e-2"]


def ckpts(run_dir):
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def latest(run_dir):
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted six-step run."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train_single([*SIX, f"output_dir={run_dir}"])
    return read_metrics(run_dir)


def test_requeue_loop_reaches_max_steps_and_matches(tmp_path, whole):
    run_dir = tmp_path / "run"
    command = [*SIX, "train.stop_after_steps=2", f"output_dir={run_dir}"]
    runs = 0
    while not (run_dir / "final").exists():
        runs += 1
        assert runs <= 3, "three reruns of two steps each must finish a six-step run"
        proc = train_single(command)
    assert runs == 3 and "stopping early" not in proc.stdout
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["loss"] for r in got] == [r["loss"] for r in whole]  # bit for bit


def test_stop_at_step_is_absolute_and_minutes_budget_stops_in_time(tmp_path):
    run_dir = tmp_path / "run"
    train_single([*SIX, "train.stop_at_step=2", f"output_dir={run_dir}"])
    # The same command again has nothing to do: it neither trains nor writes a checkpoint.
    proc = train_single([*SIX, "train.stop_at_step=2", f"output_dir={run_dir}"])
    assert "already at train.stop_at_step=2: nothing to run" in proc.stdout
    assert ckpts(run_dir) == ["step-2"] and [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    # A budget too small for two steps: one step runs (progress is guaranteed), then a checkpoint.
    proc = train_single([*SIX, "train.stop_after_minutes=0.001", f"output_dir={run_dir}"])
    assert "stopping early (train.stop_after_minutes=0.001" in proc.stdout
    assert latest(run_dir) == "step-3" and [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_rollback_retires_later_checkpoints(tmp_path, whole):
    run_dir = tmp_path / "run"
    train_single([*SIX, "train.save_every=2", "train.keep_last=3", "train.stop_at_step=5", f"output_dir={run_dir}"])
    assert ckpts(run_dir) == ["step-2", "step-4", "step-5"]
    # Roll back to step 2 and save at step 3 with keep_last=2: the new checkpoint and its predecessor stay,
    # the abandoned step-4/step-5 are moved aside, and `latest` names the new one.
    proc = train_single([*SIX, f"train.resume={run_dir}/checkpoints/step-2", "train.keep_last=2",
                         "train.stop_at_step=3", f"output_dir={run_dir}"])
    assert "moved this run's later checkpoints aside" in proc.stdout
    assert ckpts(run_dir) == ["step-2", "step-3"] and latest(run_dir) == "step-3"
    aside = run_dir / "checkpoints" / "abandoned-after-step-2"
    assert sorted(p.name for p in aside.iterdir()) == ["step-4", "step-5"]
    proc = train_single([*SIX, f"output_dir={run_dir}"])  # resume=auto continues the new history
    assert "step-3 after step 3" in proc.stdout and (run_dir / "final").exists()
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in whole]


def test_a_requeued_warm_start_goes_on_from_its_own_checkpoint(tmp_path, whole):
    """output_dir=B train.resume=A/.../step-2 rerun as is (a requeued job): the second run continues from B's
    own step 4, not from A's step 2 again, so reruns reach max_steps (#2)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train_single([*SIX, "train.stop_at_step=2", f"output_dir={a}"])
    command = [*SIX, f"train.resume={a}/checkpoints/step-2", "train.stop_after_steps=2", f"output_dir={b}"]
    first = train_single(command)
    assert f"resumed from {a}/checkpoints/step-2 after step 2" in first.stdout and latest(b) == "step-4"
    second = train_single(command)
    assert "this run directory already went on from it to step-4" in second.stdout
    assert "after step 4" in second.stdout and (b / "final").exists()
    assert not list((b / "checkpoints").glob("abandoned-*"))
    assert [r["loss"] for r in read_metrics(b)][-4:] == [r["loss"] for r in whole][2:]


def test_a_requeued_job_without_a_checkpoint_starts_over(tmp_path, whole):
    """The earlier attempt of this SLURM job died before its first checkpoint (train.save_every=0): without
    SLURM a rerun is refused (test_train_cpu::test_refuses_to_overwrite_an_earlier_run), but the requeued job
    (SLURM_RESTART_COUNT) starts over, keeping the earlier attempt's files aside (#14)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    proc = train_single([*SIX, "train.stop_at_step=2", f"output_dir={run_dir}"], env={"SLURM_RESTART_COUNT": "1"})
    assert "requeued (SLURM_RESTART_COUNT=1) before its first checkpoint: starting over" in proc.stdout
    assert (run_dir / "abandoned-attempt-1" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in whole][:2]


def test_overwrite_resumes_a_resumable_run(tmp_path, whole):
    run_dir = tmp_path / "run"
    train_single([*SIX, "train.stop_at_step=3", "train.overwrite=true", f"output_dir={run_dir}"])
    # Leftovers of a crash during a later save, and of a crashed conversion and export.
    for name in ("checkpoints/step-4.tmp", "checkpoints/step-3.universal.tmp", "final.tmp"):
        (run_dir / name).mkdir()
    (run_dir / "checkpoints" / "latest.tmp").write_text("step-4\n")
    # A requeued job with overwrite=true continues; it does not throw its checkpoints away.
    proc = train_single([*SIX, "train.overwrite=true", f"output_dir={run_dir}"])
    assert "does not discard a run that can resume" in proc.stdout and "after step 3" in proc.stdout
    assert "left by a save that crashed" in proc.stdout
    assert not [p for p in (*run_dir.glob("*.tmp"), *(run_dir / "checkpoints").glob("*.tmp"))]
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in whole]
    # RNG state is tensors and plain values: it loads without unpickling arbitrary objects.
    state = torch.load(run_dir / "checkpoints" / "step-3" / "rng_state_rank0.pt", weights_only=True)
    assert state["torch"].dtype == torch.uint8 and state["numpy"]["keys"].shape == (624,)
    # Starting over is explicit.
    proc = train_single([*SIX, "train.resume=never", "train.overwrite=true", "train.stop_at_step=1",
                         f"output_dir={run_dir}"])
    assert "resumed" not in proc.stdout and ckpts(run_dir) == ["step-1"] and not (run_dir / "final").exists()


def test_resume_refuses_a_changed_run_by_name(tmp_path):
    run_dir = tmp_path / "run"
    train_single([*SIX, "train.stop_at_step=2", f"output_dir={run_dir}"])
    state = json.loads((run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["run"]["train.global_batch_size"] == 8 and state["zero_stage"] == 2
    for change, named in [
        (["train.global_batch_size=16"], "train.global_batch_size: 8 -> 16"),
        (["train.seed=7"], "train.seed: 42 -> 7"),
        (["train.max_length=128"], "train.max_length: 96 -> 128"),
        (["data.sources.0.max_samples=48"], "data.sources[demo_chat].max_samples: 64 -> 48"),  # by name (#19)
        *([([f"model.tokenizer={SHARED}/tokenizers/gpt2"], "tokenizer: ")] if SHARED.is_dir() else []),
    ]:
        proc = train_single([*SIX, *change, f"output_dir={run_dir}"], check=False)
        assert proc.returncode != 0 and "cannot resume from" in proc.stderr, proc.stderr[-2000:]
        assert named in proc.stderr
        assert "train.resume_allow_changes=true" in proc.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]  # nothing trained, nothing lost
    # A metrics-only flag (which eval curve is the forgetting curve) and a default written out are no change.
    proc = train_single([*SIX, "data.sources.1.generic=false", "data.sources.0.columns={}", "train.stop_at_step=3",
                         f"output_dir={run_dir}"])
    assert "after step 2" in proc.stdout and [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    proc = train_single([*SIX, "train.global_batch_size=16", "train.resume_allow_changes=true",
                         f"output_dir={run_dir}"])
    assert "resuming despite a change (train.resume_allow_changes=true): train.global_batch_size: 8 -> 16" in proc.stdout
    assert (run_dir / "final").exists()


def test_lora_checkpoint_holds_only_trainable_state(tmp_path):
    sizes, keys = {}, {}
    for name, extra in {"full": [], "lora": ["peft=lora"]}.items():
        run_dir = tmp_path / name
        train_single([*SIX, *extra, "train.stop_at_step=1", f"output_dir={run_dir}"])
        step = run_dir / "checkpoints" / "step-1"
        sizes[name] = sum(f.stat().st_size for f in step.iterdir())
        keys[name] = list(torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    assert keys["lora"] and all("lora_" in k for k in keys["lora"]), [k for k in keys["lora"] if "lora_" not in k]
    assert sizes["lora"] < 0.25 * sizes["full"], sizes
