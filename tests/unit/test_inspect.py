"""``sftdist-data inspect``: supervised runs marked exactly (plain markers, ANSI, HTML), the per-source
statistics table, the HTML page, and the CLI end to end."""

import doctest
import json
import re
import sys

import pytest

import sftdist.tools.inspect as inspect_mod
from sftdist.config import DataConfig, DataSource
from sftdist.data.build import build_datasets, build_schedule
from sftdist.tools.inspect import (
    decode_runs,
    format_table,
    highlight_tokens,
    inspect_report,
    length_percentiles,
    supervised_runs,
)
from tests.conftest import run_cmd

MAX_LEN = 128
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "How are you?"},
                     {"role": "assistant", "content": "Fine, thanks."}]}
SIMPLE = {"messages": [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong."}]}
BAD = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
MARKED = re.compile(r"\[\[(.*?)\]\]", re.S)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build(tmp_path, tok, rows, *, extra=(), **kw):
    mine = DataSource(name="mine", path=write_jsonl(tmp_path / "chat.jsonl", rows))
    cfg = DataConfig(sources=[mine, *extra], cache_dir=str(tmp_path / "cache"), **kw)
    data = build_datasets(cfg, tok, max_length=MAX_LEN, seed=0)
    return data, build_schedule(data, cfg, seed=0, global_batch_size=2, max_length=MAX_LEN)


def sample_block(report: str, key: str) -> str:
    """The rendered body of sample ``key`` (e.g. ``mine #0``) in a report."""
    blocks = dict(b.split("\n", 1) for b in report.split("\nper-source")[0].split("\n=== ")[1:])
    return next(body for title, body in blocks.items() if title.startswith(key + ":"))


def table_row(report: str, name: str) -> list[str]:
    line = next(l for l in report.splitlines() if l.startswith(name + " "))
    return re.split(r"\s{2,}", line)


def test_docstring_examples():
    assert doctest.testmod(inspect_mod).failed == 0


def test_plain_markers_wrap_exactly_the_replies(tmp_path, demo_tokenizer):
    data, schedule = build(tmp_path, demo_tokenizer, [CHAT, SIMPLE])
    report = inspect_report(demo_tokenizer, data, schedule, n=2, color=False, html_path=None)
    first = sample_block(report, "mine #0")
    assert MARKED.findall(first) == ["Hello.<|im_end|>", "Fine, thanks.<|im_end|>"]
    assert MARKED.findall(sample_block(report, "mine #1")) == ["Pong.<|im_end|>"]
    outside = MARKED.sub("", first)
    for prompt in ("Be brief.", "Hi", "How are you?", "<|im_start|>assistant"):
        assert prompt in outside
    row = data.sources[0].train[0]
    assert "chat.jsonl: line 1" in report
    # Nothing lost or added besides the markers: the unmarked text is the whole decoded sample.
    plain = highlight_tokens(demo_tokenizer, row["input_ids"], row["labels"], "plain")
    whole = demo_tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    assert plain.replace("[[", "").replace("]]", "") == whole
    assert "\x1b" not in report


def test_ansi_colours_only_when_asked(tmp_path, demo_tokenizer):
    data, schedule = build(tmp_path, demo_tokenizer, [SIMPLE])
    coloured = inspect_report(demo_tokenizer, data, schedule, n=1, color=True, html_path=None)
    assert f"{inspect_mod.ANSI_SUPERVISED}Pong.<|im_end|>{inspect_mod.ANSI_RESET}" in coloured
    assert f"{inspect_mod.ANSI_PROMPT}Ping<|im_end|>{inspect_mod.ANSI_RESET}" in coloured
    assert "[[" not in coloured
    assert "\x1b" not in inspect_report(demo_tokenizer, data, schedule, n=1, color=False, html_path=None)


def test_text_source_first_token_is_never_marked(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "A small farm changes."}])
    notes = DataSource(name="notes", path=path, format="text")
    data, schedule = build(tmp_path, demo_tokenizer, [SIMPLE], extra=[notes])
    report = inspect_report(demo_tokenizer, data, schedule, n=1, color=False, html_path=None)
    body = sample_block(report, "notes #0")
    first = demo_tokenizer.decode(data.sources[1].train[0]["input_ids"][:1])
    assert body.startswith(first + "[[") and body.rstrip().endswith("]]")


