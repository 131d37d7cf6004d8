"""The data stage's preparation at scale (#27): flat memory however many records, the mask audit once per node
and kept with the cache entry, a batched encoder that gives exactly the per-record samples, workers that give
the same entry, a bad record deep in a large file, and folder sources whose shards disagree."""

import json
import random
import sys
import textwrap

import pytest

import sftdist.data.audit
import sftdist.data.sources
from sftdist.config import DataConfig, DataSource
from sftdist.data.build import build_datasets, prepare_all
from sftdist.data.demo import demo_conversations
from sftdist.data.encode import encode_record, encode_records
from sftdist.data.messages import DataError
from sftdist.data.prepare import prepare_source
from sftdist.data.sources import check_shard_columns, source_files
from sftdist.data.tokenize import encode_conversation
from tests.conftest import run_cmd

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def prepare(tmp_path, tok, source, **kw):
    cfg = DataConfig(sources=[source], cache_dir=str(tmp_path / "cache"), **kw)
    return prepare_source(source, cfg, tok, max_length=64, seed=0)


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from sftdist.config import DataConfig, DataSource, ModelConfig
    from sftdist.data.prepare import prepare_source
    from sftdist.engine.model import load_tokenizer

    def peak_mib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

    def reset_peak():
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
        except OSError:
            pass  # then the runs' order (small first) still shows growth

    tok = load_tokenizer(ModelConfig(tokenizer="builtin:demo", from_config={"model_type": "llama"}))
    out = {}
    for path in sys.argv[2:]:
        source = DataSource(name=Path(path).stem, path=path, format="text", eval_fraction=0.01)
        cfg = DataConfig(sources=[source], cache_dir=sys.argv[1], num_proc=1)
        reset_peak()
        before = peak_mib()
        prepare_source(source, cfg, tok, max_length=32, seed=0)
        out[path] = peak_mib() - before
    print(json.dumps(out))
