"""End to end on CPU: the real entry points produce the documented run directory, and final/ is a
Hugging Face model that loads and generates."""

import json
import sys

import pytest
import torch
import yaml

from tests.conftest import FAST, read_metrics, run_cmd, train_single

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "supervised_tokens", "tokens_per_sec", "elapsed_s"}


def check_run_dir(run_dir, *, grad_accum, steps=3):
    assert sorted(p.name for p in run_dir.iterdir() if p.name != "stdout.txt") == [
        "config.yaml", "ds_config.json", "final", "metrics.jsonl"]
    config_text = (run_dir / "config.yaml").read_text()
    assert "${" not in config_text  # fully resolved
    assert yaml.safe_load(config_text)["output_dir"] == str(run_dir)
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert "auto" not in json.dumps(ds) and ds["gradient_accumulation_steps"] == grad_accum
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert METRIC_KEYS <= r.keys()
        assert r["loss"] > 0 and r["supervised_tokens"] > 0 and r["tokens"] >= r["supervised_tokens"]
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
        # Per-source losses and counts add up to the step's totals.
        per_source = [(r[f"loss/{s}"], r[f"supervised_tokens/{s}"]) for s in ("demo_chat", "demo_generic")]
        assert sum(n for _, n in per_source) == r["supervised_tokens"]
        assert sum(loss * n for loss, n in per_source if n) == pytest.approx(r["loss"] * r["supervised_tokens"])
    # The demo holds out eval splits: the last step carries the eval losses.
    assert rows[-1]["eval_loss"] > 0 and rows[-1]["eval_loss/demo_generic"] > 0
    assert "eval_loss" not in rows[0] or steps == 1


