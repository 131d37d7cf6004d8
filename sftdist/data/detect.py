"""Which known data format a raw record looks like, for the fix a missing-field error names: the format to
set (with the source's own key, e.g. ``data.sources.1.format=alpaca``), or a column to map."""

from __future__ import annotations

from typing import Any


def _turns(value: Any, *keys: str) -> bool:
    """A non-empty list of objects that each have ``keys``."""
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) and all(k in t for k in keys)
                                                           for t in value)


# Each format's signature keys, tried in this order: a record with both ``messages`` and ``text`` is a chat.
SIGNATURES = {
    "messages": lambda r: _turns(r.get("messages"), "role", "content"),
    "sharegpt": lambda r: _turns(r.get("conversations"), "from", "value"),
    "alpaca": lambda r: isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str),
    "prompt_completion": lambda r: "prompt" in r and "completion" in r,
    "text": lambda r: isinstance(r.get("text"), str),
}
DESCRIBED = {"messages": "messages with role/content", "sharegpt": "conversations with from/value",
             "alpaca": "instruction/output", "prompt_completion": "prompt/completion", "text": "text"}
# Every canonical field of a format: a record's key that one of them reads is not a renamed column.
FIELDS = {"messages": ("messages", "tools"), "sharegpt": ("conversations", "system", "tools"),
          "alpaca": ("instruction", "input", "output", "system", "history", "tools"),
          "prompt_completion": ("prompt", "completion", "tools"), "text": ("text",)}
# What a renamed column must hold to be taken for the canonical field it replaces.
SHAPES = {"messages": lambda v: _turns(v, "role", "content"), "conversations": lambda v: _turns(v),
          "prompt": lambda v: isinstance(v, str) or _turns(v, "role", "content"),
          "completion": lambda v: isinstance(v, str) or _turns(v, "role", "content")}


def detect_format(row: Any) -> str | None:
    """The first known format whose signature keys ``row`` has, or None.

    Example:
        >>> detect_format({"instruction": "Add", "input": "2+2", "output": "4"})
        'alpaca'
        >>> detect_format({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
        'sharegpt'
        >>> detect_format({"question": "Hi", "answer": "Yo"}) is None
        True
    """
    if not isinstance(row, dict):
        return None
    return next((fmt for fmt, looks in SIGNATURES.items() if looks(row)), None)


def renamed_column(row: dict, fmt: str, name: str, columns: dict | None = None) -> str | None:
    """The one field of ``row`` that looks like canonical field ``name`` of ``fmt`` under another key, or
    None when no field, or more than one, could be it (then guessing would name the wrong fix).

    Example:
        >>> renamed_column({"conversation": [{"role": "user", "content": "Hi"}], "id": 7}, "messages", "messages")
        'conversation'
        >>> renamed_column({"instruction": "Hi", "input": "", "output": "Yo"}, "messages", "messages") is None
        True
        >>> renamed_column({"instruction": "Hi", "response": "Yo"}, "alpaca", "output")
        'response'
    """
    claimed = {(columns or {}).get(f, f) for f in FIELDS.get(fmt, ())}
    shape = SHAPES.get(name, lambda v: isinstance(v, str))
    fits = [k for k, v in row.items() if k not in claimed and shape(v)]
    return fits[0] if len(fits) == 1 else None


def missing_field_hint(row: Any, fmt: str, name: str, columns: dict | None, source_key: str) -> str:
    """What to set when a ``fmt`` record lacks canonical field ``name``: the format the record looks like,
    else the column that holds the field under another name, else the fields it has.

    Example:
        >>> row = {"instruction": "Add", "input": "2+2", "output": "4"}
        >>> missing_field_hint(row, "messages", "messages", None, "data.sources.1")
        "the record has fields ['instruction', 'input', 'output']: it looks like alpaca format (instruction/output): set data.sources.1.format=alpaca"
        >>> missing_field_hint({"chat": [{"role": "user", "content": "Hi"}]}, "messages", "messages", None, "data.sources.0")
        "the record has fields ['chat']: if 'chat' holds the messages, map it: ++data.sources.0.columns.messages=chat"
    """
    fields = list(row) if isinstance(row, dict) else []
    found = f"the record has fields {fields}"
    other = detect_format(row)
    if other is not None and other != fmt:
        return f"{found}: it looks like {other} format ({DESCRIBED[other]}): set {source_key}.format={other}"
    column = renamed_column(row, fmt, name, columns) if fields else None
    if column is not None:
        # `++`: Hydra adds a key to `columns` only with `+`, and `++` also replaces one already mapped.
        return f"{found}: if {column!r} holds the {name}, map it: ++{source_key}.columns.{name}={column}"
    return (f"{found}, and none of them is clearly the {name!r} of {fmt} records ({DESCRIBED[fmt]}); set "
            f"{source_key}.format to the record's format, or map the field that holds it with "
            f"++{source_key}.columns.{name}=<field>")
