"""The pure parts of observability: step counts and padding, eval deltas and early stopping, sample prompts,
W&B names, the console progress and the start-of-run summary."""

from __future__ import annotations

import doctest
import io
from pathlib import Path

import pytest
import torch

from sftdist.config import ConfigError, EarlyStoppingConfig, SFTConfig, validate
from sftdist.data.collate import collate, collate_packed
from sftdist.observe.evaluation import EvalPlan, EvalTracker, eval_deltas
from sftdist.observe.flops import FlopsModel
from sftdist.observe.metrics_log import wandb_row
from sftdist.observe.samples import split_at_last_reply
from sftdist.observe.step_metrics import StepMeter, batch_counts


def test_module_examples():
    import sftdist.lifecycle.rundir
    import sftdist.observe.evaluation
    import sftdist.observe.metrics_log
    import sftdist.observe.progress
    import sftdist.observe.samples
    import sftdist.observe.step_metrics

    for module in (sftdist.observe.evaluation, sftdist.observe.metrics_log, sftdist.observe.progress, sftdist.lifecycle.rundir, sftdist.observe.samples,
                   sftdist.observe.step_metrics):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def example(n: int, supervised: int, source: int = 0) -> dict:
    return {"input_ids": list(range(1, n + 1)), "labels": [-100] * (n - supervised) + list(range(supervised)),
            "source": source}


def test_padding_and_attention_counts_of_a_known_batch():
    # padded: rows of 3 and 5 tokens in a [2, 5] batch -> 2 padding slots of 10
    padded = collate([example(3, 1), example(5, 2)], pad_id=0)
    # packed: one row [3 + 2 tokens] and one [4 tokens + 1 padding]
    packed = collate_packed([[example(3, 1), example(2, 2, 1)], [example(4, 3)]], pad_id=0)
    supervised, tokens, slots, attention, samples = batch_counts([padded, packed])
    # collate shifts labels left by one: a sample with k supervised labels has k targets unless its first
    # label is supervised (then k - 1: the first token is never a target)
    assert supervised == int((padded["targets"] != -100).sum() + (packed["targets"] != -100).sum())
    assert (tokens, slots) == (3 + 5 + 3 + 2 + 4, 10 + 10)
    assert attention == 3 ** 2 + 5 ** 2 + 3 ** 2 + 2 ** 2 + 4 ** 2  # per document, padding excluded
    assert samples == 5  # every example has a supervised target
    flops = FlopsModel(trainable_params=10, frozen_params=0, head_params=4, head_trainable=True, layers=1,
                       attention_dim=2)
    meter = StepMeter(flops, peak_flops=1000.0, head_everywhere=False)
    row = meter.metrics(supervised=supervised, tokens=tokens, slots=slots, attention=attention, seconds=2.0)
    assert row["padding_fraction"] == pytest.approx(3 / 20)
    assert row["tokens_per_sec"] == tokens / 2 and row["supervised_tokens_per_sec"] == supervised / 2
    assert row["model_flops"] == flops.step_flops(tokens, attention, supervised)
    assert row["mfu"] == pytest.approx(row["model_flops"] / 2.0 / 1000.0)
    assert 0 < row["mem/host_rss_gib"] <= row["mem/host_peak_rss_gib"]
    everywhere = StepMeter(flops, peak_flops=None, head_everywhere=True).metrics(
        supervised=supervised, tokens=tokens, slots=slots, attention=attention, seconds=2.0)
    assert everywhere["model_flops"] == flops.step_flops(tokens, attention, tokens) and everywhere["mfu"] is None


def test_deltas_are_changes_since_the_baseline():
    tracker = EvalTracker(EarlyStoppingConfig())
    zeros = tracker.set_baseline({"eval_loss": 2.0, "eval_loss/web": 3.0, "eval_loss/chat": 1.0,
                                  "eval_supervised_tokens/web": 10})
    assert zeros == {"eval_loss_delta": 0.0, "eval_loss_delta/web": 0.0, "eval_loss_delta/chat": 0.0}
    deltas, improved, stop = tracker.observe(5, {"eval_loss": 1.5, "eval_loss/web": 3.25, "eval_loss/chat": 0.5})
    assert deltas == {"eval_loss_delta": -0.5, "eval_loss_delta/web": 0.25, "eval_loss_delta/chat": -0.5}
    assert (improved, stop) == (False, None)  # early stopping is off
    assert eval_deltas({"eval_loss": 1.0}, {}) == {}  # no baseline (eval_at_start=false, older checkpoint)


