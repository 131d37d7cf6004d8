"""Render conversations with the tokenizer's own chat template and label exactly the trained tokens.

The conversation is rendered **once** (``apply_chat_template(tokenize=False)``) and tokenized once, with
character offsets, exactly as ``apply_chat_template(tokenize=True)`` tokenizes it. ``reply_spans`` finds
each assistant reply's character span in that text (from the end of its generation prompt to the end of
its end-of-turn token), and the offsets turn spans into token labels. No generation tags are needed, and
the template may move the system prompt, rewrite history, or end a conversation with EOS.

Token rule at the edges of a span: a token is trained when it *starts* inside the span. So a token that
straddles the start (it holds the end of the generation prompt, which inference supplies) is not
trained, and one that straddles the end (Falcon's ``.\n``: the reply's last character merged with the
next turn's newline) is, since it ends the reply.

Tokenizers without offsets (pure-Python ones) take a slower path with the same rule: each span edge is
mapped to a token index by tokenizing the text before it.
"""

from __future__ import annotations

import bisect
from typing import Any, Optional

from sftdist.config import TRAIN_ON
from sftdist.data.reply_spans import MaskError, ReplySpan, reply_spans
from sftdist.data.template_shape import render, special_strings, template_shape

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "MaskError", "encode_conversation", "encode_text", "label_spans", "render_and_tokenize",
           "supervised_runs", "tokenize_text", "trained_spans", "trained_turns"]


def _tokens(tokenizer, text: str) -> list[int]:
    # apply_chat_template(tokenize=True) tokenizes the rendered text without adding special tokens; so do we.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_turns(messages: list[dict[str, Any]], train_on: str) -> list[int]:
    """Indices of the assistant messages whose replies are supervised.

    ``train_on`` picks every assistant turn or only the last one; a message's own ``train`` flag (from a
    record's ``train`` or ``loss_weight``) overrides that choice.

    Example:
        >>> msgs = [{"role": "user"}, {"role": "assistant"}, {"role": "user"}, {"role": "assistant", "train": False}]
        >>> trained_turns(msgs, "assistant"), trained_turns(msgs, "last")
        ([1], [])
    """
    if train_on not in TRAIN_ON:
        raise MaskError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    default = set(assistant if train_on != "last" else assistant[-1:])
    for i, m in enumerate(messages):
        if m.get("train") and m["role"] != "assistant":
            raise MaskError(f"message {i} ({m['role']}) sets train/loss_weight=1; only assistant turns can be trained")
    return [i for i in assistant if _wants_training(messages[i], i in default)]


def _wants_training(message: dict[str, Any], default: bool) -> bool:
    return default if message.get("train") is None else bool(message["train"])


def render_and_tokenize(tokenizer, messages, tools=None) -> tuple[str, list[int], Optional[list[tuple[int, int]]]]:
    """The rendered conversation, its token ids and each token's character offsets (``None`` when the
    tokenizer cannot report offsets)."""
    text = render(tokenizer, messages, tools)
    return (text, *tokenize_text(tokenizer, text))


