"""``sftdist-data quality`` and the data-stage filters: planted problems in a synthetic set are found and
counted exactly; planted duplicates and cut replies in copies of the real shared sets raise the report's
counts by exactly the number planted; ``data.dedup``/``min_reply_tokens``/``drop_cut_replies`` drop exactly
those records and the mix report counts them; the CLI writes its JSON and HTML, and stops where training
stops, with training's own error (bad records; a source none of whose records parses)."""

import doctest
import json
import sys

import pytest

import sftdist.data.quality as quality
import sftdist.tools.quality_report as quality_report_mod
from sftdist.config import ConfigError, DataConfig, DataSource
from sftdist.data.build import build_datasets, build_schedule, mix_report
from sftdist.data.messages import DataError
from sftdist.data.prepare import cache_key
from sftdist.tools.quality_report import quality_report
from tests.conftest import run_cmd

LONG = ("Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen, which feeds "
        "almost every food chain on the planet and keeps the air breathable for animals.")
OTHER = ("A binary search halves the sorted range at every step, so it finds an item among a million in about "
         "twenty comparisons instead of scanning the whole list.")


def chat(*turns, tools=None):
    """``chat("user", "Hi", "assistant", "Yo")`` -> a messages record."""
    msgs = [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2])]
    return {"messages": msgs, **({"tools": tools} if tools else {})}


def synthetic() -> list[dict]:
    """24 records with exactly: 2 exact duplicates, 1 near duplicate, 1 conflicting prompt group, 1 empty
    and 2 short replies (under 3 words), 3 cut replies, 1 echo, 2 refusals, 1 double user turn and 1 system
    message mid-conversation."""
    clean = [chat("user", f"Question number {i} about topic {i}?", "assistant",
                  f"Answer {i}: this is a complete and helpful reply about topic {i}, with enough words.")
             for i in range(10)]
    return clean + [
        chat("user", "Explain photosynthesis.", "assistant", LONG),                       # 10
        chat("user", "explain   PHOTOSYNTHESIS.", "assistant", LONG.upper()),             # 11 exact dup of 10
        chat("user", "Question number 3 about topic 3?", "assistant",                     # 12 exact dup of 3
             "Answer 3: this is a complete and helpful reply about topic 3, with enough words."),
        chat("user", "Tell me about plants.", "assistant", LONG + " Nice."),              # 13 near dup of 10
        chat("user", "How does binary search work?", "assistant", OTHER),                 # 14
        chat("user", "How does binary search work?", "assistant", "It does not, sorry friend."),  # 15 conflicts 14
        chat("user", "Say nothing", "assistant", ""),                                      # 16 empty (and short)
        chat("user", "Yes or no?", "assistant", "Yes"),                                    # 17 short
        chat("user", "Write a story.", "assistant", "Once upon a time there lived a very old kin"),  # 18 cut
        chat("user", "Code?", "assistant", "Here:\n```python\nprint('hi')"),              # 19 cut (open fence)
        chat("user", "List three fruits", "assistant", "The three fruits are apples, pears and"),  # 20 cut
        chat("user", "Repeat after me please", "assistant", "Repeat after me please. Done."),  # 21 echo
        chat("user", "Hack a bank.", "assistant", "As an AI language model, I must decline."),  # 22 refusal
        chat("user", "First part", "user", "second part", "system", "Be brief.",          # 23 2 user + sys mid
             "assistant", "I cannot help with that request, I am afraid."),               #    + refusal
    ]


def records(rows):
    from sftdist.data.messages import to_conversation

    return [(f"s.jsonl: line {i + 1}", to_conversation(r, "messages", f"line {i + 1}")[0]) for i, r in enumerate(rows)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_docstring_examples():
    assert doctest.testmod(quality).failed == 0
    assert doctest.testmod(quality_report_mod).failed == 0


def test_planted_problems_are_found_exactly():
    recs = records(synthetic())
    assert quality.exact_duplicates(recs) == [(11, 10), (12, 3)]
    assert [(d, f) for d, f, _ in quality.near_duplicates(recs, 0.8)] == [(13, 10)]
    assert quality.conflicting_prompts(recs) == [[14, 15]]
    assert quality.empty_replies(recs) == [16]
    assert quality.short_replies(recs, 3) == [16, 17]
    assert quality.cut_replies(recs) == [18, 19, 20]
    assert quality.echo_replies(recs) == [21]
    assert quality.refusals(recs) == [22, 23]
    assert quality.role_problems(recs) == {"consecutive_user": [23], "system_mid": [23]}
    assert quality.refusals(recs, ["decline"]) == [22]
    assert quality.dedup_drops(recs, "exact") == [11, 12]
    assert quality.dedup_drops(recs, "near") == [11, 12, 13]
    assert quality.dedup_drops(recs, "none") == []


def test_near_threshold_and_tool_calls():
    recs = records(synthetic())
    assert quality.near_duplicates(recs, 0.99) == []  # 13 adds a word: Jaccard 0.93
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                "function": {"name": "wx", "arguments": {}}}]}
    tool_only = [("t", [{"role": "user", "content": "Weather?"}, call])]
    assert quality.empty_replies(tool_only) == quality.cut_replies(tool_only) == []


