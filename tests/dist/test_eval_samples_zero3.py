"""Eval, the step-0 baseline and sample generations on 2 ranks under ZeRO-3 with packing, full fine-tuning
and LoRA: no rank hangs (every forward of generate gathers parameters collectively), and what the untrained
model generates and scores at step 0 is what one process without ZeRO-3 gets from the same initial weights
(LoRA's B starts at zero, so its step-0 model is the base)."""

import json

import pytest

from tests.conftest import FAST, read_metrics, train_single, train_torchrun

ARGS = [*FAST, "data.packing=true", "train.max_steps=4", "train.eval_every=2", "logging.samples=1",
        "logging.sample_max_new_tokens=6", "peft.dropout=0"]


def samples_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    train_single([*ARGS, "parallelism=zero2", f"output_dir={run_dir}"])
    return run_dir


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_two_ranks_zero3_packing_eval_and_samples(tmp_path, reference, peft):
    run_dir = tmp_path / "run"
    train_torchrun(2, [*ARGS, "parallelism=zero3", f"peft={peft}", f"output_dir={run_dir}"], timeout=900)
    rows, ref_rows = read_metrics(run_dir, baseline=True), read_metrics(reference, baseline=True)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["eval_loss"] == pytest.approx(ref_rows[0]["eval_loss"], rel=1e-5)
    assert all(rows[s]["eval_loss_delta"] == pytest.approx(rows[s]["eval_loss"] - rows[0]["eval_loss"]) for s in (2, 4))
    assert all(0 < r["mfu"] <= 1 for r in rows[1:])
    samples, ref_samples = samples_of(run_dir), samples_of(reference)
    assert [(r["step"], r["source"]) for r in samples] == [(s, src) for s in (0, 2, 4)
                                                           for src in ("demo_chat", "demo_generic")]
    step0 = [(r["prompt"], r["completion"]) for r in samples if r["step"] == 0]
    assert step0 == [(r["prompt"], r["completion"]) for r in ref_samples if r["step"] == 0]


def test_early_stopping_on_two_ranks_exports_the_best_step(tmp_path):
    """Every rank decides from the same all-reduced eval values, stops after the same step, and loads the
    best checkpoint collectively (ZeRO-3 shards) before the export."""
    from tests.smoke.test_train_cpu import eval_loss_of_export

    run_dir = tmp_path / "run"
    proc = train_torchrun(2, [*FAST, "parallelism=zero3", "train.max_steps=20", "train.eval_every=2",
                              "train.early_stopping.patience=1", "train.early_stopping.min_delta=100",
                              f"output_dir={run_dir}"], timeout=900)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "final/ holds step 2" in proc.stdout
    assert eval_loss_of_export(run_dir / "final", FAST) == pytest.approx(rows[1]["eval_loss"], rel=1e-5)