def tokenize_text(tokenizer, text: str) -> tuple[list[int], Optional[list[tuple[int, int]]]]:
    """Token ids of an already rendered text (as ``apply_chat_template(tokenize=True)`` tokenizes it) and
    each token's character offsets (``None`` when the tokenizer cannot report offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        return _tokens(tokenizer, text), None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), list(enc["offset_mapping"])


def label_spans(tokenizer, text: str, ids: list[int], offsets, spans: list[ReplySpan]) -> list[int]:
    """Labels of ``ids`` (the tokens of ``text``): a token that starts inside one of the character ``spans``
    is supervised, every other one is ``-100``."""
    return (_labels_from_offsets(ids, offsets, spans) if offsets is not None
            else _labels_without_offsets(tokenizer, text, ids, spans))


def _labels_from_offsets(ids, offsets, spans: list[ReplySpan]) -> list[int]:
    """Label the tokens that start inside a span (offsets are in text order, so a bisect finds them)."""
    starts = [s for s, _ in offsets]
    labels = [IGNORE_INDEX] * len(ids)
    for span in spans:
        lo, hi = bisect.bisect_left(starts, span.start), bisect.bisect_left(starts, span.end)
        labels[lo:hi] = ids[lo:hi]
    return labels


def _tokens_starting_before(tokenizer, text: str, ids: list[int], c: int) -> int:
    """How many tokens of ``ids`` start before character ``c``, without offsets: the tokens that ``text[:c]``
    shares with the whole, plus the one that straddles ``c`` if any."""
    prefix = _tokens(tokenizer, text[:c])
    n = 0
    while n < min(len(prefix), len(ids)) and prefix[n] == ids[n]:
        n += 1
    return n if n == len(prefix) else min(n + 1, len(ids))


def _labels_without_offsets(tokenizer, text, ids, spans: list[ReplySpan]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for span in spans:
        lo = _tokens_starting_before(tokenizer, text, ids, span.start)
        hi = _tokens_starting_before(tokenizer, text, ids, span.end)
        labels[lo:hi] = ids[lo:hi]
    return labels


def trained_spans(tokenizer, messages, tools, text: str, train_on: str) -> list[ReplySpan]:
    """The character spans of the replies ``train_on`` (and the per-message flags) select, in ``text``."""
    wanted = set(trained_turns(messages, train_on))

    def render_through(i: int) -> str:
        try:
            return render(tokenizer, messages[: i + 1], tools)
        except Exception:  # noqa: BLE001 - a template that refuses the prefix: no tool-call end from it
            return ""

    spans = reply_spans(text, messages, template_shape(tokenizer), special_strings(tokenizer), render_through)
    return [s for s in spans if s.message in wanted]


def encode_conversation(tokenizer, messages: list[dict[str, Any]], *, tools: Optional[list] = None,
                        train_on: str = "assistant", max_length: Optional[int] = None) -> dict[str, list[int]]:
    """Tokenize a conversation with its chat template and mask everything but the trained replies.

    Each trained assistant turn is supervised from the end of its generation prompt through the
    end-of-turn token the template emits after it, so the model learns to stop. Role headers, the
    generation prompt and all system/user/tool text get ``-100``.

    Example (ChatML, one token per piece for readability; ``<e>`` = ``<|im_end|>``)::

        messages  = [user "Hi", assistant "Yo"]
        input_ids = [<s> user \\n Hi <e> \\n <s> assistant \\n Yo <e> \\n]
        labels    = [-100 ...................................  Yo <e> -100]

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: ``[{"role", "content"}, ...]`` with at least one assistant turn.
        tools: Tool schemas passed to the template.
        train_on: ``assistant`` (every assistant turn), ``last`` (final assistant turn) or ``all``
            (every token).
        max_length: Truncate both lists to this many tokens.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length, ``-100`` where not supervised.

    Raises:
        MaskError: when a trained reply's text is not in the rendered conversation at all.
    """
    text, ids, offsets = render_and_tokenize(tokenizer, messages, tools)
    if train_on == "all":
        trained_turns(messages, train_on)  # still validates the per-message flags
        labels = list(ids)
    else:
        labels = label_spans(tokenizer, text, ids, offsets, trained_spans(tokenizer, messages, tools, text, train_on))
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_text(tokenizer, text: str, *, max_length: Optional[int] = None) -> dict[str, list[int]]:
    """Tokenize a plain document for full-loss training, ending it with the EOS token.

    Example::

        text      = "Rain falls."
        input_ids = [Rain, falls, ., <eos>]
        labels    = [Rain, falls, ., <eos>]

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` with every token supervised.
    """
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    if max_length is not None:
        ids = ids[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def supervised_runs(input_ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Split a sample into maximal runs of supervised and unsupervised tokens.

    Labels are aligned with ``input_ids`` (not shifted). Position 0 counts as unsupervised whatever its
    label: nothing predicts the first token, so the loss never trains it (``text`` sources label it).

    Example:
        >>> supervised_runs([5, 6, 7, 8, 2, 9], [-100, -100, 7, 8, 2, -100])
        [(False, [5, 6]), (True, [7, 8, 2]), (False, [9])]
        >>> supervised_runs([9, 10, 11], [9, 10, 11])  # the first token is never a target
        [(False, [9]), (True, [10, 11])]
    """
    runs: list[tuple[bool, list[int]]] = []
    for i, (tok, lab) in enumerate(zip(input_ids, labels)):
        sup = i > 0 and lab != IGNORE_INDEX
        if runs and runs[-1][0] == sup:
            runs[-1][1].append(tok)
        else:
            runs.append((sup, [tok]))
    return runs
