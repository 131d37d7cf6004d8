"""The mask audit: before any model is loaded, re-render a sample of every chat source and check the masks
against the chat template, independently of how they were built.

Checks, per audited record:
1. the token sequence equals ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)``;
2. the supervised text holds every trained assistant reply, in order;
3. every supervised span ends with a special (end-of-turn / EOS) token, so the model learns to stop.
"""

from __future__ import annotations

import random

from sftdist.config import DataSource
from sftdist.data.messages import DataError, to_conversation
from sftdist.data.sources import read_records
from sftdist.data.tokenize import encode_conversation, supervised_runs, trained_turns


def supervised_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of supervised positions, as token ids.

    Example:
        >>> supervised_spans([5, 6, 7, 8, 9], [-100, 6, 7, -100, 9])
        [[6, 7], [9]]
    """
    return [ids for supervised, ids in supervised_runs(input_ids, labels) if supervised]


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids


def check_record(tokenizer, messages: list[dict], tools, train_on: str) -> list[str]:
    """Problems with one conversation's masks (empty list when it is exact)."""
    enc = encode_conversation(tokenizer, messages, tools=tools, train_on=train_on)
    reference = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)
    reference = list(reference["input_ids"] if hasattr(reference, "keys") else reference)
    problems = []
    if enc["input_ids"] != reference:
        problems.append("token sequence differs from apply_chat_template(tokenize=True)")
    if train_on == "all":
        return problems
    spans = supervised_spans(enc["input_ids"], enc["labels"])
    special = _special_ids(tokenizer)
    for span in spans:
        if span[-1] not in special:
            problems.append(f"supervised span {tokenizer.decode(span)!r} does not end with an end-of-turn token")
    text = "".join(tokenizer.decode(s) for s in spans)
    full_text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    pos = 0
    for i in trained_turns(messages, train_on):
        turn_text = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
        if not full_text.startswith(turn_text.rstrip()):
            continue  # a history-rewriting template renders this turn differently later; it stays unsupervised
        content = messages[i]["content"].strip()
        if content not in full_text:
            continue  # the template does not render this content at all (e.g. text beside tool calls)
        found = text.find(content, pos) if content else pos
        if found < 0:
            problems.append(f"assistant turn {i} ({content[:40]!r}...) is not in the supervised text")
        else:
            pos = found + len(content)
    return problems


def audit_source(source: DataSource, tokenizer, *, train_on: str, samples: int, seed: int) -> int:
    """Audit up to ``samples`` records of a chat source, drawn by ``seed`` from its first 20x records.

    Bad records themselves are not the audit's concern (the data stage reports them); it skips them.

    Returns:
        The number of records audited.

    Raises:
        DataError: naming the source, record and tokenizer of the first record whose masks are wrong.
    """
    if source.format == "text" or samples <= 0:
        return 0
    pool = []
    for n, (where, row) in enumerate(read_records(source), start=1):
        if not isinstance(row, DataError):
            pool.append((where, row))
        if len(pool) >= samples * 20 or n == source.max_samples:
            break
    audited = 0
    for where, row in random.Random(f"audit:{seed}").sample(pool, min(samples, len(pool))):
        try:
            messages, tools = to_conversation(row, source.format, where, dict(source.columns))
            problems = check_record(tokenizer, messages, tools, train_on)
        except Exception:  # a record the data stage already rejected and counted (bad fields, template errors)
            continue
        if problems:
            raise DataError(f"mask audit failed for data source {source.name!r}, {where}, with the chat template of "
                            f"tokenizer {tokenizer.name_or_path!r}: {'; '.join(problems)}", "mask_audit")
        audited += 1
    return audited
