"""The forgetting probe's prompts (``data.forgetting_probe``): general questions that are never trained on,
whose answers show whether fine-tuning broke what the model already knew.

A loss on held-out replay records cannot show that: training on the replay set improves it directly, and a
real 135M chat model's replay delta said "better" (-0.058) while "What is the capital of France?" went from
"The capital of France is Paris." to gibberish. So the probe asks questions outside every training source,
and ``sftdist.observe.forgetting`` compares the answers with the base model's.

The built-in set covers short facts, arithmetic, a definition, a translation, a list and an instruction, so
that a model that answered them before fine-tuning should answer them the same way after it.

A user's probe file is JSONL, JSON or any format a source reads (``sources.read_records``), one prompt per
record: ``{"prompt": "..."}`` (one user message) or ``{"messages": [...]}`` (a conversation that ends with
the user's turn, e.g. with a system prompt).
"""

from __future__ import annotations

from typing import Any

from sftdist.data.messages import DataError

BUILTIN_PROBES = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "What is 7 times 8?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "What is the boiling point of water in degrees Celsius at sea level?",
    "Translate 'thank you' into Spanish.",
    "What is the chemical symbol for gold?",
    "Name the three primary colors.",
    "What is photosynthesis? Answer in one sentence.",
    "What is the opposite of 'hot'?",
    "How many continents are there on Earth?",
    "Write a Python function that returns the square of a number.",
    "What is the square root of 81?",
    "Which ocean is the largest?",
    "Give me a synonym for 'happy'.",
)


def probe_conversations(setting: str, *, pretrained: bool) -> list[list[dict[str, str]]]:
    """The probe prompts for ``data.forgetting_probe``, each as the messages up to the answer; [] when off.

    ``auto`` is the built-in set for a pretrained model and off for a model built from scratch, which knew
    nothing to forget; ``builtin`` forces the built-in set, ``none`` turns the probe off, and anything else is
    a file of the user's prompts.

    Example:
        >>> len(probe_conversations("auto", pretrained=True)), probe_conversations("auto", pretrained=False)
        (16, [])
        >>> probe_conversations("builtin", pretrained=False)[0]
        [{'role': 'user', 'content': 'What is the capital of France?'}]
    """
    if setting == "none" or (setting == "auto" and not pretrained):
        return []
    if setting in ("auto", "builtin"):
        return [[{"role": "user", "content": text}] for text in BUILTIN_PROBES]
    return read_probe_file(setting)


def read_probe_file(path: str) -> list[list[dict[str, str]]]:
    """The prompts of a probe file; a ``DataError`` naming the file and record for anything else.

    Raises:
        DataError: the file is missing or empty, or a record is neither ``{"prompt": str}`` nor
            ``{"messages": [...]}`` ending with a user turn.
    """
    from sftdist.config import DataSource
    from sftdist.data.sources import read_records

    try:
        records = list(read_records(DataSource(name="forgetting_probe", path=path)))
    except (OSError, ValueError, DataError) as e:
        raise DataError(f"data.forgetting_probe={path}: cannot read it ({e})") from e
    if not records:
        raise DataError(f"data.forgetting_probe={path}: no prompts in it")
    return [probe_record(row, f"data.forgetting_probe {where}") for where, row in records]


def probe_record(row: Any, where: str) -> list[dict[str, str]]:
    """One probe record as messages that end with the user's turn.

    Example:
        >>> probe_record({"prompt": "Hi?"}, "probes.jsonl line 1")
        [{'role': 'user', 'content': 'Hi?'}]
        >>> probe_record({"messages": [{"role": "system", "content": "Be brief."},
        ...                            {"role": "user", "content": "2+2?"}]}, "line 2")
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'}]
        >>> probe_record({"instruction": "Hi?"}, "probes.jsonl line 3")
        Traceback (most recent call last):
        ...
        sftdist.data.messages.DataError: probes.jsonl line 3: a probe needs "prompt" (a string) or "messages" (ending with a user turn); it has keys ['instruction']
    """
    if isinstance(row, DataError):  # a line that is not JSON
        raise DataError(f"{where}: {row}")
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return [{"role": "user", "content": row["prompt"]}]
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages) and messages[-1]["role"] == "user":
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(f'{where}: a probe needs "prompt" (a string) or "messages" (ending with a user turn); it '
                    f"has keys {keys}")
