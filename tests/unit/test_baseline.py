"""sftdist-baseline's k-shot prompts (sftdist/tools/baseline.py) on real tokenizers and the shared data sets, and its
report (sftdist/tools/baseline_report.py). The losses themselves are checked against real runs in
tests/smoke/test_baseline_runs.py."""

from __future__ import annotations

import doctest

import pytest

import sftdist.tools.baseline
import sftdist.tools.baseline_cli
import sftdist.tools.baseline_report
from sftdist.data.build import build_datasets
from sftdist.data.prepare import raw_splits
from sftdist.data.tokenize import IGNORE_INDEX
from sftdist.engine.model import load_tokenizer
from sftdist.tools.baseline import draw_shots, few_shot_conversation, few_shot_data
from sftdist.tools.baseline_report import format_report, render_html
from tests.conftest import compose

SETS = {"alpaca": ("llamafactory_alpaca_en_demo.json", "alpaca"),
        "glaive": ("llamafactory_glaive_toolcall_en_demo.json", "sharegpt")}


def test_doctests():
    assert doctest.testmod(sftdist.tools.baseline).failed == 0
    assert doctest.testmod(sftdist.tools.baseline_report).failed == 0
    result = doctest.testmod(sftdist.tools.baseline_cli)
    assert result.attempted > 0 and result.failed == 0


def _config(shared, tmp_path, tokenizer: str, data: str, *, max_length: int, extra=()):
    from omegaconf import OmegaConf

    file, fmt = SETS[data]
    source = (f"[{{name: {data}, path: {shared / 'datasets' / file}, format: {fmt}, eval_fraction: 0.1, "
              f"max_samples: 150}}]")
    raw = compose([f"model.tokenizer={shared / 'tokenizers' / tokenizer}", f"data.sources={source}",
                   f"data.cache_dir={tmp_path / 'cache'}", f"train.max_length={max_length}", *extra])
    return OmegaConf.to_object(raw)


def _targets(row: dict) -> list[int]:
    """The supervised token ids of a row, in order (the first label predicts nothing)."""
    return [t for t in row["labels"][1:] if t != IGNORE_INDEX]


@pytest.mark.parametrize("tokenizer,data", [("qwen2", "alpaca"), ("llama2-sentencepiece", "alpaca"),
                                            ("llama3.2-bpe", "alpaca"), ("qwen2", "glaive")])
def test_k_shot_rows_score_exactly_the_zero_shot_reply_tokens(shared_dir, tmp_path, tokenizer, data):
    cfg = _config(shared_dir, tmp_path, tokenizer, data, max_length=2048)
    tok = load_tokenizer(cfg.model)
    plain = build_datasets(cfg.data, tok, max_length=2048, seed=cfg.train.seed)
    shots = draw_shots(raw_splits(cfg.data.sources[0], cfg.train.seed)[0], cfg.data.sources[0], cfg, tok, 3)
    shot_data, used = few_shot_data(plain, cfg, tok, 3)
    zero, few, name = plain.sources[0].eval, shot_data.sources[0].eval, cfg.data.sources[0].name
    assert len(few) == len(zero) == len(used[name]) > 5 and len(shots) == 3
    assert sum(used[name]) > len(zero)  # shots were prepended to most records
    for i, n in enumerate(used[name]):
        # The shots' replies are context, never scored: the scored tokens are the eval record's, unchanged.
        assert _targets(few[i]) == _targets(zero[i]), (tokenizer, data, i)
        assert len(few[i]["input_ids"]) <= 2048
        text = tok.decode(few[i]["input_ids"])
        if n == 3:
            assert len(few[i]["input_ids"]) > len(zero[i]["input_ids"])
            for shot in shots:  # every shot's last answer is in the prompt (its first 40 characters)
                answer = [m for m in shot["messages"] if m["role"] == "assistant"][-1]
                assert not answer.get("content") or answer["content"].strip()[:40] in text