def test_report_counts_overlap_and_contamination(tmp_path, demo_tokenizer):
    rows = synthetic()
    held = [rows[0], rows[1], chat("user", "Fresh eval question?", "assistant", "A fresh eval answer here.")]
    other = [chat("user", "QUESTION number 5 about topic 5?", "assistant",
                  "Answer 5: this is a complete and helpful reply about topic 5, with enough words."),
             chat("user", "Unrelated?", "assistant", "Unrelated answer, fully formed.")]
    cfg = DataConfig(sources=[
        DataSource(name="mine", path=write_jsonl(tmp_path / "s.jsonl", rows),
                   eval_path=write_jsonl(tmp_path / "e.jsonl", held)),
        DataSource(name="other", path=write_jsonl(tmp_path / "o.jsonl", other)),
        DataSource(name="docs", path=write_jsonl(tmp_path / "d.jsonl", [{"text": "a document"}]), format="text")])
    report = quality_report(cfg, demo_tokenizer, max_length=40, seed=0, min_reply_tokens=2)
    mine = report["sources"]["mine"]
    counts = {k: v["count"] for k, v in mine["train"].items() if isinstance(v, dict) and "count" in v}
    assert counts == {"exact_duplicates": 2, "near_duplicates": 1, "conflicting_prompts": 1, "empty_replies": 1,
                      "short_replies": counts["short_replies"], "cut_replies": 3, "echo_replies": 1, "refusals": 2, "consecutive_user": 1,
                      "system_mid": 1, "over_max_length": counts["over_max_length"]}
    at = lambda n: f"{tmp_path / 's.jsonl'}: line {n}"  # noqa: E731
    assert mine["train"]["exact_duplicates"]["examples"] == [[at(12), at(11)], [at(13), at(4)]]
    assert mine["train"]["cut_replies"]["examples"] == [[at(19)], [at(20)], [at(21)]]
    assert mine["eval_overlap"]["count"] == 2 and mine["eval"]["records"] == 3
    assert report["cross_source"] == [{"source": "other", "other": "mine", "count": 1,
                                       "examples": [[f"{tmp_path / 'o.jsonl'}: line 1", f"{tmp_path / 's.jsonl'}: line 6"]]}]
    assert report["skipped"] == ["docs"]
    # Lengths: every record rendered; truncation to 40 tokens loses supervised tokens of the longer ones.
    count = lambda s: len(demo_tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert counts["short_replies"] == len(quality.short_replies(records(rows), 2, count)) >= 1
    assert 0 < counts["over_max_length"] < 24 and mine["train"]["truncated_supervised_tokens"] > 0
    assert mine["train"]["token_percentiles"]["max"] > 40
    text = quality_report_mod.format_report(report)
    assert text.splitlines()[1].split()[:4] == ["source", "records", "exact", "dup"]
    assert "overlap: 1 records of other also in mine" in text


def test_filters_drop_exactly_and_are_counted(tmp_path, demo_tokenizer):
    rows = synthetic()
    path = write_jsonl(tmp_path / "s.jsonl", rows)

    def build(**kw):
        cfg = DataConfig(sources=[DataSource(name="mine", path=path)], cache_dir=str(tmp_path / "cache"), **kw)
        data = build_datasets(cfg, demo_tokenizer, max_length=256, seed=0)
        schedule = build_schedule(data, cfg, seed=0, global_batch_size=2, max_length=256)
        return data.sources[0], mix_report(data, schedule)[0]

    def dropped(src):
        kept = set(src.train["where"])
        return sorted(int(w.rsplit(" ", 1)[1]) - 1 for w in (f"{path}: line {i + 1}" for i in range(len(rows)))
                      if w not in kept)

    base, _ = build()
    # The empty reply leaves no trained token with this template: dropped_no_target without any filter.
    assert dropped(base) == [16] and base.stats["statuses"] == {"ok": 23, "dropped_no_target": 1}
    src, mix = build(dedup="exact")
    assert dropped(src) == [11, 12, 16] and mix["statuses"]["dropped_duplicate"] == 2 and mix["kept"] == 21
    src, mix = build(dedup="near")
    assert dropped(src) == [11, 12, 13, 16] and mix["statuses"]["dropped_duplicate"] == 3
    src, mix = build(drop_cut_replies=True)
    assert dropped(src) == [16, 18, 19, 20] and mix["statuses"]["dropped_cut_reply"] == 3
    src, mix = build(min_reply_tokens=2)
    count = lambda s: len(demo_tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    short = quality.short_replies(records(rows), 2, count)
    assert 16 in short and dropped(src) == short and mix["statuses"]["dropped_short_reply"] == len(short)
    # on_bad_record=error (the default) never stops for filtered records
    src, mix = build(dedup="near", drop_cut_replies=True)
    assert dropped(src) == [11, 12, 13, 16, 18, 19, 20]
    assert mix["statuses"] == {"ok": 17, "dropped_duplicate": 3, "dropped_cut_reply": 3, "dropped_no_target": 1}


def test_filter_keys_validate_and_key_the_cache():
    src = DataSource(name="a", path="/nonexistent/a.jsonl")
    keys = {cache_key(src, DataConfig(sources=[src], **kw), "tok", max_length=8, seed=0)
            for kw in ({}, {"dedup": "exact"}, {"dedup": "near"}, {"dedup": "near", "near_dup_threshold": 0.9},
                       {"min_reply_tokens": 2}, {"drop_cut_replies": True})}
    assert len(keys) == 6
    with pytest.raises(ConfigError, match="data.dedup"):
        DataConfig(dedup="fuzzy")
    with pytest.raises(ConfigError, match="near_dup_threshold"):
        DataConfig(near_dup_threshold=0)
    with pytest.raises(ConfigError, match="min_reply_tokens"):
        DataConfig(min_reply_tokens=-1)


# --- the real shared sets -------------------------------------------------------------------------------

REAL = {"alpaca": ("llamafactory_alpaca_en_demo.json", "alpaca", "output"),
        "glaive": ("llamafactory_glaive_toolcall_en_demo.json", "sharegpt", None)}


def reply_of(row, fmt):
    return row["output"] if fmt == "alpaca" else [t for t in row["conversations"] if t["from"] == "gpt"][-1]["value"]


def set_reply(row, fmt, text):
    row = json.loads(json.dumps(row))
    if fmt == "alpaca":
        row["output"] = text
    else:
        [t for t in row["conversations"] if t["from"] == "gpt"][-1]["value"] = text
    return row


def plant(rows, fmt, report_train, k=3):
    """A copy of ``rows`` with ``k`` exact duplicates, ``k`` near duplicates and ``k`` cut replies planted in
    records that no finding involves; returns it and the 0-based indices of the planted records."""
    involved = {int(w.rsplit(" ", 1)[1]) for key in ("exact_duplicates", "near_duplicates", "cut_replies",
                                                     "conflicting_prompts")
                for ex in report_train[key]["examples"] for w in ex}
    clean = [i for i, r in enumerate(rows) if i not in involved and "\n" not in reply_of(r, fmt)
             and len(reply_of(r, fmt).split()) >= 40]
    dups, nears, cuts = clean[:k], clean[k:2 * k], clean[2 * k:3 * k]
    out = [json.loads(json.dumps(r)) for r in rows]
    for i in cuts:
        words = reply_of(rows[i], fmt).split()
        out[i] = set_reply(rows[i], fmt, " ".join(words[:15]) + " " + words[15][: max(1, len(words[15]) // 2)].rstrip(".,;:!?\"')"))
    out += [rows[i] for i in dups]
    out += [set_reply(rows[i], fmt, reply_of(rows[i], fmt) + " Hope this helps.") for i in nears]
    return out, {"dups": list(range(len(rows), len(rows) + k)), "nears": list(range(len(rows) + k, len(rows) + 2 * k)),
                 "cuts": cuts}


@pytest.fixture(scope="module")
def qwen(shared_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "qwen2")


@pytest.mark.parametrize("name", list(REAL))
def test_planted_problems_in_real_sets(shared_dir, qwen, tmp_path, name):
    file, fmt, _ = REAL[name]
    rows = json.loads((shared_dir / "datasets" / file).read_text())[:300]
    orig = tmp_path / "orig.json"
    orig.write_text(json.dumps(rows))

    def report(path):
        cfg = DataConfig(sources=[DataSource(name=name, path=str(path), format=fmt)])
        return quality_report(cfg, qwen, max_length=2048, seed=0, n_examples=10_000)["sources"][name]["train"]

    before = report(orig)
    planted_rows, planted = plant(rows, fmt, before)
    copy = tmp_path / "planted.json"
    copy.write_text(json.dumps(planted_rows))
    after = report(copy)
    for key, n in (("exact_duplicates", 3), ("near_duplicates", 3), ("cut_replies", 3)):
        assert after[key]["count"] == before[key]["count"] + n, key
    assert after["records"] == before["records"] + 6

    def build(**kw):
        cfg = DataConfig(sources=[DataSource(name=name, path=str(copy), format=fmt)], cache_dir=str(tmp_path / "c"), **kw)
        data = build_datasets(cfg, qwen, max_length=2048, seed=0)
        where = set(data.sources[0].train["where"])
        return data.sources[0].stats, {i for i in range(len(planted_rows)) if f"{copy}: record {i}" not in where}

    stats, gone = build(dedup="near", drop_cut_replies=True)
    assert set(planted["dups"]) | set(planted["nears"]) | set(planted["cuts"]) <= gone
    assert stats["statuses"]["dropped_duplicate"] == after["exact_duplicates"]["count"] + after["near_duplicates"]["count"]
    assert stats["statuses"]["dropped_duplicate"] + stats["statuses"]["dropped_cut_reply"] == len(gone)
    flagged = {int(ex[0].rsplit(" ", 1)[1]) for key in ("exact_duplicates", "near_duplicates", "cut_replies")
               for ex in after[key]["examples"]}
    assert gone == flagged  # exactly what the report flags: duplicates (not their first copy) and cut replies


def test_cli_writes_json_and_html(tmp_path, demo_tokenizer):
    rows = synthetic()
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    out_json, out_html = tmp_path / "q.json", tmp_path / "q.html"
    cmd = [sys.executable, "-c", "from sftdist.tools.data_cli import data_main; data_main()", "quality",
           "--json", str(out_json), "--html", str(out_html), "--near-threshold", "0.9",
           f"data.sources=[{{name: mine, path: {src}, format: messages}}]", "train.max_length=64"]
    proc = run_cmd(cmd)
    found = json.loads(out_json.read_text())["sources"]["mine"]["train"]
    assert found["exact_duplicates"]["count"] == 2 and found["near_duplicates"]["count"] == 1
    assert found["cut_replies"]["count"] == 3 and json.loads(out_json.read_text())["settings"]["near_threshold"] == 0.9
    page = out_html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<td>mine</td>" in page and "cut_replies" in page
    assert "exact dup" in proc.stdout and f"JSON report written to {out_json}" in proc.stdout


def _exit_message(main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code)


def test_cli_stops_where_training_stops_with_the_same_error(shared_dir, tmp_path):
    """A file of alpaca records read as ``format: messages`` (the issue): no record parses. ``sftdist data
    quality`` stops with the data stage's own error (``sftdist data prepare`` here), in this process."""
    from sftdist.tools.data_cli import data_main, prepare_main

    chat = write_jsonl(tmp_path / "chat.jsonl", synthetic())
    identity = json.loads((shared_dir / "datasets" / "llamafactory_identity.json").read_text())[:30]
    task = write_jsonl(tmp_path / "identity.jsonl", identity)
    sources = (f"data.sources=[{{name: chat, path: {chat}, format: messages}}, "
               f"{{name: task, path: {task}, format: messages}}]")
    overrides = [sources, "train.max_length=64",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    for extra, says in (([], [f"{task}: line 1: ", "[data source 'task'; set data.on_bad_record=skip"]),
                        (["data.on_bad_record=skip"], ["data source 'task': no usable record out of 30 "
                                                       "({'missing_field': 30}); the first: " + f"{task}: line 1: "])):
        trained = _exit_message(prepare_main, overrides + extra)
        reported = _exit_message(data_main, ["quality", *overrides, *extra])
        assert trained.startswith("sftdist-prepare: error: ") and reported.startswith("sftdist-data: error: ")
        assert reported.removeprefix("sftdist-data: error: ") == trained.removeprefix("sftdist-prepare: error: ")
        for fragment in says + ["set data.sources.1.format=alpaca"]:
            assert fragment in reported, reported


def test_records_skipped_under_skip_are_counted_per_reason(tmp_path, demo_tokenizer):
    rows = synthetic()[:10] + [{"instruction": "Hi", "output": "Yo"}, {"messages": [{"role": "robot", "content": "x"}]}]
    cfg = DataConfig(sources=[DataSource(name="mine", path=write_jsonl(tmp_path / "s.jsonl", rows))],
                     on_bad_record="skip")
    report = quality_report(cfg, demo_tokenizer, max_length=64, seed=0)
    entry = report["sources"]["mine"]
    assert entry["train"]["records"] == 10 and entry["unreadable_reasons"] == {"missing_field": 1, "unknown_role": 1}
    assert ("skipped (data.on_bad_record=skip): mine: 2 records {'missing_field': 1, 'unknown_role': 1}"
            in quality_report_mod.format_report(report))
    with pytest.raises(DataError, match=r"s.jsonl: line 11: .*set data.sources.0.format=alpaca \[data source 'mine'"):
        quality_report(DataConfig(sources=cfg.sources), demo_tokenizer, max_length=64, seed=0)
