"""Turn raw records of every supported data format into validated conversations or plain text.

A conversation is ``(messages, tools)``: ``messages`` is a list of ``{"role", "content"}`` dicts with
``role`` in ``ROLES`` and string ``content``, optionally ``tool_calls`` (OpenAI shape, ``arguments`` parsed
to a dict), ``name``, ``tool_call_id``, an assistant's ``reasoning_content``/``thinking`` and ``train`` (each
only when the record sets it); ``tools`` is a list of
OpenAI-style tool schemas or ``None``. Every error is a ``DataError`` whose message starts with ``where``
and whose ``reason`` is a short code that callers can count.
"""

from __future__ import annotations

import json
from typing import Any

from sftdist.data.detect import missing_field_hint

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "tool": "tool"}
_PASSTHROUGH = ("name", "tool_call_id")  # optional string keys a template may read
# An assistant's reasoning as a field of its own (OpenAI-style APIs, Qwen3, GLM and DeepSeek data;
# gpt-oss calls it ``thinking``): passed to the template, which decides where to render it, or whether to.
REASONING_KEYS = ("reasoning_content", "thinking")
SOURCE_KEY = "data.sources.<N>"  # where a caller does not say which source (index N) a record belongs to


class DataError(ValueError):
    """A record that cannot be used; the message names the file and record.

    Example:
        >>> e = DataError("a.jsonl: line 3: no assistant turn to train on", reason="no_assistant_turn")
        >>> e.reason, str(e)
        ('no_assistant_turn', 'a.jsonl: line 3: no assistant turn to train on')

    Args:
        message: Human-readable text, starting with the file and record.
        reason: Short snake_case code, e.g. ``unknown_role``, for counting skipped records.
    """

    def __init__(self, message: str, reason: str = "invalid_record"):
        super().__init__(message)
        self.reason = reason


def _key(name: str, columns: dict[str, str] | None) -> str:
    return (columns or {}).get(name, name)


def _get(row: dict[str, Any], name: str, columns: dict[str, str] | None) -> Any:
    return row.get(_key(name, columns))


def _parse_tools(raw: Any, where: str) -> list[dict[str, Any]] | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'tools' is not valid JSON: {e}", "invalid_tools") from e
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise DataError(f"{where}: 'tools' must be a list of tool schemas, got {type(raw).__name__}",
                        "invalid_tools")
    # Bare function schemas (glaive style) are wrapped into the OpenAI shape that chat templates expect.
    tools = [t if "type" in t or "name" not in t else {"type": "function", "function": t} for t in raw]
    return tools or None


