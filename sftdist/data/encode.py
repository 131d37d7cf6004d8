"""Encode raw records into masked samples with their statuses: one record at a time (``encode_record``), or a
batch of records with one tokenizer call for all their rendered texts (``encode_records``), which gives the
same ids, labels, statuses and errors.

A record's work is: parse (JSON Lines keep their line as read, so it is parsed once, here), validate
(``to_conversation``), filter, render with the chat template and locate the trained replies (``split_turns``,
``reply_spans``), tokenise with offsets, label, then check the length. Tokenising dominates (about 1 ms per
3,000-character conversation with a BPE tokenizer); one batched call saves the per-call overhead of the
tokenizer wrapper, and everything else is per record in either path.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from sftdist.data import quality
from sftdist.data.messages import SOURCE_KEY, DataError, to_conversation, to_text
from sftdist.data.reply_spans import ReplySpan
from sftdist.data.sources import parse_line
from sftdist.data.split_turns import encode_samples, split_views, turn_messages
from sftdist.data.template_shape import render
from sftdist.data.tokenize import IGNORE_INDEX, MaskError, encode_text, label_spans, trained_spans, trained_turns

Raw = Union[str, dict, DataError]


def _empty(where: str) -> dict[str, Any]:
    return {"input_ids": [], "labels": [], "num_tokens": 0, "num_supervised": 0, "where": where, "split": False}


def parse_raw(raw: Raw, where: str) -> Any:
    """A record as ``encode_record`` takes it: a parsed row, or a JSON text (a line of a JSON Lines file as
    read, or ``raw_splits``' re-serialised row) parsed here.

    Example:
        >>> parse_raw('{"text": "hi"}', "a.jsonl: line 1"), parse_raw({"text": "hi"}, "a.jsonl: line 1")
        ({'text': 'hi'}, {'text': 'hi'})

    Raises:
        DataError: ``invalid_json``, with the reader's message (``a.jsonl: line 3: invalid JSON: ...``), or the
            ``DataError`` the reader gave for this record.
    """
    if isinstance(raw, DataError):
        raise raw
    if isinstance(raw, str):
        row = parse_line(raw, where)
        if isinstance(row, DataError):
            raise row
        return row
    return raw


def _failed(e: Exception, where: str, tokenizer) -> dict[str, Any]:
    """The bad-record sample of an exception raised while encoding a record."""
    if isinstance(e, DataError):
        return {**_empty(where), "status": e.reason, "error": str(e)}
    if isinstance(e, MaskError):
        return {**_empty(where), "status": "template_mismatch",
                "error": f"{where}: {e} (tokenizer {tokenizer.name_or_path!r})"}
    # a template raising on odd input (jinja exceptions, TypeErrors) is a bad record too
    return {**_empty(where), "status": "render_failed",
            "error": f"{where}: chat template failed: {type(e).__name__}: {e}"}


def encode_record(row: Raw, where: str, *, fmt: str, columns: dict, train_on: str, max_length: int,
                  truncation: str, tokenizer, min_reply_tokens: int = 0, drop_cut_replies: bool = False,
                  source_key: str = SOURCE_KEY, split_turns: str = "auto") -> list[dict[str, Any]]:
    """Encode one record into its samples; never raises for a bad record, reports it in ``status``/``error``
    (whose fix names the source as ``source_key``, e.g. ``data.sources.1``).

    Args:
        row: The parsed record (a dict), or its JSON text (parsed here; invalid JSON is an ``invalid_json``
            record).

    Returns:
        One sample, or one per trained turn when ``split_turns`` splits the conversation, each with
        ``input_ids``, ``labels``, ``num_tokens``, ``num_supervised``, ``where`` (``where``, and for a split
        sample the reply it trains), ``split`` (whether it is one), ``status`` (``ok``, ``truncated``,
        ``dropped_too_long``, ``dropped_no_target``, ``dropped_short_reply``, ``dropped_cut_reply`` or an error
        reason) and ``error`` (message or ""). A bad record is one sample, without ids.
    """
    try:
        row = parse_raw(row, where)
        if fmt == "text":
            samples = [(None, encode_text(tokenizer, to_text(row, where, columns, source_key=source_key)))]
        else:
            messages, tools = to_conversation(row, fmt, where, columns, source_key=source_key)
            dropped = reply_filter([(where, messages)], tokenizer, min_reply_tokens, drop_cut_replies)
            if dropped:
                return [{**_empty(where), "status": dropped, "error": ""}]
            samples = encode_samples(tokenizer, messages, tools, train_on=train_on, split_turns=split_turns)
    except Exception as e:  # noqa: BLE001 - every failure is this record's status (see _failed)
        return [_failed(e, where, tokenizer)]
    return _finished(samples, where, max_length, truncation)


def _finished(samples: list, where: str, max_length: int, truncation: str) -> list[dict[str, Any]]:
    """The encoded ``(view, {"input_ids", "labels"})`` samples of one record under ``data.truncation``."""
    out = []
    for j, (view, enc) in enumerate(samples, start=1):
        at = where if view is None else f"{where}, reply {j} of {len(samples)} (message {view.turn})"
        out.append({**checked_length(enc, at, max_length=max_length, truncation=truncation, empty=_empty(where)),
                    "where": at, "split": view is not None})
    return out


def checked_length(enc: dict, where: str, *, max_length: int, truncation: str, empty: dict) -> dict[str, Any]:
    """One encoded sample under ``data.truncation``, with its counts and status.

    Example:
        >>> e = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
        >>> checked_length(e, "r", max_length=2, truncation="truncate", empty={})["labels"]
        [-100, 2]
        >>> checked_length(e, "r", max_length=2, truncation="drop", empty={})["status"]
        'dropped_too_long'
    """
    status = "ok"
    if len(enc["input_ids"]) > max_length:
        if truncation == "drop":
            return {**empty, "status": "dropped_too_long", "error": ""}
        if truncation == "error":
            return {**empty, "status": "too_long",
                    "error": f"{where}: {len(enc['input_ids'])} tokens, over train.max_length={max_length} "
                             f"(data.truncation=error): raise train.max_length, or set data.truncation=truncate "
                             f"or drop"}
        enc = {k: v[:max_length] for k, v in enc.items()}
        status = "truncated"
    labels = enc["labels"]
    # The first label is never a target (nothing predicts it).
    supervised = len(labels) - labels.count(IGNORE_INDEX) - (bool(labels) and labels[0] != IGNORE_INDEX)
    if supervised == 0:
        return {**empty, "status": "dropped_no_target", "error": ""}
    return {**enc, "num_tokens": len(enc["input_ids"]), "num_supervised": supervised, "status": status, "error": ""}


def reply_filter(record: list, tokenizer, min_reply_tokens: int, drop_cut_replies: bool) -> str:
    """The filter status that drops this one-record list (``[(where, messages)]``), or ""."""
    if drop_cut_replies and quality.cut_replies(record):
        return "dropped_cut_reply"
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    if min_reply_tokens and quality.short_replies(record, min_reply_tokens, count):
        return "dropped_short_reply"
    return ""


def _text_plan(tokenizer, messages, tools, train_on: str) -> tuple[str, Optional[list[ReplySpan]]]:
    """What ``encode_conversation`` tokenises and the spans it labels (``None``: every token, ``all``)."""
    text = render(tokenizer, messages, tools)
    if train_on == "all":
        trained_turns(messages, train_on)  # still validates the per-message flags
        return text, None
    return text, trained_spans(tokenizer, messages, tools, text, train_on)


def sample_plans(tokenizer, messages, tools, *, train_on: str, split_turns: str) -> list[tuple]:
    """``encode_samples`` up to the tokeniser: per sample, ``(view, text, spans)``, where ``spans`` are the
    character spans to supervise in ``text`` (``None``: all of it).

    Raises:
        MaskError: when a trained reply's text is not in the rendered conversation.
    """
    views = split_views(tokenizer, messages, tools, train_on=train_on, split_turns=split_turns)
    if views is None:
        return [(None, *_text_plan(tokenizer, messages, tools, train_on))]
    plans = []
    for view in views:
        if not view.built:  # as encode_turn: the template's own rendering of the conversation up to the reply
            plans.append((view, *_text_plan(tokenizer, turn_messages(messages, view.turn), tools, "assistant")))
        else:
            end = len(view.text)
            plans.append((view, view.text, [ReplySpan(view.turn, view.prompt_end, view.prompt_end, end, end, True)]))
    return plans


def encode_records(rows: list[Raw], wheres: list[str], *, fmt: str, columns: dict, train_on: str, max_length: int,
                   truncation: str, tokenizer, min_reply_tokens: int = 0, drop_cut_replies: bool = False,
                   source_key: str = SOURCE_KEY, split_turns: str = "auto") -> list[list[dict[str, Any]]]:
    """``encode_record`` of every record, with one tokenizer call for all their texts: the same samples.

    Plain-text sources and tokenizers without offsets take ``encode_record`` per record.

    Example (ChatML; ``<e>`` = ``<|im_end|>``)::

        rows   = ['{"messages": [user "Hi", assistant "Yo"]}', '{"messages": []}']
        texts  = ["<s>user\\nHi<e>\\n<s>assistant\\nYo<e>\\n"]         # one tokenizer call for the batch
        result = [[{input_ids: [.. Yo <e> \\n], labels: [-100 .. Yo <e> -100], status: "ok"}],
                  [{input_ids: [], status: "empty_conversation", error: "...: line 2: ..."}]]

    Returns:
        Per record, its samples (see ``encode_record``).
    """
    kw = dict(fmt=fmt, columns=columns, train_on=train_on, max_length=max_length, truncation=truncation,
              tokenizer=tokenizer, min_reply_tokens=min_reply_tokens, drop_cut_replies=drop_cut_replies,
              source_key=source_key, split_turns=split_turns)
    if fmt == "text":
        return _encode_texts(rows, wheres, **kw)
    if not getattr(tokenizer, "is_fast", False):
        return [encode_record(r, w, **kw) for r, w in zip(rows, wheres)]
    done: list[Optional[list]] = [None] * len(rows)
    plans: list[list[tuple]] = [[] for _ in rows]
    for i, (row, where) in enumerate(zip(rows, wheres)):
        try:
            messages, tools = to_conversation(parse_raw(row, where), fmt, where, columns, source_key=source_key)
            dropped = reply_filter([(where, messages)], tokenizer, min_reply_tokens, drop_cut_replies)
            if dropped:
                done[i] = [{**_empty(where), "status": dropped, "error": ""}]
            else:
                plans[i] = sample_plans(tokenizer, messages, tools, train_on=train_on, split_turns=split_turns)
        except Exception as e:  # noqa: BLE001 - as in encode_record
            done[i] = [_failed(e, where, tokenizer)]
    texts = [text for p in plans for _, text, _ in p]
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    except Exception:  # noqa: BLE001 - a text the tokenizer refuses: find which record, one at a time
        return [d if d is not None else encode_record(r, w, **kw) for d, r, w in zip(done, rows, wheres)]
    j = 0
    for i, p in enumerate(plans):
        if done[i] is not None:
            continue
        samples = []
        for view, text, spans in p:
            ids, offsets = list(enc["input_ids"][j]), list(enc["offset_mapping"][j])
            j += 1
            labels = list(ids) if spans is None else label_spans(tokenizer, text, ids, offsets, spans)
            samples.append((view, {"input_ids": ids, "labels": labels}))
        done[i] = _finished(samples, wheres[i], max_length, truncation)
    return done


def _encode_texts(rows: list[Raw], wheres: list[str], **kw) -> list[list[dict[str, Any]]]:
    """``encode_record`` of plain-text records, with one tokenizer call for their documents (``encode_text``:
    special tokens added, then EOS unless the tokenizer added it)."""
    tokenizer, columns, source_key = kw["tokenizer"], kw["columns"], kw["source_key"]
    done: list[Optional[list]] = [None] * len(rows)
    texts, todo = [], []
    for i, (row, where) in enumerate(zip(rows, wheres)):
        try:
            texts.append(to_text(parse_raw(row, where), where, columns, source_key=source_key))
            todo.append(i)
        except Exception as e:  # noqa: BLE001 - as in encode_record
            done[i] = [_failed(e, where, tokenizer)]
    try:
        batch = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    except Exception:  # noqa: BLE001 - a text the tokenizer refuses: find which record, one at a time
        return [d if d is not None else encode_record(r, w, **kw) for d, r, w in zip(done, rows, wheres)]
    eos = tokenizer.eos_token_id
    for i, ids in zip(todo, batch):
        ids = list(ids) + [eos] if eos is not None and (not ids or ids[-1] != eos) else list(ids)
        done[i] = _finished([(None, {"input_ids": ids, "labels": list(ids)})], wheres[i], kw["max_length"],
                            kw["truncation"])
    return done
