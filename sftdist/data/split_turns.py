"""One sample per trained assistant turn, each rendered as at inference, for the conversations that a chat
template renders otherwise (``data.split_turns``).

A conversation is rendered once and every reply is trained inside that rendering. Some templates render a
turn there otherwise than the model meets it at inference. Qwen3's drops the reasoning of the turns before
the last user message, and the empty ``<think>`` block of a final reply. DeepSeek-R1's drops the reasoning of
every turn, the last one too, and opens ``<think>\\n`` in its generation prompt instead. Mistral v0.3's renders
the system prompt only inside a final user message, so a conversation that ends with a reply has none. At
inference, turn ``k`` is the generation prompt of the messages before it
(``apply_chat_template(messages[:k], add_generation_prompt=True)``) followed by what the model writes. Its
*view* here is one of two texts:

* the template's own rendering of ``messages[:k+1]``, when that agrees with the generation prompt and keeps
  the reply whole (Qwen3 keeps a final reply's reasoning; of the shared templates only DeepSeek-R1 with
  reasoning, and Mistral v0.3 with a system prompt, need the other text);
* otherwise the generation prompt, then the reply: the reasoning the template dropped (taken from the
  reply's own text), then the reply and its end-of-turn token as the template renders them, less what the
  generation prompt already supplied (DeepSeek-R1's ``<think>\\n``). A prompt that closes the thinking block
  (DeepSeek-V3.1's non-thinking ``</think>``) gets no reasoning put back.

A turn is trained as at inference inside the whole conversation when the whole rendering starts with its
view, up to and including the reply's end-of-turn token (what a template appends after that at the very end,
such as Phi-3's EOS, does not count). ``auto`` splits a conversation exactly when one of its trained turns
is not trained as at inference; ``always`` also splits every other conversation with more than one trained
turn; ``never`` keeps every conversation whole. The test renders the conversation itself, so it works for
templates sftdist has never seen, whatever they rewrite. Splitting costs compute: a conversation of n turns
becomes n samples, together about (n+1)/2 times as long as the whole.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from sftdist.data.reply_spans import ReplySpan, reply_spans
from sftdist.data.template_shape import (
    PROBE,
    PROBE_SYSTEM,
    TemplateShape,
    common_prefix,
    render,
    snap_to_token,
    special_strings,
    template_shape,
)
from sftdist.data.tokenize import encode_conversation, label_spans, tokenize_text, trained_turns

_PROBE_REASONING = "<think>\nOne word is asked for.\n</think>\n\n"
# Conversations that show what a template rewrites: nothing but a reply, reasoning in the content or in a
# field of its own, a system prompt. Plain words, so that no template strips, escapes or branches on them.
HISTORY_PROBES = {
    "plain": PROBE,
    "reasoning": [{**m, "content": _PROBE_REASONING + m["content"]} if m["role"] == "assistant" else m
                  for m in PROBE],
    "reasoning_content": [{**m, "reasoning_content": "One word is asked for."} if m["role"] == "assistant"
                          else m for m in PROBE],
    "system": [PROBE_SYSTEM, *PROBE],
}


@dataclass(frozen=True)
class TurnView:
    """Assistant turn ``turn`` as the model meets it at inference.

    Attributes:
        turn: The assistant message's index in the conversation.
        text: The conversation through that reply and its end-of-turn token.
        built: ``False`` when ``text`` is the template's rendering of ``messages[:turn+1]`` (labelled like any
            conversation); ``True`` when it is the generation prompt followed by the reply.
        prompt_end: Where the generation prompt ends in ``text``; with ``built``, what is trained starts here.
        turn_end: Where the reply's end-of-turn token ends in ``text``: the whole conversation must agree with
            ``text`` up to here for the turn to be trained as at inference there.
    """

    turn: int
    text: str
    built: bool
    prompt_end: int
    turn_end: int


def turn_messages(messages: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The conversation up to assistant message ``k``, with that reply trained and no other.

    Example:
        >>> msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        ...         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
        >>> [(m["content"], m.get("train")) for m in turn_messages(msgs, 1)]
        [('a', None), ('b', True)]
        >>> [m.get("train") for m in turn_messages(msgs, 3)]
        [None, False, None, True]
    """
    return [{**m, "train": j == k} if m["role"] == "assistant" else m for j, m in enumerate(messages[:k + 1])]


