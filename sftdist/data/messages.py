"""Turn raw records into validated chat messages or plain text, with errors that name the record."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A record that cannot be used; the message names the file and record."""


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Validate a ``messages``-format record and return its message list.

    Example:
        >>> to_messages({"messages": [{"role": "user", "content": "Hi"},
        ...                           {"role": "assistant", "content": "Hello"}]}, "f.jsonl:1")
        [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]

    Args:
        row: One record, with a ``messages`` list of ``{"role", "content"}`` dicts.
        where: ``file:record`` used in error messages.

    Raises:
        DataError: missing field, unknown role, non-string content, or no assistant turn to train on.
    """
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty 'messages' list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"{where}: message {i} has no 'role'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} ({m['role']}) content must be a string, "
                            f"got {type(m.get('content')).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn to train on")
    return out


def to_text(row: dict[str, Any], where: str) -> str:
    """Validate a ``text``-format record and return its document.

    Example:
        >>> to_text({"text": "Rain falls."}, "c4.jsonl:7")
        'Rain falls.'

    Raises:
        DataError: when ``text`` is missing, not a string, or empty.
    """
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: expected a non-empty string field 'text'")
    return text
