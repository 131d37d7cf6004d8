"""The data stage end to end on CPU: every file type, bad records (error names file and line; skip counts
per reason), truncation, eval splits, the on-disk cache, and docstring examples of the pure functions."""

import doctest
import json

import pytest

import sftdist.cluster.launch
import sftdist.data.audit
import sftdist.data.build
import sftdist.data.collate
import sftdist.data.loader
import sftdist.data.messages
import sftdist.data.prepare
import sftdist.data.reply_spans
import sftdist.data.split_turns
import sftdist.data.template_shape
import sftdist.data.tokenize
import sftdist.engine.loss
import sftdist.engine.optim
from sftdist.config import DataConfig, DataSource
from sftdist.data.build import build_datasets, prepare_all
from sftdist.data.demo import demo_conversations, demo_generic_texts
from sftdist.data.messages import DataError
from sftdist.data.tokenize import encode_conversation

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_cfg(tmp_path, *sources, **kw):
    return DataConfig(sources=list(sources), cache_dir=str(tmp_path / "cache"), **kw)


def build(cfg, tok, max_length=64):
    return build_datasets(cfg, tok, max_length=max_length, seed=0)


@pytest.mark.parametrize("bad,match,reason", [
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'robot'",
     "unknown_role"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn", "no_assistant_turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "string", "non_string_content"),
    ({"messages": []}, "empty", "empty_conversation"),
    ({"conversation": []}, "messages", "missing_field"),
])
def test_bad_record_names_file_and_line(tmp_path, demo_tokenizer, bad, match, reason):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError, match=match) as err:
        build(data_cfg(tmp_path, DataSource(name="mine", path=path)), demo_tokenizer)
    assert f"{path}: line 3" in str(err.value) and "data.on_bad_record=skip" in str(err.value)
    data = build(data_cfg(tmp_path, DataSource(name="mine", path=path), on_bad_record="skip"), demo_tokenizer)
    assert data.sources[0].stats["statuses"] == {"ok": 2, reason: 1} and len(data.sources[0].train) == 2


def test_invalid_json_line(tmp_path, demo_tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl: line 2: invalid JSON"):
        build(data_cfg(tmp_path, DataSource(name="b", path=str(path))), demo_tokenizer)
    data = build(data_cfg(tmp_path, DataSource(name="b", path=str(path)), on_bad_record="skip"), demo_tokenizer)
    assert data.sources[0].stats["statuses"] == {"ok": 2, "invalid_json": 1}


def test_missing_file_and_unsupported_type(tmp_path, demo_tokenizer):
    with pytest.raises(DataError, match="'gone'.*file not found"):
        build(data_cfg(tmp_path, DataSource(name="gone", path=str(tmp_path / "nope.jsonl"))), demo_tokenizer)
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(DataError, match="unsupported file type"):
        build(data_cfg(tmp_path, DataSource(name="x", path=str(tmp_path / "data.xml"))), demo_tokenizer)


def test_every_file_type_and_folders(tmp_path, demo_tokenizer):
    import datasets

    rows = [{"instruction": f"Say {w}", "input": "", "output": w.upper()} for w in ("a", "b", "c")]
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "part1.jsonl", rows[:2])
    (tmp_path / "d" / "part2.json").write_text(json.dumps(rows[2:]))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    (tmp_path / "t.txt").write_text("first document\n\nsecond document\n")
    sources = [DataSource(name="folder", path=str(tmp_path / "d"), format="alpaca"),
               DataSource(name="pq", path=str(tmp_path / "a.parquet"), format="alpaca"),
               DataSource(name="csv", path=str(tmp_path / "a.csv"), format="alpaca"),
               DataSource(name="txt", path=str(tmp_path / "t.txt"), format="text")]
    data = build(data_cfg(tmp_path, *sources), demo_tokenizer)
    assert [len(s.train) for s in data.sources] == [3, 3, 3, 2]
    assert data.sources[0].train["where"][2].endswith("part2.json: record 0")


def test_column_mapping(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Hi", "answer": "Hello."}])
    src = DataSource(name="q", path=path, format="prompt_completion", columns={"prompt": "question", "completion": "answer"})
    data = build(data_cfg(tmp_path, src), demo_tokenizer)
    ex = data.get(0, 0)
    assert demo_tokenizer.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]) == "Hello.<|im_end|>"


@pytest.mark.parametrize("truncation,statuses", [("truncate", {"ok": 1, "truncated": 1, "dropped_no_target": 1}),
                                                 ("drop", {"ok": 1, "dropped_too_long": 2})])
def test_truncation_modes_are_counted(tmp_path, demo_tokenizer, truncation, statuses):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    long_reply = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, long_prompt, long_reply])
    data = build(data_cfg(tmp_path, DataSource(name="c", path=path), truncation=truncation), demo_tokenizer, 32)
    assert data.sources[0].stats["statuses"] == statuses
    assert all(n <= 32 for n in data.sources[0].train["num_tokens"])