def _tool_call(raw: Any, where: str) -> dict[str, Any]:
    """One tool call, from ``{"name", "arguments"}`` or the OpenAI shape, either possibly a JSON string."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: tool call is not valid JSON: {e}", "bad_tool_call") from e
    if not isinstance(raw, dict):
        raise DataError(f"{where}: tool call must be an object, got {type(raw).__name__}", "bad_tool_call")
    fn = raw.get("function") if isinstance(raw.get("function"), dict) else raw
    name, args = fn.get("name"), fn.get("arguments", fn.get("parameters"))
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: tool call has no function name", "bad_tool_call")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: arguments of tool call {name!r} are not valid JSON: {e}",
                            "bad_tool_call") from e
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise DataError(f"{where}: arguments of tool call {name!r} must be an object, got "
                        f"{type(args).__name__}", "bad_tool_call")
    call = {"type": "function", "function": {"name": name, "arguments": args}}
    return {**call, "id": raw["id"]} if raw.get("id") is not None else call


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """One call or a list of parallel calls, possibly as a JSON string."""
    if isinstance(raw, str) and raw.lstrip().startswith("["):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: tool calls are not valid JSON: {e}", "bad_tool_call") from e
    return [_tool_call(c, where) for c in (raw if isinstance(raw, list) else [raw])]


def _parts(parts: list, where: str) -> tuple[str, list[dict[str, Any]]]:
    """Content parts -> (content, tool_calls); reasoning goes first, in a ``<think>`` block."""
    text, reasoning, calls = [], [], []
    for j, p in enumerate(parts):
        if not isinstance(p, dict):
            raise DataError(f"{where} part {j} must be an object, got {type(p).__name__}", "non_string_content")
        kind = p.get("type")
        # Rows read through ``datasets`` carry both keys, one of them None, when files mix the spellings.
        value = p.get("value") if p.get("text") is None or kind == "tool_call" else p.get("text")
        if kind == "tool_call":
            calls.append(_tool_call(value, f"{where} part {j}"))
        elif kind in ("text", "reasoning") and isinstance(value, str):
            (text if kind == "text" else reasoning).append(value)
        elif kind in ("text", "reasoning"):
            raise DataError(f"{where} part {j} ({kind}) must hold a string, got {type(value).__name__}",
                            "non_string_content")
        else:
            raise DataError(f"{where} part {j} has unsupported type {kind!r}; expected text, reasoning or "
                            f"tool_call", "non_string_content")
    think = f"<think>\n{''.join(reasoning)}\n</think>\n\n" if reasoning else ""
    return think + "".join(text), calls


def _train_flag(m: dict[str, Any], where: str) -> bool | None:
    train, weight = m.get("train"), m.get("loss_weight")
    if train is not None and not isinstance(train, bool):
        raise DataError(f"{where}: 'train' must be true or false, got {train!r}", "bad_loss_weight")
    if weight is None:
        return train
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise DataError(f"{where}: loss_weight must be 0 or 1, got {weight!r}", "bad_loss_weight")
    if train is not None and train != bool(weight):
        raise DataError(f"{where}: train={train} contradicts loss_weight={weight}", "bad_loss_weight")
    return bool(weight)


def _message(m: Any, where: str) -> dict[str, Any]:
    """Validate one OpenAI-style message and normalise its content, tool calls and train flag."""
    if not isinstance(m, dict) or m.get("role") is None:
        raise DataError(f"{where} has no 'role'", "missing_field")
    role = m["role"]
    if role not in ROLES:
        raise DataError(f"{where} has unknown role {role!r}; expected one of {ROLES}", "unknown_role")
    raw_calls = m.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise DataError(f"{where}: 'tool_calls' must be a list, got {type(raw_calls).__name__}", "bad_tool_call")
    calls = [_tool_call(c, f"{where} tool call {j}") for j, c in enumerate(raw_calls)]
    content = m.get("content")
    if isinstance(content, list):
        content, part_calls = _parts(content, where)
        calls += part_calls
    elif content is None and calls:
        content = ""  # OpenAI writes null content next to tool calls
    elif not isinstance(content, str):
        raise DataError(f"{where} ({role}) content must be a string or a list of parts, got "
                        f"{type(content).__name__}", "non_string_content")
    if calls and role != "assistant":
        raise DataError(f"{where} ({role}) has tool calls; only assistant messages can call tools",
                        "bad_tool_call")
    out: dict[str, Any] = {"role": role, "content": content}
    if calls:
        out["tool_calls"] = calls
    out.update({k: m[k] for k in _PASSTHROUGH if m.get(k) is not None})
    for key in REASONING_KEYS if role == "assistant" else ():
        if m.get(key) is not None and not isinstance(m[key], str):
            raise DataError(f"{where} ({role}) {key} must be a string, got {type(m[key]).__name__}",
                            "non_string_content")
        if m.get(key):
            out[key] = m[key]
    train = _train_flag(m, where)
    return out if train is None else {**out, "train": train}


def _checked(messages: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    if not messages:
        raise DataError(f"{where}: the conversation has no messages", "empty_conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to train on", "no_assistant_turn")
    return messages


def _list(row: dict[str, Any], name: str, columns: dict[str, str] | None, where: str) -> list:
    key, value = _key(name, columns), _get(row, name, columns)
    if value is None:
        raise _absent(row, key, name, where, f"expected a non-empty {key!r} list")
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a non-empty {key!r} list, got {type(value).__name__}", "missing_field")
    if not value:
        raise DataError(f"{where}: expected a non-empty {key!r} list, got an empty list", "empty_conversation")
    return value


class _Absent(DataError):
    """A record without canonical field ``name``; ``to_conversation`` adds the fix (``missing_field_hint``),
    which needs the format and the source's config path that the converters do not know."""

    def __init__(self, message: str, row: Any, name: str):
        super().__init__(message, "missing_field")
        self.row, self.name = row, name