def dropped_text(content: str, rendered: str, final: str) -> str:
    """What of a reply's ``content`` the template dropped in front of the part it ``rendered`` after the
    generation prompt (the reasoning of a ``<think>`` block); ``""`` when it rendered the content whole, when
    ``rendered`` is not the content's end, or when what is missing is elsewhere in the ``final`` rendering
    (the ``<think>\\n`` that Qwen3.5's generation prompt itself opens the reply with).

    Example:
        >>> dropped_text("<think>\\n9 is 3 squared.\\n</think>\\n\\nThree.", "\\n\\nThree.", "<A>\\n\\nThree.<e>")
        '<think>\\n9 is 3 squared.\\n</think>'
        >>> dropped_text("Three.", "Three.", "<A>Three.<e>")
        ''
        >>> dropped_text("<think>\\nhm\\n</think>Three.", "hm\\n</think>Three.", "<A><think>\\nhm\\n</think>Three.<e>")
        ''
    """
    body, rendered = content.rstrip(), rendered.rstrip()
    at = body.rfind(rendered) if rendered.strip() else -1
    missing = content[:at] if at > 0 and at + len(rendered) == len(body) else ""
    return missing if missing.strip() and missing.strip() not in final else ""


def prompt_closes(prompt: str, dropped: str) -> bool:
    """Whether the generation prompt already ends with the closing tag that ends the ``dropped`` reasoning: a
    prompt that shuts the thinking block (DeepSeek-V3.1's non-thinking ``<｜Assistant｜></think>``) leaves no
    room for reasoning, so none is put back after it.

    Example:
        >>> reasoning = "<think>\\nhm\\n</think>"
        >>> prompt_closes("<A></think>", reasoning), prompt_closes("<A><think>\\n", reasoning)
        (True, False)
    """
    tag = re.search(r"</[^<>\s]{1,40}>\s*$", dropped)
    return bool(tag) and prompt.rstrip().endswith(tag.group().strip())


def after_supplied(supplied: str, reply: str) -> str:
    """``reply`` less the opening that the generation prompt already ``supplied`` (the text it adds after the
    header a finished turn has, e.g. DeepSeek-R1's ``<think>\\n``), whitespace after it included.

    Example:
        >>> after_supplied("<think>\\n", "<think>\\nhm\\n</think>\\n\\nOK<e>")
        'hm\\n</think>\\n\\nOK<e>'
        >>> after_supplied("<think>\\n", "<think>hm</think>OK<e>")
        'hm</think>OK<e>'
        >>> after_supplied("<think>\\n", "hm\\n</think>\\n\\nOK<e>")  # the reply continues the prompt as it is
        'hm\\n</think>\\n\\nOK<e>'
    """
    head, body = supplied.strip(), reply.lstrip()
    if not head or not body.startswith(head):
        return reply
    rest, tail = body[len(head):], supplied[len(supplied.rstrip()):]
    return rest[len(tail):] if tail and rest.startswith(tail) else rest


def _end_of_turn(text: str, span: ReplySpan, shape: TemplateShape) -> int:
    """The end of the first end-of-turn token after the reply's text (the span's end when there is none)."""
    hits = [(pos, pos + len(t)) for t in shape.end_tokens if (pos := text.find(t, span.anchor_end, span.end)) >= 0]
    return min(hits)[1] if hits else span.end


