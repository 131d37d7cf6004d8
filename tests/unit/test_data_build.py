"""Loading and validating sources: bad records fail with the file and record named; the demo assets are
deterministic; the docstring examples of the pure data functions hold."""

import doctest
import json

import pytest

import sftdist.data.collate
import sftdist.data.loader
import sftdist.data.messages
import sftdist.launch
import sftdist.loss
import sftdist.optim
from sftdist.config import DataConfig, DataSource
from sftdist.data import DataError, build_datasets
from sftdist.data.demo import demo_conversations, demo_generic_texts


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize("bad,match", [
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "content must be a string"),
    ({"messages": []}, "non-empty 'messages'"),
    ({"conversation": []}, "non-empty 'messages'"),
])
def test_bad_record_names_file_and_record(tmp_path, demo_tokenizer, bad, match):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, bad])
    cfg = DataConfig(sources=[DataSource(name="mine", path=path, format="messages")])
    with pytest.raises(DataError, match=match) as err:
        build_datasets(cfg, demo_tokenizer, max_length=64)
    assert f"{path}: record 2" in str(err.value)


def test_missing_file_and_wrong_extension(tmp_path, demo_tokenizer):
    cfg = DataConfig(sources=[DataSource(name="gone", path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(DataError, match="'gone'.*file not found"):
        build_datasets(cfg, demo_tokenizer, max_length=64)
    (tmp_path / "data.parquet").write_text("x")
    cfg = DataConfig(sources=[DataSource(name="pq", path=str(tmp_path / "data.parquet"))])
    with pytest.raises(DataError, match="expected a .jsonl or .json"):
        build_datasets(cfg, demo_tokenizer, max_length=64)


def test_broken_json_names_file(tmp_path, demo_tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    cfg = DataConfig(sources=[DataSource(name="b", path=str(path))])
    with pytest.raises(DataError, match="cannot read .*broken.jsonl"):
        build_datasets(cfg, demo_tokenizer, max_length=64)


def test_truncation_and_drop_are_counted(tmp_path, demo_tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    long_reply = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, long_prompt, long_reply])
    data = build_datasets(DataConfig(sources=[DataSource(name="c", path=path)]), demo_tokenizer, max_length=32)
    assert data.stats[0] | {"tokens": 0, "supervised_tokens": 0} == {
        "source": "c", "records": 2, "truncated": 2, "dropped_no_target": 1, "tokens": 0, "supervised_tokens": 0}
    assert all(len(e["input_ids"]) <= 32 for e in data.examples[0])


def test_demo_mix_builds(demo_tokenizer):
    cfg = DataConfig(sources=[DataSource(name="chat", path="builtin:demo_chat", weight=0.9),
                              DataSource(name="gen", path="builtin:demo_generic", format="text", weight=0.1)])
    data = build_datasets(cfg, demo_tokenizer, max_length=256)
    assert [s["records"] for s in data.stats] == [600, 200]
    assert data.get(1, 0)["source"] == 1 and data.get(1, 0)["labels"] == data.get(1, 0)["input_ids"]


def test_demo_data_is_deterministic_and_varied():
    convs = demo_conversations()
    assert convs == demo_conversations() and len(convs) == 600
    assert any(len(c["messages"]) > 3 for c in convs) and any(c["messages"][0]["role"] == "system" for c in convs)
    assert demo_generic_texts() == demo_generic_texts()


@pytest.mark.parametrize("module", [sftdist.data.collate, sftdist.data.loader, sftdist.data.messages,
                                    sftdist.loss, sftdist.optim, sftdist.launch])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