def test_supervised_runs_cover_every_token():
    ids, labels = [1, 2, 3, 4, 5, 6], [-100, 2, 3, -100, -100, 6]
    runs = supervised_runs(ids, labels)
    assert runs == [(False, [1]), (True, [2, 3]), (False, [4, 5]), (True, [6])]
    assert supervised_runs([], []) == []


class PieceTokenizer:
    """SentencePiece-like decoding: pieces joined, "▁" read as a space, and the leading space dropped."""

    vocab = {1: "▁Hello", 2: "▁world", 3: "</s>"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_decode_runs_keep_spaces_between_runs():
    runs = decode_runs(PieceTokenizer(), [(False, [1]), (True, [2, 3])])
    assert runs == [(False, "Hello"), (True, " world</s>")]  # decoding [2, 3] alone would lose the space


@pytest.mark.parametrize("lengths,expected", [
    (list(range(1, 101)), {"p50": 50, "p90": 90, "p99": 99, "max": 100}),
    ([30, 10, 20], {"p50": 20, "p90": 30, "p99": 30, "max": 30}),
    ([7], {"p50": 7, "p90": 7, "p99": 7, "max": 7}),
    ([], {"p50": 0, "p90": 0, "p99": 0, "max": 0}),
])
def test_length_percentiles(lengths, expected):
    assert length_percentiles(lengths) == expected


def test_stats_table_counts_skipped_records(tmp_path, demo_tokenizer):
    data, schedule = build(tmp_path, demo_tokenizer, [CHAT, BAD, SIMPLE, SIMPLE], on_bad_record="skip")
    report = inspect_report(demo_tokenizer, data, schedule, n=1, color=False, html_path=None)
    row = table_row(report, "mine")
    header = re.split(r"\s{2,}", format_table(inspect_mod.COLUMNS, []))
    cells = dict(zip(header, row))
    st = data.sources[0].stats
    assert (cells["records"], cells["kept"], cells["skipped/dropped"]) == ("4", "3", "1 (unknown_role=1)")
    assert cells["supervised"] == f"{st['supervised_tokens'] / st['tokens']:.1%}"
    lens = sorted(data.sources[0].train["num_tokens"])
    assert cells["len p50/p90/p99/max"] == f"{lens[1]}/{lens[2]}/{lens[2]}/{lens[2]}"
    assert cells["samples/epoch"] == "3 (100.0%)" and cells["sup. tokens/epoch"] == "100.0%"
    assert cells["audited"] == str(st["audited"]) != "0"


def test_html_page_escapes_and_highlights(tmp_path, demo_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Say <b>x</b> & more"},
                          {"role": "assistant", "content": "<b>x</b>"}]}]
    data, schedule = build(tmp_path, demo_tokenizer, rows)
    out = tmp_path / "inspect.html"
    report = inspect_report(demo_tokenizer, data, schedule, n=1, color=False, html_path=str(out))
    page = out.read_text(encoding="utf-8")
    assert str(out) in report and "[[<b>x</b><|im_end|>]]" in report
    assert page.startswith("<!DOCTYPE html>") and "<b>" not in page
    assert '<span class="sup">&lt;b&gt;x&lt;/b&gt;&lt;|im_end|&gt;</span>' in page
    assert "Say &lt;b&gt;x&lt;/b&gt; &amp; more" in page
    assert "<td>mine</td>" in page and "chat.jsonl: line 1" in page
    assert not re.search(r"(src|href)=|https?://", page)  # standalone


def test_cli_inspect_end_to_end(tmp_path):
    cmd = [sys.executable, "-c", "from sftdist.tools.data_cli import data_main; data_main()", "inspect", "--n", "1",
           "--color", "never", "data.sources.0.max_samples=20", "train.max_length=128"]
    proc = run_cmd(cmd, env={"SFTDIST_CACHE": str(tmp_path / "cache")})
    assert "[[" in proc.stdout and "]]" in proc.stdout and "\x1b" not in proc.stdout
    assert "=== demo_chat #0" in proc.stdout and "=== demo_generic #0" in proc.stdout
    assert 0 < int(table_row(proc.stdout, "demo_chat")[2]) <= 20  # max_samples, less held-out eval records
