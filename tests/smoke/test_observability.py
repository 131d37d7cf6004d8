"""What a user watches, end to end on CPU: the per-step metrics, the step-0 baseline and the forgetting
deltas, sample generations, the console, an offline W&B run read back with wandb's own reader, secrets kept
out of everything the run writes (also when config values resolve to them), and early stopping."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, read_metrics, train_single
from tests.smoke.test_train_cpu import eval_loss_of_export

SOURCES = ("demo_chat", "demo_generic")
# Config values that resolve to secrets: sftdist writes and logs ${oc.env:NAME} in their place (redact.py).
SECRET_VALUES = ["run_name=obs-${oc.env:HF_TOKEN}", "logging.wandb_tags=[t-${oc.env:WANDB_API_KEY}]",
                 "logging.wandb_group=g-${oc.env:HUGGING_FACE_HUB_TOKEN}"]
FAKE_SECRETS = {"WANDB_API_KEY": "fakewandbkey" + "0123456789abcdef" * 2 + "0123",
                "HF_TOKEN": "hf_FakeSecretForTheLeakTest8c1d2e3f", "HUGGING_FACE_HUB_TOKEN": "hf_OtherFakeSecret77a6b5"}


def wandb_records(wandb_file: Path) -> list[dict]:
    """The records of a .wandb transaction log, decoded by wandb's own reader (``wandb leet inspect``)."""
    proc = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json",
                           str(wandb_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("obs") / "run"
    proc = train_single([*FAST, "train.max_steps=4", "train.eval_every=2", "logging=wandb_offline",
                         "logging.log_every=2", "logging.samples=1", "logging.sample_max_new_tokens=8",
                         *SECRET_VALUES, f"output_dir={run_dir}"], env={**FAKE_SECRETS, "WANDB_DIR": ""})
    return run_dir, proc


def test_step_metrics_baseline_and_forgetting_deltas(watched_run):
    run_dir, _ = watched_run
    rows = read_metrics(run_dir, baseline=True)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    base = rows[0]
    assert "loss" not in base and base["eval_loss"] > 0  # the model before any update
    assert all(base[f"eval_loss_delta/{s}"] == 0.0 for s in SOURCES) and base["eval_loss_delta"] == 0.0
    for r in rows[1:]:
        assert r["step_time_s"] > 0 and 0 < r["mfu"] <= 1 and r["model_flops"] > 0
        assert r["tokens_per_sec"] == pytest.approx(r["tokens"] / r["step_time_s"])
        assert r["supervised_tokens_per_sec"] == pytest.approx(r["supervised_tokens"] / r["step_time_s"])
        assert 0 <= r["padding_fraction"] < 1 and r["mem/host_rss_gib"] > 0.05
    for r in (rows[2], rows[4]):  # the eval steps
        for key in ("eval_loss", *(f"eval_loss/{s}" for s in SOURCES)):
            delta_key = key.replace("eval_loss", "eval_loss_delta", 1)
            assert r[delta_key] == pytest.approx(r[key] - base[key])
        assert r["eval_loss_delta"] < 0  # training on the demo lowers its eval loss
    assert "eval_loss" not in rows[1] and "eval_loss" not in rows[3]


def test_samples_are_generated_at_step_0_and_every_eval(watched_run, demo_tokenizer):
    run_dir, _ = watched_run
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["source"]) for r in samples] == [(s, src) for s in (0, 2, 4) for src in SOURCES]
    chat = [r for r in samples if r["source"] == "demo_chat"]
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["reference"].endswith("<|im_end|>")
               for r in chat)
    for r in samples:  # greedy, at most sample_max_new_tokens
        assert 0 < len(demo_tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) <= 8


