"""A record of another format than the configured one: the error names the fix, the format the record
looks like with the source's own config path (never a wrong column mapping), checked on real records of
every format in ../shared/datasets; a column mapping only for a field that looks renamed."""

import doctest
import json

import pytest

import sftdist.data.detect
from sftdist.data.messages import FORMATS, DataError, to_conversation, to_text

# One real file per format. No shared set is prompt/completion: its records are alpaca records' own
# instruction and output under those names.
REAL = {"messages": "llamafactory_kto_en_demo.json", "sharegpt": "llamafactory_glaive_toolcall_en_demo.json",
        "alpaca": "llamafactory_alpaca_en_demo.json", "prompt_completion": "llamafactory_alpaca_en_demo.json",
        "text": "llamafactory_c4_demo.jsonl"}
SIGNS = {"messages": "messages with role/content", "sharegpt": "conversations with from/value",
         "alpaca": "instruction/output", "prompt_completion": "prompt/completion", "text": "text"}


def real_records(shared_dir, fmt, n=16):
    path = shared_dir / "datasets" / REAL[fmt]
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines()[:n]] if path.suffix == ".jsonl" else json.loads(text)[:n]
    if fmt == "prompt_completion":
        rows = [{"prompt": r["instruction"], "completion": r["output"]} for r in rows]
    return [(f"{path}: record {i}", r) for i, r in enumerate(rows)]


def convert(row, fmt, where, **kw):
    return to_text(row, where, **kw) if fmt == "text" else to_conversation(row, fmt, where, **kw)


def test_docstring_examples():
    result = doctest.testmod(sftdist.data.detect)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("actual", FORMATS)
@pytest.mark.parametrize("configured", FORMATS)
def test_a_real_record_read_as_another_format_names_its_format(shared_dir, actual, configured):
    where, row = real_records(shared_dir, actual, 1)[0]
    if configured == actual:
        convert(row, configured, where, source_key="data.sources.1")  # converts: the hint is never needed
        return
    with pytest.raises(DataError) as err:
        convert(row, configured, where, source_key="data.sources.1")
    message = str(err.value)
    assert err.value.reason == "missing_field" and message.startswith(f"{where}: ")
    assert message.endswith(f": it looks like {actual} format ({SIGNS[actual]}): set data.sources.1.format={actual}")
    assert f"the record has fields {list(row)}" in message and "columns." not in message


def test_the_issue_alpaca_file_in_the_replay_recipe(shared_dir):
    """The user's case: alpaca records as the second source of a ``format: messages`` recipe."""
    where, row = real_records(shared_dir, "alpaca", 1)[0]
    with pytest.raises(DataError) as err:
        to_conversation(row, "messages", where, source_key="data.sources.1")
    assert "set data.sources.1.format=alpaca" in str(err.value)
    assert "columns.messages=instruction" not in str(err.value)  # the old, wrong advice


def test_a_renamed_column_of_the_configured_format_is_offered_as_a_mapping(shared_dir):
    (where, chat), = real_records(shared_dir, "messages", 1)
    renamed = {"conversation": chat["messages"], "label": chat["label"]}
    with pytest.raises(DataError, match=r"if 'conversation' holds the messages, map it: "
                                        r"\+\+data.sources.0.columns.messages=conversation$"):
        to_conversation(renamed, "messages", where, source_key="data.sources.0")
    assert to_conversation(renamed, "messages", where, {"messages": "conversation"})[0]  # and the mapping works
    (where, alpaca), = real_records(shared_dir, "alpaca", 1)
    renamed = {"instruction": alpaca["instruction"], "input": alpaca["input"], "response": alpaca["output"]}
    with pytest.raises(DataError, match=r"map it: \+\+data.sources.2.columns.output=response$"):
        to_conversation(renamed, "alpaca", where, source_key="data.sources.2")
    (where, doc), = real_records(shared_dir, "text", 1)
    with pytest.raises(DataError, match=r"map it: \+\+data.sources.0.columns.text=body$"):
        to_text({"body": doc["text"]}, where, source_key="data.sources.0")


def test_no_guess_when_no_field_or_several_could_be_the_missing_one():
    row = {"question": "What is 2+2?", "answer": "4"}  # two strings: either could be the output
    with pytest.raises(DataError) as err:
        to_conversation(row, "alpaca", "q.jsonl: line 1", source_key="data.sources.0")
    message = str(err.value)
    assert "none of them is clearly the 'instruction' of alpaca records (instruction/output)" in message
    assert "++data.sources.0.columns.instruction=<field>" in message and "looks like" not in message


def test_the_named_fixes_are_overrides_that_compose_and_convert(shared_dir, tmp_path):
    """The fix each message names, pasted on the command line as it stands, makes the records convert."""
    from sftdist.config import compose_config

    (_, alpaca), = real_records(shared_dir, "alpaca", 1)
    (_, chat), = real_records(shared_dir, "messages", 1)
    rows = [alpaca, {"conversation": chat["messages"], "label": chat["label"]}]
    paths = [tmp_path / "a.jsonl", tmp_path / "c.jsonl"]
    for path, row in zip(paths, rows):
        path.write_text(json.dumps(row) + "\n")
    fixes = []
    for i, row in enumerate(rows):
        with pytest.raises(DataError) as err:
            to_conversation(row, "messages", f"{paths[i]}: line 1", source_key=f"data.sources.{i}")
        fixes.append(str(err.value).rsplit(" ", 1)[1])
    assert fixes == ["data.sources.0.format=alpaca", "++data.sources.1.columns.messages=conversation"]
    cfg = compose_config([f"data.sources=[{{name: a, path: {paths[0]}}}, {{name: c, path: {paths[1]}}}]", *fixes])
    for source, row in zip(cfg.data.sources, rows):
        assert to_conversation(row, source.format, "x", dict(source.columns))[0]
