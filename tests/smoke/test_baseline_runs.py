"""sftdist-baseline against real runs: before training its zero-shot loss is the loop's step-0 eval_loss, and
with --run the fine-tuned model's is the run's last eval_loss, for a full fine-tune and a LoRA adapter.
Its bad inputs fail with one line before any model is loaded."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.conftest import FAST, read_metrics, run_cmd

LORA = ["peft=lora", "train.lr=1e-2"]  # shared with test_train_cpu's LoRA test through trained_runs


def baseline(*args, check=True):
    return run_cmd([sys.executable, "-c", "from sftdist.tools.baseline_cli import main; main()", *args], check=check)


def eval_rows(run_dir):
    rows = [r for r in read_metrics(run_dir, baseline=True) if r.get("eval_loss") is not None]
    return rows[0], rows[-1]


def assert_losses(got: dict, row: dict):
    """The report's overall and per-source losses of one model (``got``: key -> loss) equal the metrics row's."""
    assert got["all"] == pytest.approx(row["eval_loss"], rel=1e-6, abs=0)
    for name in ("demo_chat", "demo_generic"):
        assert got[name] == pytest.approx(row[f"eval_loss/{name}"], rel=1e-6, abs=0), name


def losses(report: dict, key: str) -> dict:
    return {"all": report["overall"][key], **{s["source"]: s[key] for s in report["sources"]}}


def test_zero_shot_is_step_0_and_fine_tuned_is_the_last_eval(trained_runs, tmp_path):
    run_dir = trained_runs("single_ga4", 0, [])
    step0, last = eval_rows(run_dir)
    assert step0["step"] == 0 and last["step"] == 3

    # Before training: the same overrides as the run.
    before = tmp_path / "before.json"
    proc = baseline("--k", "0", "--answers", "0", "--html", str(tmp_path / "b.html"), "--json", str(before),
                    *FAST)
    assert_losses(losses(json.loads(before.read_text()), "zero_shot"), step0)
    # The plan, then progress with done/total and the time (stderr is a file here: lines, not a bar).
    assert "plan: eval splits of 5 records (demo_chat 3, demo_generic 2)" in proc.stderr
    assert "k-shot:     skipped (--k 0)" in proc.stderr
    assert "in all:     1 eval pass (5 records), 0 answers" in proc.stderr
    assert re.search(r"zero-shot eval loss: 5/5 records, \d+:\d\d elapsed", proc.stderr)

    # After: the run's own config, its final/ model, 3-shot prompts and answers.
    after, page = tmp_path / "after.json", tmp_path / "after.html"
    proc = baseline("--run", str(run_dir), "--answers", "1", "--max-new-tokens", "4", "--html", str(page),
                    "--json", str(after))
    report = json.loads(after.read_text())
    assert_losses(losses(report, "zero_shot"), step0)
    assert_losses(losses(report, "finetuned"), last)
    chat, generic = report["sources"]
    assert chat["k_shot"] > 0 and chat["shots_mean"] > 0 and chat["k_shot_supervised_tokens"] == chat["supervised_tokens"]
    assert generic["k_shot"] is None  # text documents take no shots
    assert [a["source"] for a in report["answers"]] == ["demo_chat", "demo_generic"]
    assert all(a["zero_shot"] and a["finetuned"] and a["reference"] for a in report["answers"])
    assert report["run_metrics"]["final_eval_loss"] == last["eval_loss"]
    assert "fine-tuned: eval loss" in proc.stdout and "3-shot" in proc.stdout
    assert "in all:     3 eval passes (15 records), 5 answers" in proc.stderr
    for phase in ("3-shot prompts: 3/3 records", "3-shot eval loss: 5/5 records",
                  "3-shot answers: 1/1 answers", "fine-tuned eval loss: 5/5 records",
                  "fine-tuned answers: 2/2 answers"):
        assert re.search(re.escape(phase) + r", \d+:\d\d elapsed", proc.stderr), phase
    assert "<th>fine-tuned</th>" in page.read_text()
    assert not (run_dir / "baseline.html").exists()  # --html chose the page's place


def test_lora_run_measures_its_adapter_on_the_base(trained_runs, tmp_path):
    run_dir = trained_runs("single_lora", 0, LORA)
    assert (run_dir / "final" / "adapter_config.json").exists()
    step0, last = eval_rows(run_dir)
    out = tmp_path / "lora.json"
    baseline("--run", str(run_dir), "--k", "1", "--answers", "0", "--json", str(out))
    report = json.loads(out.read_text())
    assert_losses(losses(report, "zero_shot"), step0)
    assert_losses(losses(report, "finetuned"), last)
    assert last["eval_loss"] < step0["eval_loss"] - 0.05  # the adapter changed the model
    assert (run_dir / "baseline.html").exists()  # the default page goes into the run directory


@pytest.mark.parametrize("case", ["not_a_run", "unfinished", "overrides", "no_eval", "qlora_on_cpu"])
def test_bad_inputs_fail_with_one_line(tmp_path, case, capsys):
    import torch

    from sftdist.tools.baseline_cli import main

    if case == "qlora_on_cpu" and torch.cuda.is_available():
        pytest.skip("a CPU-only refusal")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = {"not_a_run": ["--run", str(run_dir)],
            "unfinished": ["--run", str(run_dir)],
            "overrides": ["--run", str(run_dir), "train.max_length=64"],
            "no_eval": [*FAST, "data.sources.0.eval_fraction=0", "data.sources.1.eval_fraction=0",
                        f"data.cache_dir={tmp_path / 'cache'}"],
            "qlora_on_cpu": [*FAST, "peft=qlora", "model.name_or_path=/nonexistent"]}[case]
    if case == "unfinished":
        (run_dir / "config.yaml").write_text("output_dir: x\n")
    expected = {"not_a_run": "no config.yaml there", "unfinished": "no final/ model yet",
                "overrides": "drop the overrides", "no_eval": "no data source has an eval split",
                "qlora_on_cpu": "needs a CUDA GPU"}[case]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert str(e.value).startswith("sftdist-baseline: error: ") and expected in str(e.value)
    assert "\n" not in str(e.value)
    assert not list(run_dir.iterdir()) or case == "unfinished"  # nothing written