def _absent(row: Any, key: str, name: str, where: str, what: str) -> DataError:
    return _Absent(f"{where}: {what}", row, name)


def _with_hint(e: _Absent, fmt: str, columns: dict[str, str] | None, source_key: str) -> DataError:
    return DataError(f"{e}; {missing_field_hint(e.row, fmt, e.name, columns, source_key)}", "missing_field")


def _string(row: dict[str, Any], name: str, columns: dict[str, str] | None, where: str,
            required: bool = True) -> str:
    key, value = _key(name, columns), _get(row, name, columns)
    if value is None and not required:
        return ""
    if value is None:
        raise _absent(row, key, name, where, f"missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}",
                        "non_string_content")
    return value


def _from_messages(row, where, columns):
    return [_message(m, f"{where}: message {i}") for i, m in enumerate(_list(row, "messages", columns, where))]


def _from_sharegpt(row, where, columns):
    system = _string(row, "system", columns, where, required=False)
    out = [{"role": "system", "content": system}] if system else []
    src, val = _key("from", columns), _key("value", columns)
    for i, turn in enumerate(_list(row, "conversations", columns, where)):
        at = f"{where}: turn {i}"
        if not isinstance(turn, dict) or turn.get(src) is None or turn.get(val) is None:
            raise DataError(f"{at} needs {src!r} and {val!r}", "missing_field")
        if turn[src] == "function_call":
            msg = {"role": "assistant", "content": "", "tool_calls": _tool_calls(turn[val], at)}
        elif turn[src] in _SHAREGPT_ROLES and not isinstance(turn[val], str):
            raise DataError(f"{at} ({turn[src]}) {val!r} must be a string, got {type(turn[val]).__name__}",
                            "non_string_content")
        elif turn[src] in _SHAREGPT_ROLES:
            msg = _message({"role": _SHAREGPT_ROLES[turn[src]], "content": turn[val]}, at)
        else:
            raise DataError(f"{at} has unknown role {turn[src]!r}; expected one of "
                            f"{(*_SHAREGPT_ROLES, 'function_call')}", "unknown_role")
        train = _train_flag(turn, at)
        out.append(msg if train is None else {**msg, "train": train})
    return out


def _from_alpaca(row, where, columns):
    system = _string(row, "system", columns, where, required=False)
    out = [{"role": "system", "content": system}] if system else []
    history = _get(row, "history", columns) or []
    for i, pair in enumerate(history if isinstance(history, list) else [history]):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair of strings, got {pair!r}",
                            "non_string_content")
        out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = [_string(row, "instruction", columns, where), _string(row, "input", columns, where, False)]
    out.append({"role": "user", "content": "\n\n".join(p for p in prompt if p)})
    out.append({"role": "assistant", "content": _string(row, "output", columns, where)})
    return out


def _from_prompt_completion(row, where, columns):
    out = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        value = _get(row, name, columns)
        if isinstance(value, list) and value:
            msgs = [_message(m, f"{where}: {name} message {i}") for i, m in enumerate(value)]
            if name == "prompt":  # only the completion is trained, unless a prompt turn asks for it
                msgs = [{**m, "train": m.get("train", False)} if m["role"] == "assistant" else m for m in msgs]
            out += msgs
        elif isinstance(value, list):
            raise DataError(f"{where}: {_key(name, columns)!r} is an empty list", "empty_conversation")
        else:
            out.append({"role": role, "content": _string(row, name, columns, where)})
    return out


_CONVERTERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
               "prompt_completion": _from_prompt_completion}