def test_early_stopping_patience_min_delta_and_resume_state():
    cfg = EarlyStoppingConfig(metric="eval_loss_delta/web", patience=2, min_delta=0.05)
    tracker = EvalTracker(cfg)
    tracker.set_baseline({"eval_loss": 2.0, "eval_loss/web": 3.0})
    verdicts = [tracker.observe(s, {"eval_loss": 1.0, "eval_loss/web": v})[1:]
                for s, v in [(10, 3.1), (20, 3.0), (30, 3.08)]]
    assert verdicts[:2] == [(True, None), (True, None)]  # 0.1 then 0.0: better by more than 0.05
    assert verdicts[2] == (False, None) and tracker.best_step == 20 and tracker.evals_since_best == 1
    # A resumed run continues the count from the checkpoint's state.
    resumed = EvalTracker.from_state(cfg, tracker.state())
    assert resumed.baseline == {"eval_loss": 2.0, "eval_loss/web": 3.0} and resumed.best_step == 20
    _, improved, stop = resumed.observe(40, {"eval_loss": 1.0, "eval_loss/web": 2.96})  # 0.04: not enough
    assert not improved and "did not improve by more than 0.05 for 2 evals" in stop and "step 20" in stop
    # A source with no eval tokens this time neither improves nor counts against patience.
    fresh = EvalTracker.from_state(EarlyStoppingConfig(metric="eval_loss/web", patience=1), None)
    assert fresh.observe(1, {"eval_loss": 1.0, "eval_loss/web": None})[1:] == (False, None)
    # Another metric than the checkpoint's starts its count over, but keeps the baseline.
    other = EvalTracker.from_state(EarlyStoppingConfig(metric="eval_loss", patience=2), tracker.state())
    assert other.best_value is None and other.evals_since_best == 0 and other.baseline


def test_eval_plan_schedule():
    plan = EvalPlan(every=3, at_start=True, tracker=EvalTracker(EarlyStoppingConfig()), has_eval=True,
                    micro_batch_size=1, pad_id=0)
    assert [s for s in range(0, 11) if plan.due(s, last=s == 10)] == [0, 3, 6, 9, 10]
    plan.at_start, plan.every = False, 0
    assert [s for s in range(0, 11) if plan.due(s, last=s == 10)] == [10]
    plan.has_eval = False
    assert not plan.due(10, last=True)  # nothing to evaluate and no sample prompts


@pytest.mark.parametrize("overrides, message", [
    (["train.early_stopping.patience=2", "train.eval_every=0"], "train.eval_every > 0"),
    (["train.early_stopping.patience=2", "train.eval_every=5", "train.early_stopping.metric=eval_loss/nope"],
     "no source named 'nope'"),
    (["train.early_stopping.patience=2", "train.eval_every=5", "train.eval_at_start=false",
      "train.early_stopping.metric=eval_loss_delta/demo_generic"], "train.eval_at_start=true"),
    (["train.early_stopping.patience=2", "train.eval_every=5", "data.sources.0.eval_fraction=0",
      "data.sources.1.eval_fraction=0"], "needs eval data"),
])
def test_early_stopping_config_errors_name_the_key(overrides, message):
    from sftdist.config import compose_config

    cfg: SFTConfig = compose_config(overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, dp_world=1, has_gpu=False)


def test_early_stopping_metric_must_be_an_eval_loss():
    with pytest.raises(ConfigError, match="train.early_stopping.metric"):
        EarlyStoppingConfig(metric="loss", patience=1)


def test_generic_sources_default_to_text_format():
    from sftdist.config import DataSource

    assert DataSource(name="web", path="x", format="text").is_generic
    assert not DataSource(name="web", path="x", format="text", generic=False).is_generic
    assert DataSource(name="chat", path="x", format="messages", generic=True).is_generic
    assert not DataSource(name="chat", path="x", format="messages").is_generic


def test_sample_prompt_is_the_conversation_before_its_last_reply(demo_tokenizer):
    from sftdist.data.tokenize import encode_conversation

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}]
    enc = encode_conversation(demo_tokenizer, messages)
    prompt, reply = split_at_last_reply(enc["input_ids"], enc["labels"])
    expected = demo_tokenizer.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=False)
    assert demo_tokenizer.decode(prompt) == expected
    assert demo_tokenizer.decode(reply) == "Teal.<|im_end|>"