def test_console_shows_summary_and_progress_lines(watched_run):
    run_dir, proc = watched_run
    out = proc.stdout
    for line in ("run summary", "model:      llama from config", "data mix:   demo_chat", "per step:   8 sequences",
                 "run:        1 process(es), ZeRO-2, fp32, grad accumulation 4, 4 steps", f"run dir:    {run_dir}", "mfu: peak"):
        assert line in out
    progress = [line for line in out.splitlines() if "] step " in line and "/4" in line]
    assert [line.split("] step ")[1].split()[0] for line in progress] == ["1/4", "2/4", "4/4"]  # not a terminal
    assert "eta" in progress[0] and "step 0 (before training)  eval_loss" in out
    report = {line.split("] data ")[1].split(":")[0]: line for line in out.splitlines() if "] data demo_" in line}
    assert "forgetting curve" in report["demo_generic"] and "forgetting curve" not in report["demo_chat"]
    assert "\r" not in out and "\r" not in proc.stderr.replace("\r\n", "\n").split("tokenising")[0]


def test_offline_wandb_history_matches_the_metrics_file(watched_run):
    run_dir, _ = watched_run
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1  # WANDB_DIR unset: inside the run directory
    records = wandb_records(wandb_files[0])
    history = [r for r in records if r.get("type") == "history"]
    rows = read_metrics(run_dir, baseline=True)
    assert len(history) == len(rows)
    text = json.dumps(history)
    for key in ("mfu", "eval_loss_delta/demo_generic", "supervised_tokens_per_sec", "train/loss"):
        assert f'"{key}"' in text, key
    tables = [r for r in records if r.get("type") == "artifact" and r["artifact"]["type"] == "run_table"]
    assert [t["artifact"]["name"].rsplit("-", 1)[1] for t in tables] == ["samples"] * 3  # steps 0, 2 and 4
    samples = json.loads(sorted(wandb_files[0].parent.glob("files/media/table/samples_*.table.json"))[-1].read_text())
    assert samples["columns"] == ["step", "source", "prompt", "completion", "reference"]
    assert len(samples["data"]) == 6  # the last table holds every generation so far
    config = json.dumps([r for r in records if r.get("type") == "run"])
    assert "early_stopping" in config and "sample_max_new_tokens" in config  # the resolved config


def test_secrets_never_reach_disk_or_console(watched_run):
    run_dir, proc = watched_run
    blobs = [proc.stdout.encode(), proc.stderr.encode()]
    blobs += [p.read_bytes() for p in run_dir.rglob("*") if p.is_file()]
    assert len(blobs) > 10
    for name, secret in FAKE_SECRETS.items():
        assert not any(secret.encode() in blob for blob in blobs), f"{name} leaked"
    # the env values were planted in the config (SECRET_VALUES) and redacted where it is saved
    assert "run_name: obs-${oc.env:HF_TOKEN}" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("save", ["best", "last"])
def test_early_stopping_exports_the_best_or_the_last_step(tmp_path, save):
    """min_delta 100: the first eval (step 2) is the best, the second (step 4) fails to improve by more
    than it, and patience 1 stops the run there."""
    run_dir = tmp_path / "run"
    overrides = [*FAST, "train.max_steps=20", "train.eval_every=2", "train.early_stopping.patience=1",
                 "train.early_stopping.min_delta=100", f"train.early_stopping.save={save}", f"output_dir={run_dir}"]
    proc = train_single(overrides)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "stopping early (eval_loss did not improve by more than 100 for 1 evals (best" in proc.stdout
    exported = eval_loss_of_export(run_dir / "final", FAST)
    if save == "best":
        assert "final/ holds step 2, the best eval_loss" in proc.stdout
        assert (run_dir / "checkpoints" / "step-2").is_dir()
        assert exported == pytest.approx(rows[1]["eval_loss"], rel=1e-5)
        assert exported != pytest.approx(rows[3]["eval_loss"], rel=1e-5)
    else:
        assert not (run_dir / "checkpoints").exists()
        assert exported == pytest.approx(rows[3]["eval_loss"], rel=1e-5)


def test_a_resumed_run_keeps_its_baseline(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "train.max_steps=4", "train.eval_every=2", f"output_dir={run_dir}"]
    train_single([*args, "train.stop_after_steps=3"])
    proc = train_single(args)
    assert "resumed from" in proc.stdout and "before training" not in proc.stdout  # no second baseline
    rows = read_metrics(run_dir, baseline=True)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[4]["eval_loss_delta/demo_chat"] == pytest.approx(rows[4]["eval_loss/demo_chat"]
                                                                 - rows[0]["eval_loss/demo_chat"])