def test_shots_are_dropped_to_fit_max_length(shared_dir, tmp_path):
    cfg = _config(shared_dir, tmp_path, "qwen2", "alpaca", max_length=320)
    tok = load_tokenizer(cfg.model)
    plain = build_datasets(cfg.data, tok, max_length=320, seed=cfg.train.seed)
    shot_data, used = few_shot_data(plain, cfg, tok, 3)
    counts = used["alpaca"]
    assert set(counts) > {3} and min(counts) < 3  # some records take fewer shots
    for i, n in enumerate(counts):
        row, zero = shot_data.sources[0].eval[i], plain.sources[0].eval[i]
        assert len(row["input_ids"]) <= 320
        if n == 0:  # no shot fits beside it: the zero-shot row, as cached
            assert row["input_ids"] == zero["input_ids"] and row["labels"] == zero["labels"]


def test_eval_records_line_up_with_the_cache_under_filters(shared_dir, tmp_path):
    # Dedup and the reply filters drop eval records before caching; the k-shot rows must follow the same order.
    cfg = _config(shared_dir, tmp_path, "qwen2", "glaive", max_length=1024,
                  extra=["data.dedup=near", "data.drop_cut_replies=true", "data.min_reply_tokens=8",
                         "data.sources.0.max_samples=300"])
    tok = load_tokenizer(cfg.model)
    plain = build_datasets(cfg.data, tok, max_length=1024, seed=cfg.train.seed)
    assert plain.sources[0].stats["eval"]["kept"] < plain.sources[0].stats["eval"]["records"]  # some dropped
    shot_data, _ = few_shot_data(plain, cfg, tok, 2)
    for i in range(len(plain.sources[0].eval)):
        assert _targets(shot_data.sources[0].eval[i]) == _targets(plain.sources[0].eval[i])


def test_a_shot_without_a_final_answer_is_cut_to_its_last_answer():
    shot = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    record = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    out = few_shot_conversation([shot], record)
    assert [m["content"] for m in out] == ["a", "b", "q", "r"]
    assert out[1]["train"] is False and "train" not in out[3]
    assert "train" not in shot[1]  # the shot's own messages are not changed


def _report(run=None):
    return {"settings": {"model": "m", "precision": "fp32", "k": 3, "max_length": 64, "max_new_tokens": 8,
                         "run": run},
            "sources": [{"source": "chat", "format": "messages", "records": 2, "supervised_tokens": 10,
                         "zero_shot": 3.0, "k_shot": 2.5, "shots_mean": 3.0, "finetuned": 1.0 if run else None}],
            "overall": {"records": 2, "supervised_tokens": 10, "zero_shot": 3.0, "k_shot": 2.5,
                        "finetuned": 1.0 if run else None},
            "answers": [{"source": "chat", "index": 0, "prompt": "<b>hi</b> & <script>x()</script>",
                         "reference": "<ok>", "zero_shot": "a<b", "k_shot": "c>d", "finetuned": "<e>" if run else None}],
            "run_metrics": None}


def test_report_text_and_escaped_html():
    text = format_report(_report("/runs/r"))
    assert "3-shot prompting: eval loss 3.0000 -> 2.5000 (-0.5000" in text
    assert "fine-tuned: eval loss 1.0000, -1.5000 per token vs the best prompt (3-shot, 2.5000)" in text
    page = render_html(_report("/runs/r"))
    assert "<script>" not in page and "&lt;script&gt;x()&lt;/script&gt;" in page
    assert "a&lt;b" in page and "c&gt;d" in page and "&lt;e&gt;" in page
    assert "<th>fine-tuned</th>" in page and "<th>fine-tuned</th>" not in render_html(_report())
    worse = _report("/runs/r")
    worse["overall"]["finetuned"] = 2.75
    assert "fine-tuning bought nothing over prompting" in format_report(worse)


def test_no_k_shot_rows_when_every_token_is_scored():
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose(["data.train_on=all"]))
    data = object()  # untouched: with train_on=all the shots' own tokens would be scored
    assert few_shot_data(data, cfg, tokenizer=None, k=3) == (data, {})