def test_wandb_gets_the_metrics_file_names_and_the_older_aliases():
    row = {"step": 4, "loss": 1.0, "loss/web": 2.0, "mfu": 0.3, "eval_loss": 1.5, "eval_loss_delta/web": 0.1,
           "mem/host_rss_gib": 1.2, "eval_loss/web": None}
    legacy = wandb_row(row, legacy=True)
    assert {k: legacy[k] for k in row if k != "step" and row[k] is not None} == {
        k: v for k, v in row.items() if k != "step" and v is not None}
    assert legacy["train/loss"] == 1.0 and legacy["train/loss/web"] == 2.0 and legacy["eval/loss"] == 1.5
    assert "train/mfu" not in legacy and "eval/loss_delta/web" not in legacy  # new keys: one name only
    assert set(wandb_row(row, legacy=False)) == {"loss", "loss/web", "mfu", "eval_loss", "eval_loss_delta/web",
                                                 "mem/host_rss_gib"}


def rows(n: int) -> list[dict]:
    return [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1000.0, "mfu": 0.25}
            for s in range(1, n + 1)]


def test_progress_lines_when_not_a_terminal(capsys, monkeypatch):
    from sftdist.observe.progress import Progress

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    progress = Progress(start_step=0, max_steps=6, log_every=3, mode="auto")
    for row in rows(6):
        progress.update(row)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ")[1].split()[1] for line in lines] == ["1/6", "3/6", "6/6"]  # first, every 3rd, last
    assert "eta" in lines[0] and "eta" not in lines[-1]
    assert "tok/s 1,000" in lines[1] and "mfu 25.0%" in lines[1] and "lr 1.00e-03" in lines[1]


def test_progress_bar_keeps_log_lines_above_it(monkeypatch, capsys):
    from sftdist.engine import distributed as run_log
    from sftdist.observe.progress import Progress

    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    progress = Progress(start_step=2, max_steps=6, log_every=1, mode="bar")
    run_log.log("checkpoint saved: somewhere")
    for row in rows(6)[2:]:
        progress.update(row)
    progress.close()
    text = err.getvalue()
    assert "checkpoint saved: somewhere" in capsys.readouterr().out
    assert text.count("\r\r") >= 1  # the bar was cleared for that line and drawn again below it
    assert "6/6" in text and "loss 0.3333" in text and "tok/s 1,000" in text
    assert run_log._writer is None  # closed: log() prints plainly again


def test_phase_progress_lines_come_periodically_with_an_eta(monkeypatch):
    from sftdist.observe import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal: lines
    lines = []
    with progress.PhaseProgress("eval loss", 10, unit="records", say=lines.append, every=30) as p:
        for _ in range(10):
            clock[0] += 10
            p.update()
    # After the first record, then every 30 s, then at the end; the ETA is the mean time per record so far.
    assert lines == ["eval loss: 1/10 records, 0:10 elapsed, eta 1:30",
                     "eval loss: 4/10 records, 0:40 elapsed, eta 1:00",
                     "eval loss: 7/10 records, 1:10 elapsed, eta 0:30",
                     "eval loss: 10/10 records, 1:40 elapsed"]


def test_phase_progress_bar_on_a_terminal(monkeypatch):
    from sftdist.observe.progress import PhaseProgress

    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    lines = []
    with PhaseProgress("answers", 2, unit="answers", say=lines.append, mode="bar") as p:
        p.update(2)
    assert not lines and "answers: 100%" in err.getvalue() and "2/2" in err.getvalue()


def test_run_dir_tail_of_a_killed_run_is_dropped_on_resume(tmp_path):
    from sftdist.lifecycle.rundir import prepare_run_dir

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    (tmp_path / "samples.jsonl").write_text('{"step": 0, "completion": "a"}\n{"step": 2, "completion": "b"}\n')
    prepare_run_dir(tmp_path, overwrite=False, resume_step=1, config_yaml="", ds_config={})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n'
    assert (tmp_path / "samples.jsonl").read_text() == '{"step": 0, "completion": "a"}\n'
    prepare_run_dir(tmp_path, overwrite=True, resume_step=None, config_yaml="", ds_config={})
    assert not (tmp_path / "samples.jsonl").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_attention_work_ignores_padding_tails():
    batch = collate_packed([[example(2, 1)], [example(4, 1)]], pad_id=0)  # row 0: 2 tokens + 2 padding
    assert batch_counts([batch])[3] == 2 ** 2 + 4 ** 2
    assert torch.equal(batch["token_source"][0], torch.tensor([0, 0, -1, -1]))


def test_wandb_dir_precedence(tmp_path, monkeypatch):
    from sftdist.config import LoggingConfig
    from sftdist.observe.metrics_log import wandb_dir

    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert wandb_dir(LoggingConfig(), tmp_path) == tmp_path  # default: inside the run directory
    monkeypatch.setenv("WANDB_DIR", "/scratch/wandb")
    assert wandb_dir(LoggingConfig(), tmp_path) == Path("/scratch/wandb")
    assert wandb_dir(LoggingConfig(wandb_dir="/fast/w"), tmp_path) == Path("/fast/w")