def test_cache_is_reused_and_invalidated(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 5)
    cfg = data_cfg(tmp_path, DataSource(name="c", path=path))
    (first,) = prepare_all(cfg, demo_tokenizer, max_length=64, seed=0)
    stamp = (first / "stats.json").stat().st_mtime_ns
    (second,) = prepare_all(cfg, demo_tokenizer, max_length=64, seed=0)
    assert second == first and (first / "stats.json").stat().st_mtime_ns == stamp  # not rebuilt
    (third,) = prepare_all(cfg, demo_tokenizer, max_length=32, seed=0)
    assert third != first  # another max_length is another entry
    write_jsonl(tmp_path / "c.jsonl", [GOOD] * 6)
    (fourth,) = prepare_all(cfg, demo_tokenizer, max_length=64, seed=0)
    assert fourth != first and json.loads((fourth / "stats.json").read_text())["kept"] == 6


def test_eval_fraction_and_eval_path(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 20)
    data = build(data_cfg(tmp_path, DataSource(name="c", path=path, eval_fraction=0.25)), demo_tokenizer)
    assert (len(data.sources[0].train), len(data.sources[0].eval)) == (15, 5)
    other = write_jsonl(tmp_path / "e.jsonl", [GOOD] * 3)
    data = build(data_cfg(tmp_path, DataSource(name="c", path=path, eval_path=other)), demo_tokenizer)
    assert (len(data.sources[0].train), len(data.sources[0].eval)) == (20, 3)


def test_tiny_eval_splits_get_one_warning_per_source_in_the_run_log(shared_dir, tmp_path, demo_tokenizer, capsys):
    """The issue's case: ``eval_fraction: 0.02`` of the 91-record identity set holds 2 records. Each source
    whose eval split is under 20 records or 1,000 supervised tokens gets one line, logged with the data
    stage's other warnings (``log``: rank 0 only), naming the source, its counts and the fix."""
    from sftdist.data.build import build_schedule, mix_report
    from sftdist.lifecycle.startup import log_data_report

    sets = shared_dir / "datasets"
    identity = json.loads((sets / "llamafactory_identity.json").read_text())
    sources = [DataSource(name="identity", path=str(sets / "llamafactory_identity.json"), format="alpaca",
                          eval_fraction=0.02),
               DataSource(name="alpaca", path=str(sets / "llamafactory_alpaca_en_demo.json"), format="alpaca",
                          max_samples=300, eval_fraction=0.1),
               DataSource(name="held", path=write_jsonl(tmp_path / "train.jsonl", identity[:40]), format="alpaca",
                          eval_path=write_jsonl(tmp_path / "held.jsonl", identity[40:43])),
               DataSource(name="small", path=write_jsonl(tmp_path / "small.jsonl", identity[:10]), format="alpaca",
                          eval_fraction=0.1)]
    cfg = data_cfg(tmp_path, *sources)
    data = build(cfg, demo_tokenizer, 512)
    assert [len(s.eval) for s in data.sources] == [2, 30, 3, 1]
    assert data.sources[1].stats["eval"]["supervised_tokens"] >= 1000  # 30 alpaca replies: large enough
    tokens = [s.stats["eval"]["supervised_tokens"] for s in data.sources]
    expected = [(f"data source 'identity': its eval split has only 2 records and {tokens[0]:,} supervised tokens, "
                 f"too few for its eval loss to mean anything (under 20 records or 1,000 supervised tokens): raise "
                 f"data.sources.0.eval_fraction (0.02 of 91 records; about "),
                f"data source 'held': its eval split has only 3 records and {tokens[2]:,} supervised tokens, ",
                f"data source 'small': its eval split has only 1 record and {tokens[3]:,} supervised tokens, "]
    small = [w for w in data.warnings if "eval split" in w]
    assert len(small) == 3 and all(w.startswith(e) for w, e in zip(small, expected)), small
    assert small[1].endswith(f": add held-out records to data.sources.2.eval_path={tmp_path / 'held.jsonl'}, or "
                             f"hold out a share of the training file with data.sources.2.eval_fraction instead")
    assert small[2].endswith(f": {tmp_path / 'small.jsonl'} holds only 10 records; set data.sources.3.eval_path "
                             f"to a separate held-out file")
    capsys.readouterr()
    log_data_report(data, mix_report(data, build_schedule(data, cfg, seed=0, global_batch_size=4, max_length=512)))
    logged = [line for line in capsys.readouterr().out.splitlines() if "eval split" in line]
    assert [line.split("] ", 1)[1] for line in logged] == [f"warning: {w}" for w in small]