def check_final_generates(final):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (final / "model.safetensors").exists() and not (final.parent / "final.tmp").exists()
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def eval_loss_of_export(final, overrides, model=None):
    """The eval loss of the exported model (or ``model``) on the run's eval splits, computed outside the engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftdist.config import compose_config
    from sftdist.data.build import build_datasets
    from sftdist.data.collate import collate
    from sftdist.engine.loss import token_loss_sum

    cfg = compose_config(overrides)
    tok = AutoTokenizer.from_pretrained(final)
    model = (model or AutoModelForCausalLM.from_pretrained(final)).eval()
    data = build_datasets(cfg.data, tok, max_length=cfg.train.max_length, seed=cfg.train.seed)
    total = count = 0.0
    with torch.no_grad():
        for s, src in enumerate(data.sources):
            for i in range(len(src.eval)):
                b = collate([data.get(s, i, "eval")], tok.pad_token_id)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss_sum, n = token_loss_sum(logits, b["targets"])
                total, count = total + loss_sum.item(), count + n.item()
    return total / count


def test_single_process_run(trained_runs):
    run_dir = trained_runs("single_ga4", 0, [])
    check_run_dir(run_dir, grad_accum=4)
    check_final_generates(run_dir / "final")
    assert "1 process(es), ZeRO-2" in (run_dir / "stdout.txt").read_text()


def test_torchrun_two_process_zero2(trained_runs):
    run_dir = trained_runs("torchrun2_ga2", 2, [])
    check_run_dir(run_dir, grad_accum=2)
    check_final_generates(run_dir / "final")
    out = (run_dir / "stdout.txt").read_text()
    assert "2 process(es), ZeRO-2" in out and f"run directory: {run_dir}" in out
    assert eval_loss_of_export(run_dir / "final", FAST) == pytest.approx(read_metrics(run_dir)[-1]["eval_loss"], rel=1e-5)
    assert out.count("step 3/3") == 1  # only rank 0 prints


def test_launch_deepspeed_launcher_zero3(tmp_path):
    run_dir = tmp_path / "ds"
    proc = run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "launch=deepspeed", "parallelism=zero3", *FAST,
                    f"output_dir={run_dir}"])
    assert proc.stdout.splitlines()[0].split()[1:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    check_run_dir(run_dir, grad_accum=2)
    check_final_generates(run_dir / "final")
    assert "ZeRO-3" in proc.stdout
    # The export consolidated from ZeRO-3 shards is the trained model: same eval loss as the engine's.
    assert eval_loss_of_export(run_dir / "final", FAST) == pytest.approx(read_metrics(run_dir)[-1]["eval_loss"], rel=1e-5)


def test_launch_dry_run_pins_one_run_dir():
    proc = run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "--dry-run", "train.lr=1e-4"])
    argv = proc.stdout.strip().split()
    assert argv[0] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600"  # torchrun's grace after a SIGTERM (launch.shutdown_timeout_s)
    assert argv[2:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert argv[-2] == "train.lr=1e-4" and argv[-1].startswith("output_dir=/")


def test_launch_rejects_bad_config_before_starting():
    proc = run_cmd([sys.executable, "-m", "sftdist.cluster.launch", "--dry-run", "train.global_batch_size=nope"],
                   check=False)
    assert proc.returncode != 0 and "train.global_batch_size" in proc.stderr
    assert "torch.distributed.run" not in proc.stdout


def test_refuses_to_overwrite_an_earlier_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = train_single([*FAST, f"output_dir={tmp_path}"], check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr and "train.overwrite=true" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (tmp_path / "config.yaml").exists()


def test_bad_data_fails_before_the_model_is_built(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no reply"}]}\n')
    proc = train_single([*FAST, f"output_dir={tmp_path / 'run'}",
                         f"data.sources=[{{name: mine, path: {bad}, format: messages}}]"], check=False)
    assert proc.returncode != 0 and f"{bad}: line 1: no assistant turn" in proc.stderr
    assert "process(es), ZeRO" not in proc.stdout  # the engine was never built


def test_demo_training_loss_falls(tmp_path):
    run_dir = tmp_path / "learn"
    train_single(["train.max_steps=60", "train.warmup_steps=5", "train.max_length=128", "logging.log_every=20",
                  f"output_dir={run_dir}"])
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert sum(losses[-10:]) / 10 < 0.35 * losses[0]


def test_wandb_offline_logs_every_metric_into_the_run_dir(tmp_path):
    """Also: the resumed run continues the same W&B run (its id is kept in the checkpoint), instead of
    starting a new one at every resume or requeue (#18)."""
    run_dir = tmp_path / "wb"
    train_single([*FAST, "logging=wandb_offline", "train.stop_at_step=1", f"output_dir={run_dir}"])
    train_single([*FAST, "logging=wandb_offline", f"output_dir={run_dir}"])
    run_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and len({f.stem for f in run_files}) == 1, run_files  # run-<id>: one id
    data = b"".join(f.read_bytes() for f in run_files)
    for key in METRIC_KEYS - {"step"}:
        assert data.count(f"train/{key}".encode()) >= 3, key  # one record per step
    assert len(read_metrics(run_dir)) == 3


def test_lora_shares_the_loop_and_saves_trained_adapter(trained_runs):
    from safetensors.torch import load_file

    run_dir = trained_runs("single_lora", 0, ["peft=lora", "train.lr=1e-2"])  # shared with test_baseline_runs
    stdout = (run_dir / "stdout.txt").read_text()
    assert "trainable" in stdout and "(100.00%)" not in stdout
    adapter = load_file(run_dir / "final" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    # lora_B starts at zero: non-zero values prove the trained adapter was saved.
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert not (run_dir / "final" / "model.safetensors").exists()


def test_packed_run_and_per_source_metrics(tmp_path):
    run_dir = tmp_path / "packed"
    proc = train_single([*FAST, "data.packing=true", "data.mix_by=tokens", f"output_dir={run_dir}"])
    check_run_dir(run_dir, grad_accum=4)
    assert "of supervised tokens" in proc.stdout  # the realised mix is reported at start
    rows = read_metrics(run_dir)
    # Packed rows of up to 96 tokens hold several samples: more tokens per step than unpacked samples give.
    assert max(r["tokens"] for r in rows) > 8 * 60


def test_prepare_then_train_reuses_the_cache(tmp_path):
    cache = tmp_path / "cache"
    args = [*FAST, f"data.cache_dir={cache}"]
    proc = run_cmd([sys.executable, "-m", "sftdist", "data", "prepare", *args])
    assert "demo_chat:" in proc.stdout and "masks audited" in proc.stdout
    entries = sorted(p for p in cache.iterdir())
    assert [p.name.split("-")[0] for p in entries] == ["demo_chat", "demo_generic"]
    stamps = [(p / "stats.json").stat().st_mtime_ns for p in entries]
    train_single([*args, f"output_dir={tmp_path / 'run'}"])
    assert sorted(cache.iterdir()) == entries  # no new entry, no temporary leftovers
    assert [(p / "stats.json").stat().st_mtime_ns for p in entries] == stamps  # not rebuilt