def to_conversation(row: dict[str, Any], fmt: str, where: str, columns: dict[str, str] | None = None, *,
                    source_key: str = SOURCE_KEY) -> tuple[list[dict[str, Any]], list | None]:
    """Convert one record of a conversational format into ``(messages, tools)``.

    Example:
        >>> to_conversation({"instruction": "Add", "input": "2+2", "output": "4"}, "alpaca", "a.json: record 0")
        ([{'role': 'user', 'content': 'Add\\n\\n2+2'}, {'role': 'assistant', 'content': '4'}], None)
        >>> row = {"conversations": [{"from": "human", "value": "Weather?"},
        ...                          {"from": "function_call", "value": '{"name": "wx", "arguments": {}}'}],
        ...        "tools": '[{"name": "wx", "parameters": {}}]'}
        >>> msgs, tools = to_conversation(row, "sharegpt", "g.json: record 0")
        >>> msgs[1]["tool_calls"], tools[0]["type"]
        ([{'type': 'function', 'function': {'name': 'wx', 'arguments': {}}}], 'function')
        >>> to_conversation({"q": "Hi", "a": [{"role": "assistant", "content": "Yo", "loss_weight": 0.0}]},
        ...                 "prompt_completion", "p.jsonl: line 1", {"prompt": "q", "completion": "a"})[0]
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo', 'train': False}]
        >>> to_conversation({"instruction": "Add", "output": "4"}, "messages", "a.jsonl: line 1",
        ...                 source_key="data.sources.1")
        Traceback (most recent call last):
        ...
        sftdist.data.messages.DataError: a.jsonl: line 1: expected a non-empty 'messages' list; the record has fields ['instruction', 'output']: it looks like alpaca format (instruction/output): set data.sources.1.format=alpaca

    Args:
        row: One record as read from the file.
        fmt: One of ``FORMATS`` except ``text`` (see ``to_text``).
        where: ``"file: line N"`` or ``"file: record N"``; every error message starts with it.
        columns: Canonical field name -> the record's key, e.g. ``{"messages": "conversation"}``. Fields
            not listed use their canonical name. For ``sharegpt`` the per-turn ``from``/``value`` keys can
            be mapped too.
        source_key: The source's config path, e.g. ``data.sources.1``, which a missing field's error
            names in its fix (the format the record looks like, or the column to map).

    Returns:
        ``(messages, tools)``: validated messages with at least one assistant turn, and the record's tool
        schemas (``None`` when it has none).

    Raises:
        DataError: with ``reason`` one of ``unknown_format``, ``missing_field``, ``unknown_role``,
            ``empty_conversation``, ``no_assistant_turn``, ``non_string_content``, ``bad_loss_weight``,
            ``invalid_tools`` or ``bad_tool_call``.
    """
    if fmt == "text":
        raise DataError(f"{where}: format 'text' holds documents, not conversations; use to_text",
                        "unknown_format")
    if fmt not in _CONVERTERS:
        raise DataError(f"{where}: unknown data format {fmt!r}; expected one of {FORMATS}", "unknown_format")
    try:
        messages = _checked(_CONVERTERS[fmt](row, where, columns), where)
    except _Absent as e:
        raise _with_hint(e, fmt, columns, source_key) from None
    return messages, _parse_tools(_get(row, "tools", columns), where)


def to_text(row: dict[str, Any], where: str, columns: dict[str, str] | None = None, *,
            source_key: str = SOURCE_KEY) -> str:
    """Validate a ``text``-format record and return its document.

    Example:
        >>> to_text({"text": "Rain falls."}, "c4.jsonl: line 7")
        'Rain falls.'
        >>> to_text({"body": "Snow."}, "c4.jsonl: line 8", {"text": "body"})
        'Snow.'

    Args:
        row: One record with a string ``text`` field.
        where: ``file: record`` prefix for error messages.
        columns: ``{"text": key}`` when the document lives under another key.
        source_key: The source's config path, named in the fix of a missing ``text`` field.

    Raises:
        DataError: ``missing_field`` when ``text`` is absent or blank, ``non_string_content`` when it is not
            a string.
    """
    key, text = _key("text", columns), _get(row, "text", columns)
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: expected a non-empty string field {key!r}, got {type(text).__name__}",
                        "non_string_content")
    if text is None:
        raise _with_hint(_Absent(f"{where}: expected a non-empty string field {key!r}", row, "text"), "text",
                         columns, source_key)
    if not text.strip():
        raise DataError(f"{where}: expected a non-empty string field {key!r}", "missing_field")
    return text