def test_demo_mix_builds(tmp_path, demo_tokenizer):
    cfg = data_cfg(tmp_path, DataSource(name="chat", path="builtin:demo_chat", weight=0.9),
                   DataSource(name="gen", path="builtin:demo_generic", format="text", weight=0.1))
    data = build(cfg, demo_tokenizer, 256)
    assert [s.stats["kept"] for s in data.sources] == [600, 200]
    assert data.sources[0].stats["audited"] == 32
    assert data.get(1, 0)["source"] == 1 and data.get(1, 0)["labels"] == data.get(1, 0)["input_ids"]


def test_demo_data_is_deterministic_and_varied():
    convs = demo_conversations()
    assert convs == demo_conversations() and len(convs) == 600
    assert any(len(c["messages"]) > 3 for c in convs) and any(c["messages"][0]["role"] == "system" for c in convs)
    assert demo_generic_texts() == demo_generic_texts()


@pytest.mark.parametrize("module", [sftdist.data.audit, sftdist.data.build, sftdist.data.collate, sftdist.data.loader,
                                    sftdist.data.messages, sftdist.data.prepare, sftdist.data.tokenize,
                                    sftdist.data.reply_spans, sftdist.data.split_turns,
                                    sftdist.data.template_shape, sftdist.engine.loss, sftdist.engine.optim,
                                    sftdist.cluster.launch])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_template_without_end_of_turn_token_is_refused_or_trains_with_a_warning(tmp_path, demo_tokenizer):
    import copy

    tok = copy.deepcopy(demo_tokenizer)
    # Nothing special follows a reply: masks are still exact, but the model would never learn to stop.
    tok.chat_template = ("{%- for m in messages %}{{- m['role'] + ':\\n' + m['content'] + '\\n\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- 'assistant:\\n' }}{%- endif %}")
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 3)
    with pytest.raises(DataError, match="renders no end-of-turn token.*data.require_end_of_turn=false") as e:
        build(data_cfg(tmp_path, DataSource(name="c", path=path)), tok)
    assert e.value.reason == "no_end_of_turn" and not (tmp_path / "cache").exists()  # before any tokenising
    data = build(data_cfg(tmp_path, DataSource(name="c", path=path), require_end_of_turn=False), tok)
    assert data.sources[0].stats["audited"] == 3
    assert len(data.warnings) == 1 and "has no end-of-turn token" in data.warnings[0]
    row = data.get(0, 0)
    supervised = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.decode(supervised).strip() == GOOD["messages"][-1]["content"]


def test_mask_audit_names_the_template_and_rule(tmp_path, demo_tokenizer, monkeypatch):
    """A wrong mask (here: an encoder that forgets the end-of-turn token) stops the run before training."""
    import sftdist.data.split_turns as split_turns  # the audit encodes each sample through it

    def forgetful(tokenizer, messages, **kw):
        enc = encode_conversation(tokenizer, messages, **kw)
        labels = list(enc["labels"])
        last = max(i for i, lab in enumerate(labels) if lab != -100)
        labels[last] = -100
        return {**enc, "labels": labels}

    monkeypatch.setattr(split_turns, "encode_conversation", forgetful)
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD] * 3)
    with pytest.raises(DataError, match=r"mask audit failed for data source 'c', .*c.jsonl: line \d.*"
                                        r"rule end_of_turn_trained: token \d+ '<\|im_end\|>' is not supervised "
                                        r"\[ChatML/Qwen template"):
        build(data_cfg(tmp_path, DataSource(name="c", path=path)), demo_tokenizer)


def test_the_tokenizer_is_never_hashed_for_a_datasets_fingerprint(tmp_path, demo_tokenizer, monkeypatch):
    """sftdist keys its own cache; letting datasets pickle and hash the tokenizer for each map's fingerprint
    cost more than tokenising 1,000 alpaca records."""
    from datasets.fingerprint import Hasher
    from transformers import PreTrainedTokenizerBase

    hashed = []
    original = Hasher.hash.__func__

    def watching(cls, value):
        values = value.values() if isinstance(value, dict) else [value]
        hashed.extend(v for v in values if isinstance(v, PreTrainedTokenizerBase))
        return original(cls, value)

    monkeypatch.setattr(Hasher, "hash", classmethod(watching))
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 20)
    prepare_all(data_cfg(tmp_path, DataSource(name="a", path=path), num_proc=1), demo_tokenizer, max_length=64,
                seed=0)
    assert hashed == []


def test_tokenisation_workers_follow_the_cpus_this_process_may_use():
    """A SLURM job given 2 CPUs of a 64-core node starts 2 workers, not 8 (#27): the affinity mask counts."""
    import os

    from sftdist.data.prepare import default_num_proc

    cpus = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cpus)})
        assert default_num_proc(DataConfig()) == 1
    finally:
        os.sched_setaffinity(0, cpus)
    assert default_num_proc(DataConfig(num_proc=3)) == 3
