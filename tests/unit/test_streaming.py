"""Streaming sources (``streaming: true``), without a process group: each rank reads a disjoint share of the
records, a position taken anywhere resumes the same records, the mixer holds the weights, packed rows fit, and
a whole pipeline resumed from its state gives exactly the rows the uninterrupted one gives."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftdist.config import ConfigError, DataConfig, DataSource
from sftdist.data.messages import DataError
from sftdist.data.stream_reader import RecordReader, stream_files
from sftdist.data.streaming import StreamFeed, StreamMix, StreamedBatches, pack_samples, unpack_samples


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chats(n, start=0):
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i} " + "word " * (i % 7)}]}
            for i in range(start, start + n)]


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture
def shards(tmp_path):
    """Three shards of three formats: 7 JSONL lines (one blank), 5 Parquet rows in 2 row groups, a JSON array."""
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats(3)) + "\n"
                               + "".join(json.dumps(r) + "\n" for r in chats(4, 3)))
    pq.write_table(pa.Table.from_pylist([{"messages": c["messages"]} for c in chats(5, 10)]), d / "b.parquet",
                   row_group_size=3)
    (d / "c.json").write_text(json.dumps(chats(4, 20)))
    return d


def content(row):
    return row["messages"][0]["content"]


def test_ranks_read_disjoint_shares_that_cover_every_record_once_per_pass(shards):
    source = DataSource(name="s", path=str(shards), streaming=True)
    per_rank = []
    for part in range(2):
        reader = RecordReader(source, seed=3, part=part, parts=2)
        it = iter(reader)
        rows = []
        while True:
            where, row = next(it)
            if reader.position["epoch"] > 0:
                break
            rows.append(content(row))
        per_rank.append(rows)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"question {i}" for i in [*range(7), *range(10, 15),
                                                                                  *range(20, 24)])
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


@pytest.mark.parametrize("cut", [1, 4, 6, 9, 13])
def test_a_position_taken_anywhere_resumes_the_same_records(shards, cut):
    source = DataSource(name="s", path=str(shards / "*"), streaming=True)
    whole = RecordReader(source, seed=0, part=1, parts=2)
    ref = [(w, content(r)) for w, r in take(iter(whole), 20)]  # into the second pass
    first = RecordReader(source, seed=0, part=1, parts=2)
    it = iter(first)
    got = [(w, content(r)) for w, r in take(it, cut)]
    state = json.loads(json.dumps(first.state_dict()))  # (what a checkpoint keeps survives a round trip)
    resumed = RecordReader(source, seed=0, part=1, parts=2)
    resumed.load_state_dict(state)
    got += [(w, content(r)) for w, r in take(iter(resumed), 20 - cut)]
    assert got == ref
    assert any("row" in w for w, _ in ref) and any("record" in w for w, _ in ref) and any("line" in w for w, _ in ref)


def test_passes_reshuffle_the_shards_and_max_samples_caps_a_pass(shards):
    reader = RecordReader(DataSource(name="s", path=str(shards), streaming=True), seed=1, part=0, parts=1)
    orders = {tuple(f.name for f in reader.file_order(e)) for e in range(6)}
    assert len(orders) > 1
    capped = RecordReader(DataSource(name="s", path=str(shards), streaming=True, max_samples=5), seed=1, part=0,
                          parts=1)
    it = iter(capped)
    first_pass = []
    while capped.position["epoch"] == 0:
        first_pass.append(next(it))
    assert len(first_pass) == 6  # 5 in the first pass, then the first of the second


def test_bad_input_names_the_path_or_the_line(tmp_path):
    with pytest.raises(DataError, match="no files match"):
        stream_files(DataSource(name="s", path=str(tmp_path / "none*.jsonl"), streaming=True))
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(DataError, match=r"x.csv: cannot stream \.csv"):
        stream_files(DataSource(name="s", path=str(tmp_path / "x.csv"), streaming=True))
    lines = [json.dumps(c) for c in chats(3000)]
    lines[2716] = '{"messages": [oops'
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    reader = RecordReader(DataSource(name="s", path=str(tmp_path / "big.jsonl"), streaming=True), seed=0, part=0,
                          parts=1)
    bad = next((w, r) for w, r in reader if isinstance(r, DataError))
    assert bad[0].endswith("big.jsonl: line 2717") and "invalid JSON" in str(bad[1])


def test_streaming_config_rules():
    with pytest.raises(ConfigError, match="eval_path"):
        DataSource(name="s", path="x.jsonl", streaming=True, eval_fraction=0.1)
    with pytest.raises(ConfigError, match="data.dedup=exact"):
        DataConfig(sources=[DataSource(name="s", path="x.jsonl", streaming=True)], dedup="exact")


class CountingFeed:
    """Samples of length ``length(i)`` with ``supervised`` targets, numbered; a stand-in for a source."""

    def __init__(self, index, lengths, supervised=1):
        self.index, self.lengths, self.supervised, self.i = index, lengths, supervised, 0

    def next_samples(self):
        n = self.lengths[self.i % len(self.lengths)]
        self.i += 1
        return [{"input_ids": [self.index * 1000 + self.i] * n, "labels": [-100] + [1] * (n - 1), "source": self.index,
                 "num_supervised": self.supervised}]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def mix_of(feeds, weights, **kw):
    args = dict(mix_by="samples", packing=False, max_length=64, buffer_size=8, seed=0, part=0) | kw
    return StreamMix(feeds, weights, **args)


def test_the_mixer_holds_the_weights_by_samples_and_by_tokens():
    mix = mix_of([CountingFeed(0, [4]), CountingFeed(1, [4])], [3, 1])
    drawn = [s["source"] for _ in range(400) for s in mix.next_row()]
    assert drawn.count(0) / len(drawn) == pytest.approx(0.75, abs=8 / 400)  # within the buffer's window
    # By supervised tokens: source 1's samples carry 4x the tokens, so weights 1:1 draw 4x as many of source 0.
    mix = mix_of([CountingFeed(0, [4], supervised=2), CountingFeed(1, [4], supervised=8)], [1, 1], mix_by="tokens")
    rows = [s for _ in range(500) for s in mix.next_row()]
    tokens = [sum(s["num_supervised"] for s in rows if s["source"] == k) for k in (0, 1)]
    assert tokens[0] / sum(tokens) == pytest.approx(0.5, abs=0.03)
    assert mix.delivered[0] == pytest.approx(mix.delivered[1], abs=8)  # exact at the mixer, one sample apart


def test_packed_rows_fit_and_are_full():
    mix = mix_of([CountingFeed(0, [5, 17, 30, 9, 60, 2])], [1], packing=True, buffer_size=32)
    rows = [mix.next_row() for _ in range(200)]
    widths = [sum(len(s["input_ids"]) for s in r) for r in rows]
    assert max(widths) <= 64 and sum(widths) / len(widths) > 0.9 * 64
    mix = mix_of([CountingFeed(0, [5])], [1], buffer_size=4)
    assert all(len(mix.next_row()) == 1 for _ in range(10))  # no packing: one sample per row


def test_a_pipeline_resumed_from_its_state_gives_the_same_batches():
    def batches():
        mix = mix_of([CountingFeed(0, [5, 17, 30, 9]), CountingFeed(1, [12, 3])], [1, 2], packing=True,
                     buffer_size=16, mix_by="tokens")
        return StreamedBatches(mix, rows_per_rank=4, micro_batch_size=2, pad_id=0, packed=True)

    ref = batches()
    expected = [ref.micro_batches(s) for s in range(6)]
    first = batches()
    for s in range(3):
        first.micro_batches(s)
    assert first.micro_batches(2) is first.micro_batches(2)  # start-up's peek gets the loop's own batches
    state = first.state_dict()
    resumed = batches()
    resumed.load_state_dict(state)
    with pytest.raises(RuntimeError, match="in order"):
        resumed.micro_batches(5)
    for s in range(3, 6):
        for got, want in zip(resumed.micro_batches(s), expected[s]):
            assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)


def test_buffered_samples_round_trip():
    samples = [{"input_ids": [random.randrange(99) for _ in range(n)], "labels": [-100] * n, "source": n % 2,
                "num_supervised": n} for n in (3, 1, 7)]
    assert unpack_samples(pack_samples(samples)) == samples
    assert unpack_samples(pack_samples([])) == []


def test_a_streamed_bad_record_is_an_error_naming_its_line_or_is_skipped_and_counted(tmp_path, demo_tokenizer):
    rows = chats(50)
    rows[31] = {"messages": [{"role": "robot", "content": "x"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    source = DataSource(name="chat", path=str(path), streaming=True)
    encode = dict(fmt="messages", columns={}, train_on="assistant", max_length=64, truncation="truncate",
                  tokenizer=demo_tokenizer, source_key="data.sources.0", split_turns="auto")

    def feed(on_bad):
        return StreamFeed(0, source, RecordReader(source, seed=0, part=0, parts=1), encode, on_bad)

    strict = feed("error")
    with pytest.raises(DataError, match=r"chat.jsonl: line 32: .*unknown role 'robot'.*data.on_bad_record=skip"):
        for _ in range(50):
            strict.next_samples()
    lenient = feed("skip")
    for _ in range(60):
        lenient.next_samples()
    assert lenient.statuses["unknown_role"] == 1 and lenient.statuses["ok"] == 60  # 50 + 10 of the next pass


def test_shards_that_disagree_on_columns_are_refused_naming_the_shard(tmp_path, demo_tokenizer):
    from sftdist.data.build import prepare_stream_eval

    write_jsonl(tmp_path / "a.jsonl", chats(3))
    write_jsonl(tmp_path / "b.jsonl", [{"conversations": [], "id": 1}])
    cfg = DataConfig(sources=[DataSource(name="s", path=str(tmp_path / "*.jsonl"), streaming=True)])
    with pytest.raises(DataError, match=r"shard \S+b.jsonl has columns \['conversations', 'id'\]"):
        prepare_stream_eval(cfg.sources[0], cfg, demo_tokenizer, max_length=64, seed=0)


def test_a_hub_stream_resumes_from_the_datasets_state(tmp_path):
    """The hub path (``datasets`` streaming, split by rank), on a local JSON builder: no network here."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    from sftdist.data.stream_reader import hub_records

    write_jsonl(tmp_path / "a.jsonl", chats(9))

    def share():
        ds = datasets.load_dataset("json", data_files=str(tmp_path / "a.jsonl"), split="train", streaming=True)
        return split_dataset_by_node(ds, rank=1, world_size=2)

    position = {"epoch": 0, "n": 0, "hub": None}
    ref = [content(r) for _, r in hub_records(share(), dict(position), "a", None)]
    assert ref == [f"question {i}" for i in (1, 3, 5, 7)]
    first = dict(position)
    it = hub_records(share(), first, "a", None)
    got = [content(next(it)[1]) for _ in range(2)]
    resumed = json.loads(json.dumps(first))
    got += [content(r) for _, r in hub_records(share(), resumed, "a", None)]
    assert got == ref
    assert [content(r) for _, r in hub_records(share(), dict(position), "a", 3)] == ref[:3]  # max_samples


def test_the_data_tools_read_a_stream_as_its_first_records(tmp_path, capsys):
    """``sftdist data inspect`` and ``quality`` on a streaming source (a glob of two shards) read its first
    1,000 records (``STREAM_SAMPLE_RECORDS``), in file order, and say so."""
    from sftdist.tools.data_cli import data_main

    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", chats(700))
    write_jsonl(d / "b.jsonl", chats(700, 700))
    data = [f"data.sources=[{{name: web, path: '{d}/*.jsonl', format: messages, streaming: true}}]",
            f"data.cache_dir={tmp_path / 'cache'}", "train.max_length=64"]
    data_main(["inspect", "--n", "1", "--color", "never", *data])
    out, err = capsys.readouterr()
    assert "data source 'web' streams: read as its first 1000 records" in err
    assert "=== web #0" in out and "question 0" in out
    data_main(["quality", "--json", str(tmp_path / "q.json"), *data])
    report = json.loads((tmp_path / "q.json").read_text())["sources"]["web"]["train"]
    assert report["records"] == 1000, report.keys()