""")


def test_peak_memory_does_not_grow_with_the_number_of_records(tmp_path):
    """Preparing 10x the records (here 10 x 6 MiB of JSON Lines) takes no more memory: records are streamed
    into Arrow files in bounded batches, never held in Python lists (before: ~7x the file, 390 MiB here)."""
    pad = "x" * 30_000  # a column the encoder never reads: the raw record is what used to be held
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": f"doc {i}", "id": pad} for i in range(200)])
    large = write_jsonl(tmp_path / "large.jsonl", [{"text": f"doc {i}", "id": pad} for i in range(2_000)])
    array = tmp_path / "array.json"  # one JSON array: read a window at a time, not parsed whole
    array.write_text(json.dumps([{"text": f"doc {i}", "id": pad} for i in range(2_000)], indent=1))
    proc = run_cmd([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "cache"), small, large, str(array)],
                   timeout=300)
    growth = json.loads(proc.stdout.strip().splitlines()[-1])  # the small run also pays the lazy imports
    large_mib = (tmp_path / "large.jsonl").stat().st_size / 2**20
    assert large_mib > 55
    # The peak while preparing 60 MiB: not the file, by far (before: +343 MiB for the JSON Lines file).
    assert growth[large] < 0.25 * large_mib and growth[str(array)] < 0.25 * large_mib, growth


def test_bad_record_deep_in_a_large_file_names_its_line(tmp_path, demo_tokenizer):
    rows = [{"text": f"doc {i}"} for i in range(50_000)]
    rows[49_989] = '{"text": "doc", '  # line 49,990
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with pytest.raises(DataError) as e:
        prepare(tmp_path, demo_tokenizer, DataSource(name="big", path=path, format="text"))
    assert str(e.value).startswith(f"{path}: line 49990: invalid JSON: ") and e.value.reason == "invalid_json"
    assert "data.on_bad_record=skip" in str(e.value)
    d = prepare(tmp_path, demo_tokenizer, DataSource(name="big", path=path, format="text"), on_bad_record="skip")
    stats = json.loads((d / "stats.json").read_text())
    assert stats["records"] == 50_000 and stats["statuses"] == {"ok": 49_999, "invalid_json": 1}


def test_shards_that_disagree_on_columns_are_refused_naming_the_shard(tmp_path, demo_tokenizer):
    folder = tmp_path / "chats"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [GOOD] * 3)
    write_jsonl(folder / "b.jsonl", [GOOD, {"conversations": [], "id": 1}])  # only a shard's first record counts
    write_jsonl(folder / "c.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}], "id": 1}])
    with pytest.raises(DataError) as e:
        prepare(tmp_path, demo_tokenizer, DataSource(name="chats", path=str(folder)))
    assert e.value.reason == "shard_columns"
    assert f"shard {folder / 'c.jsonl'} has columns ['conversations', 'id']" in str(e.value)
    assert f"first shard {folder / 'a.jsonl'} has ['messages']" in str(e.value)
    assert not list((tmp_path / "cache").glob("chats-*"))  # nothing cached, nothing tokenised


def test_parquet_and_json_shards_are_compared_by_their_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.table({"instruction": ["a"], "output": ["b"]}), folder / "a.parquet")
    (folder / "b.json").write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}))
    check_shard_columns(source_files(str(folder)), "mixed")  # the same columns: fine
    pq.write_table(pa.table({"instruction": ["a"], "response": ["b"]}), folder / "c.parquet")
    with pytest.raises(DataError, match=r"shard .*c\.parquet has columns \['instruction', 'response'\].*"
                                        r"\['response'\] only in .*c\.parquet, \['output'\] only in the first"):
        check_shard_columns(source_files(str(folder)), "mixed")


def test_the_audit_verdict_is_kept_and_a_warm_start_reads_no_record(tmp_path, demo_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 5)
    cfg = DataConfig(sources=[DataSource(name="c", path=path)], cache_dir=str(tmp_path / "cache"), audit_samples=3)
    dirs = prepare_all(cfg, demo_tokenizer, max_length=64, seed=0)
    assert json.loads((dirs[0] / "audit.json").read_text()) == {
        "samples=3,seed=0,train_on=assistant,split_turns=auto": 3}

    def no_reading(*a, **kw):
        raise AssertionError("the source file was read")

    monkeypatch.setattr(sftdist.data.audit, "read_records", no_reading)
    monkeypatch.setattr(sftdist.data.sources, "read_records", no_reading)
    (tmp_path / "c.jsonl").unlink()  # every rank: cache entry and verdict only
    data = build_datasets(cfg, demo_tokenizer, max_length=64, seed=0, dirs=dirs)
    assert data.sources[0].stats["audited"] == 3 and len(data.sources[0].train) == 5


def test_new_audit_settings_audit_the_cached_entry_once_reading_only_the_first_records(
        tmp_path, demo_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 500)
    source = DataSource(name="c", path=path)
    d = prepare(tmp_path, demo_tokenizer, source, audit_samples=2)
    read = []
    original = sftdist.data.audit.read_records

    def counting(*a, **kw):
        for record in original(*a, **kw):
            read.append(record)
            yield record

    monkeypatch.setattr(sftdist.data.audit, "read_records", counting)
    assert prepare(tmp_path, demo_tokenizer, source, audit_samples=4) == d  # the same entry, audited now
    assert len(read) == 80  # 4 * 20, not the file's 500
    assert set(json.loads((d / "audit.json").read_text())) == {
        "samples=2,seed=0,train_on=assistant,split_turns=auto", "samples=4,seed=0,train_on=assistant,split_turns=auto"}
    prepare(tmp_path, demo_tokenizer, source, audit_samples=4)
    assert len(read) == 80  # kept: not audited again


def forgetful(tokenizer, messages, **kw):
    """An encoder that forgets to train the last end-of-turn token (the audit must catch it)."""
    enc = encode_conversation(tokenizer, messages, **kw)
    labels = list(enc["labels"])
    labels[max(i for i, lab in enumerate(labels) if lab != -100)] = -100
    return {**enc, "labels": labels}


def test_a_failed_audit_leaves_nothing_a_rerun_would_trust(tmp_path, demo_tokenizer, monkeypatch):
    import sftdist.data.split_turns as split_turns  # the audit encodes each sample through it

    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 3)
    source = DataSource(name="c", path=path)
    monkeypatch.setattr(split_turns, "encode_conversation", forgetful)
    with pytest.raises(DataError, match="mask audit failed for data source 'c'") as e:
        prepare(tmp_path, demo_tokenizer, source)
    assert e.value.reason == "mask_audit" and not list((tmp_path / "cache").iterdir())  # no entry, no leftovers
    monkeypatch.undo()
    d = prepare(tmp_path, demo_tokenizer, source, audit_samples=2)
    monkeypatch.setattr(split_turns, "encode_conversation", forgetful)
    for _ in range(2):  # a cached entry under new audit settings: the failure is never kept
        with pytest.raises(DataError, match="mask audit failed"):
            prepare(tmp_path, demo_tokenizer, source, audit_samples=3)
    assert list(json.loads((d / "audit.json").read_text())) == ["samples=2,seed=0,train_on=assistant,split_turns=auto"]


@pytest.mark.parametrize("split_turns", ["auto", "always"])
def test_the_batched_encoder_gives_exactly_the_per_record_samples(demo_tokenizer, split_turns):
    records = [json.dumps(c) for c in demo_conversations()[:150]]
    records += ['{"messages": [', json.dumps({"messages": []}), {"messages": [{"role": "user", "content": "q"}]},
                json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})]
    wheres = [f"c.jsonl: line {i + 1}" for i in range(len(records))]
    kw = dict(fmt="messages", columns={}, train_on="assistant", max_length=48, truncation="truncate",
              tokenizer=demo_tokenizer, split_turns=split_turns)
    batched = encode_records(records, wheres, **kw)
    assert batched == [encode_record(r, w, **kw) for r, w in zip(records, wheres)]
    assert {s["status"] for r in batched for s in r} >= {"ok", "truncated", "invalid_json", "empty_conversation",
                                                          "no_assistant_turn", "unknown_role"}
    assert encode_record(GOOD, "x", **kw) == encode_record(json.dumps(GOOD), "x", **kw)  # a dict or its JSON


def test_workers_build_the_entry_one_process_builds(tmp_path, demo_tokenizer):
    rows = [c for c in demo_conversations()] * 2  # 1,200 records: 2 workers
    rows[700] = {"messages": []}
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    source = DataSource(name="c", path=path, eval_fraction=0.05)
    import datasets

    entries = []
    for procs in (1, 2):
        cfg = DataConfig(sources=[source], cache_dir=str(tmp_path / f"cache{procs}"), num_proc=procs,
                         on_bad_record="skip", audit_samples=0)
        d = prepare_source(source, cfg, demo_tokenizer, max_length=64, seed=0)
        entries.append([json.loads((d / "stats.json").read_text())] +
                       [datasets.load_from_disk(str(d / s)).to_dict() for s in ("train", "eval")])
    assert entries[0] == entries[1]
    stats, train, evaluation = entries[0]
    assert stats["records"] == 1140 and stats["eval"]["records"] == 60 and stats["statuses"]["empty_conversation"] == 1
    held = sorted(random.Random("eval:0:c").sample(range(1200), 60))  # the records chosen before #27
    assert evaluation["where"] == [f"{path}: line {i + 1}" for i in held]
    assert list(train) == ["where", "input_ids", "labels", "num_tokens", "num_supervised"]


def test_max_samples_caps_the_records_read(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 40)
    d = prepare(tmp_path, demo_tokenizer, DataSource(name="c", path=path, max_samples=7))
    assert json.loads((d / "stats.json").read_text())["records"] == 7
    assert not list(d.glob("raw*.arrow"))  # the raw records are gone once encoded


def test_batched_text_records_are_the_per_record_ones(demo_tokenizer):
    rows = [{"text": "Rain falls."}, '{"text": ', {"text": 3}, {"body": "x"}, {"text": "Snow " * 40}]
    wheres = [f"t.jsonl: line {i + 1}" for i in range(len(rows))]
    kw = dict(fmt="text", columns={}, train_on="all", max_length=16, truncation="truncate", tokenizer=demo_tokenizer)
    assert encode_records(rows, wheres, **kw) == [encode_record(r, w, **kw) for r, w in zip(rows, wheres)]


def test_dedup_counts_duplicates_per_split_beside_unparsed_bad_lines(tmp_path, demo_tokenizer):
    other = {"messages": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey."}]}
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, GOOD, '{"messages": [', other, GOOD])
    d = prepare(tmp_path, demo_tokenizer, DataSource(name="c", path=path), dedup="exact", on_bad_record="skip")
    assert json.loads((d / "stats.json").read_text())["statuses"] == {"ok": 2, "dropped_duplicate": 2,
                                                                      "invalid_json": 1}


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_a_json_array_is_read_a_window_at_a_time_with_the_whole_file_readers_results(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sftdist.data.sources, "_CHUNK", chunk)
    whole = []
    original = sftdist.data.sources._read_json_whole
    monkeypatch.setattr(sftdist.data.sources, "_read_json_whole", lambda f: whole.append(f) or original(f))
    files = {"records": json.dumps([{"a": i, "b": [1, {"c": "]"}], "n": 12345678901} for i in range(40)], indent=2),
             "numbers": "[" + ", ".join(str(10 ** (i % 12)) for i in range(40)) + "]", "empty": " [ \n ] \n"}
    for name, text in files.items():
        (tmp_path / f"{name}.json").write_text(text)
        got = list(sftdist.data.sources.read_json_file(tmp_path / f"{name}.json"))
        assert got == [(f"{tmp_path / name}.json: record {i}", r) for i, r in enumerate(json.loads(text))]
    assert whole == []  # nothing was parsed whole
    for text, error in [('[{"a": 1}, {"a": 2,}]', "line 1 column 20: Expecting property name"),
                        ('[{"a": 1}]\n[{"a": 2}]\n', "line 2 column 1: Extra data")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=f"bad.json: invalid JSON at {error}"):
            list(sftdist.data.sources.read_json_file(tmp_path / "bad.json"))