def turn_view(tokenizer, messages: list[dict[str, Any]], tools, k: int,
              whole: Optional[str] = None) -> Optional[TurnView]:
    """Assistant message ``k`` as the model meets it at inference (see the module docstring).

    Args:
        whole: The rendering of all of ``messages``, when the caller has it (saves one render of the last turn).

    Returns:
        The view, or ``None`` when the template renders nothing of the reply (nothing to train).

    Raises:
        MaskError: when the reply's text is not in the template's rendering of ``messages[:k+1]``.
    """
    special, shape = special_strings(tokenizer), template_shape(tokenizer)
    final = whole if whole is not None and k == len(messages) - 1 else render(tokenizer, messages[:k + 1], tools)
    span = next((s for s in reply_spans(final, messages[:k + 1], shape, special) if s.message == k), None)
    if span is None:
        return None
    try:
        prompt = render(tokenizer, messages[:k], tools, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - no prompt to compare with (a conversation that opens with a reply)
        return TurnView(k, final, False, span.start, _end_of_turn(final, span, shape))
    follows = final.startswith(prompt)
    agrees = follows or snap_to_token(final, common_prefix(prompt, final), special) >= span.start
    start = len(prompt) if follows else span.start
    dropped = dropped_text(messages[k].get("content") or "", final[start:span.anchor_end], final)
    dropped = "" if prompt_closes(prompt, dropped) else dropped
    end_of_turn = _end_of_turn(final, span, shape)
    if agrees and not dropped:
        return TurnView(k, final, False, start, end_of_turn)
    supplied = prompt[span.start:] if agrees and not follows else ""
    text = prompt + after_supplied(supplied, dropped + final[start:span.end])
    return TurnView(k, text, True, len(prompt), len(text) - (span.end - end_of_turn))


def split_views(tokenizer, messages: list[dict[str, Any]], tools, *, train_on: str,
                split_turns: str) -> Optional[list[TurnView]]:
    """The views of the trained turns to make samples of, or ``None`` to keep the conversation whole.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages, tools: The conversation.
        train_on: ``data.train_on``; ``all`` trains every token, so it never splits.
        split_turns: ``auto`` (split when a trained turn is not trained as at inference in the whole
            rendering), ``always`` (also split every conversation with more than one trained turn), ``never``.
    """
    if split_turns == "never" or train_on == "all":
        return None
    whole = render(tokenizer, messages, tools)
    trained = trained_turns(messages, train_on)
    try:
        views = [v for k in trained if (v := turn_view(tokenizer, messages, tools, k, whole))]
    except Exception:  # noqa: BLE001 - a template that refuses a prefix: the whole is all it renders
        return None
    rewritten = any(not whole.startswith(v.text[:v.turn_end]) for v in views)
    return views if rewritten or (split_turns == "always" and len(views) > 1) else None


def encode_turn(tokenizer, messages: list[dict[str, Any]], tools, view: TurnView) -> dict[str, list[int]]:
    """The sample of one turn's view, with only that reply supervised (through its end-of-turn token).

    A view the template rendered is encoded like any conversation (its ids are
    ``apply_chat_template(messages[:k+1])``'s); in a built one, everything after the generation prompt is
    the reply, trained.
    """
    if not view.built:
        return encode_conversation(tokenizer, turn_messages(messages, view.turn), tools=tools, train_on="assistant")
    ids, offsets = tokenize_text(tokenizer, view.text)
    end = len(view.text)
    reply = ReplySpan(view.turn, view.prompt_end, view.prompt_end, end, end, True)
    return {"input_ids": ids, "labels": label_spans(tokenizer, view.text, ids, offsets, [reply])}


def encode_samples(tokenizer, messages: list[dict[str, Any]], tools=None, *, train_on: str = "assistant",
                   split_turns: str = "auto") -> list[tuple[Optional[TurnView], dict[str, list[int]]]]:
    """The samples one conversation becomes: itself, or one per trained turn.

    Example (Qwen3, which drops an earlier turn's reasoning; ``<e>`` = ``<|im_end|>``)::

        messages = [user "2+2?", assistant "<think>…</think>4", user "3+3?", assistant "<think>…</think>6"]
        auto     -> [(view of turn 1, [.. user 2+2? <e> assistant <think>…</think>4 <e>]),     # 4 <e> trained
                     (view of turn 3, [.. 2+2? .. assistant 4 <e> .. 3+3? .. <think>…</think>6 <e>])]  # 6 <e>
        never    -> [(None, the whole conversation, both replies trained, the first without its reasoning)]

    Returns:
        ``(view, {"input_ids", "labels"})`` per sample; ``view`` is ``None`` for a conversation kept whole.

    Raises:
        MaskError: when a trained reply's text is not in the rendered conversation.
    """
    views = split_views(tokenizer, messages, tools, train_on=train_on, split_turns=split_turns)
    if views is None:
        return [(None, encode_conversation(tokenizer, messages, tools=tools, train_on=train_on))]
    return [(view, encode_turn(tokenizer, messages, tools, view)) for view in views]


_REWRITES: dict[str, tuple[str, ...]] = {}


def history_rewrites(tokenizer) -> tuple[str, ...]:
    """Which of the ``HISTORY_PROBES`` conversations a chat template renders otherwise than at inference,
    i.e. which ``data.split_turns=auto`` splits (measured once per template and special-token set).

    Returns:
        The probes' names, e.g. ``('plain', 'reasoning', 'reasoning_content', 'system')`` for Qwen3, ``()``
        for a template that renders every turn as at inference. A probe the template refuses (a system
        message, with tools unset and empty) is left out.
    """
    key = hashlib.sha256(json.dumps([tokenizer.chat_template, special_strings(tokenizer), tokenizer.eos_token,
                                     tokenizer.bos_token], default=str).encode()).hexdigest()
    if key not in _REWRITES:
        found = []
        for name, probe in HISTORY_PROBES.items():
            for tools in (None, []):  # Phi-4-mini's template crashes on tools=None
                try:
                    split = split_views(tokenizer, probe, tools, train_on="assistant", split_turns="auto")
                except Exception:  # noqa: BLE001 - a template refusing the probe: try the next one
                    continue
                if split is not None:
                    found.append(name)
                break
        _REWRITES[key] = tuple(found)
    return _REWRITES[key]
