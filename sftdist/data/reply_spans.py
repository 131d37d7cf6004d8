"""Find, in one rendered conversation, the character span of every assistant reply a model generates.

A reply's span runs from the end of its generation prompt (the assistant header) to the end of the
end-of-turn token that closes it. It is found from the reply's own text, searched in message order, so it
holds for templates that move the system prompt (Mistral v0.3), drop earlier turns' reasoning (Qwen3,
DeepSeek-R1), append an EOS to finished conversations (Phi-3) or have no end-of-turn token (Falcon):

* the anchor is the reply's content as rendered: verbatim, stripped, or (when the template drops
  reasoning) the answer after ``</think>``; then the names of its tool calls, which lie after it;
* the span starts after the last generation-prompt header in the text between the previous message and
  the anchor, so scaffolding the model generates itself (``<think>\\n\\n</think>\\n\\n``) is trained; when
  no header is found there (templates that render the header with the user turn) it starts at the
  anchor, taking in the spaces right before it, which tokenizers merge into the reply's first word;
* the span ends at the first end-of-turn token after the anchor that comes before the next message's
  text (and at an EOS right after it, which some templates append to a finished conversation); for a
  tool call that none closes there, where the conversation rendered only up to this reply stops agreeing
  with the whole (the call's own closing token); otherwise at the anchor's end (the model then never sees
  a stop token).

A reply the template does not render at all (empty content, tool calls a template ignores) has no span:
there is nothing of it to train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from sftdist.data.messages import REASONING_KEYS
from sftdist.data.template_shape import TemplateShape, common_prefix, snap_to_token


class MaskError(ValueError):
    """The chat template renders a conversation so that no exact mask can be derived."""


@dataclass(frozen=True)
class ReplySpan:
    """Where assistant message ``message`` sits in the rendered text, as character offsets.

    ``start <= anchor_start <= anchor_end <= end``: ``[start, end)`` is trained, ``[anchor_start,
    anchor_end)`` is the located reply text, and ``eot`` says whether ``end`` closes an end-of-turn token.
    """

    message: int
    start: int
    anchor_start: int
    anchor_end: int
    end: int
    eot: bool


def reply_texts(content: str) -> list[str]:
    """The forms in which a template may render an assistant reply, most faithful first.

    Example:
        >>> reply_texts("<think>\\nhm\\n</think>\\n\\n Paris. ")
        ['<think>\\nhm\\n</think>\\n\\n Paris. ', '<think>\\nhm\\n</think>\\n\\n Paris.', ' Paris. ', 'Paris.', 'hm']
    """
    forms = [content, content.strip()]
    if "</think>" in content:  # templates that drop the reasoning of earlier turns keep only the answer
        answer = content.split("</think>")[-1]
        forms += [answer.lstrip("\n"), answer.strip()]
        # Last resort: the reasoning alone, which Qwen3 keeps when the answer after it is empty.
        forms.append(content.split("</think>")[0].split("<think>")[-1].strip())
    return [f for f in dict.fromkeys(forms) if f]


def reasoning_texts(message: dict[str, Any]) -> list[str]:
    """A reply's reasoning fields (``reasoning_content``, ``thinking``), stripped: the last resort for locating
    a reply whose content the template renders empty (a reply that only reasons, or only calls a tool).

    Example:
        >>> reasoning_texts({"role": "assistant", "content": "", "reasoning_content": "\\n5 is odd.\\n"})
        ['5 is odd.']
    """
    return [m.strip() for m in (message.get(k) for k in REASONING_KEYS) if isinstance(m, str) and m.strip()]


def _find_any(text: str, forms: list[str], start: int) -> Optional[tuple[int, int]]:
    for form in forms:
        pos = text.find(form, start)
        if pos >= 0:
            return pos, pos + len(form)
    return None


def _plain_texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content") or ""
    return [f for f in dict.fromkeys([content, content.strip()]) if f]


def _forms(message: dict[str, Any]) -> list[str]:
    return reply_texts(message.get("content") or "") if message["role"] == "assistant" else _plain_texts(message)


def _next_text(text: str, later: list[dict[str, Any]], start: int) -> int:
    """Where the text of the first later (non-system) message found after ``start`` begins."""
    nxt = next((w for w in (_find_any(text, _forms(m), start) for m in later if m["role"] != "system") if w), None)
    return nxt[0] if nxt else len(text)


def _first_header(text: str, cursor: int, headers: list[str]) -> Optional[tuple[int, int]]:
    """The earliest generation-prompt header after ``cursor`` (the longest one where several start there)."""
    hits = [(pos, -len(h)) for h in headers if (pos := text.find(h, cursor)) >= 0]
    return (min(hits)[0], min(hits)[0] - min(hits)[1]) if hits else None


def _anchor(text: str, message: dict[str, Any], cursor: int, later: list[dict[str, Any]],
            headers: list[str]) -> Optional[tuple[int, int]]:
    """The reply's rendered content and tool-call names, as one character range after ``cursor``.

    A reply starts after its own generation prompt, so a match that starts before the end of the next
    header (a reply that reads ``assistant``, or is only whitespace) is searched again after it, up to
    the next message's text. Tool-call names are searched only before the text of the first later message
    found (``later``): a template that does not render tool calls may still name the function later, in a
    tool's response or in the next reply's reasoning.
    """
    forms = reply_texts(message.get("content") or "") + reasoning_texts(message)
    found = _find_any(text, forms, cursor)
    header = _first_header(text, cursor, headers) if found else None
    if found and header and found[0] < header[1]:
        again = _find_any(text, forms, header[1])
        found = again if again and again[0] < _next_text(text, later, header[1]) else found
    start, end = found if found else (None, cursor)
    limit = _next_text(text, later, end) if message.get("tool_calls") else len(text)
    for call in message.get("tool_calls") or []:
        name = call.get("function", {}).get("name", "")
        pos = text.find(name, end, limit) if name else -1
        if pos >= 0:
            start, end = (pos if start is None else start), pos + len(name)
    return None if start is None else (start, end)


def _overtakes_next_reply(text: str, messages: list[dict[str, Any]], i: int, cursor: int, end: int) -> bool:
    """Whether a match of message ``i`` ending at ``end`` lies past the next reply's text: then it matched
    inside that reply (a tool result the template drops, quoted by the reply) and is not message ``i``."""
    reply = next((m for m in messages[i + 1:] if m["role"] == "assistant" and (m.get("content") or "").strip()), None)
    if reply is None:
        return False
    forms = reply_texts(reply["content"])
    return _find_any(text, forms, end) is None and _find_any(text, forms, cursor) is not None


def locate_messages(text: str, messages: list[dict[str, Any]],
                    headers: Optional[list[str]] = None) -> dict[int, tuple[int, int]]:
    """Character ranges of the messages found in ``text``, searched in order.

    System messages are skipped: templates move them (Mistral v0.3 puts the system prompt in the last user
    turn). A user or tool message that is not found verbatim (a template may quote it as JSON, or drop it)
    does not move the search on, nor does a match that would step over the next reply's text. ``headers``
    are the generation-prompt candidates (``TemplateShape.header_candidates``); a reply is never found
    inside or before its own.

    Example:
        >>> locate_messages("U:hi A:hi!", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi!"}])
        {0: (2, 4), 1: (7, 10)}
    """
    found: dict[int, tuple[int, int]] = {}
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        if m["role"] == "assistant":
            where = _anchor(text, m, cursor, messages[i + 1:], headers or [])
        else:
            where = _find_any(text, _plain_texts(m), cursor)
            if where is not None and _overtakes_next_reply(text, messages, i, cursor, where[1]):
                where = None
        if where is not None:
            found[i] = where
            cursor = where[1]
    return found


def _header_end(text: str, lo: int, anchor: int, headers: list[str]) -> Optional[int]:
    """End of the last generation-prompt header that starts in ``[lo, anchor]``. It may run into the
    anchor: Qwen3.5's prompt ends with ``<think>\\n``, which the final reply's text also starts with."""
    for header in headers:
        pos = text.rfind(header, lo, anchor + len(header))
        if pos > anchor:  # an occurrence inside the reply's own text is not its prompt
            pos = text.rfind(header, lo, anchor)
        if pos >= 0:
            return pos + len(header)
    return None


def _turn_end(text: str, a1: int, bound: int, shape: TemplateShape) -> Optional[int]:
    """End of the first end-of-turn token after the reply (and of an EOS right after it), before ``bound``."""
    hits = [(pos, tok) for tok in shape.end_tokens if (pos := text.find(tok, a1, bound)) >= 0]
    if not hits:
        return None
    pos, tok = min(hits)
    end = pos + len(tok)
    closing_eos = re.compile(r"\s*" + re.escape(shape.eos)).match(text, end, bound) if shape.eos else None
    return closing_eos.end() if closing_eos else end


def _tool_call_end(text: str, a1: int, bound: int, rendered_through: str, special: tuple[str, ...]) -> int:
    """Where a tool-calling reply stops agreeing with the conversation rendered only up to it: the call's
    own closing (GLM's ``</tool_call>``, gpt-oss's ``<|call|>``) when no end-of-turn token follows it before
    the tool's response (Gemma-4 keeps call and response in one model turn)."""
    end = snap_to_token(text, min(common_prefix(rendered_through, text), bound), special)
    while end > a1 and text[end - 1].isspace():
        end -= 1
    return max(end, a1)


def reply_spans(text: str, messages: list[dict[str, Any]], shape: TemplateShape, special: tuple[str, ...],
                render_through: Optional[Callable[[int], str]] = None) -> list[ReplySpan]:
    """The trained character span of every assistant reply the template renders.

    Example (``<A>`` is the generation prompt, ``<e>`` the end-of-turn token)::

        text  = "<U>hi<e><A>yo<e>"
        spans = [ReplySpan(message=1, start=11, anchor_start=11, anchor_end=13, end=16, eot=True)]

    Args:
        text: The rendered conversation.
        messages: The conversation.
        shape: The template's generation prompt and end-of-turn tokens (``template_shape``).
        special: The tokenizer's special-token strings (``special_strings``).
        render_through: ``i -> render of messages[:i+1]``; used only for a tool-calling reply that no
            end-of-turn token closes before the next message.

    Raises:
        MaskError: when an assistant message with content is not in the rendered text at all.
    """
    headers = shape.header_candidates(special)
    located = locate_messages(text, messages, headers)
    order = sorted(located)
    spans = []
    for k, i in enumerate(order):
        if messages[i]["role"] != "assistant":
            continue
        a0, a1 = located[i]
        prev_end = located[order[k - 1]][1] if k else 0
        bound = located[order[k + 1]][0] if k + 1 < len(order) else len(text)
        start = _header_end(text, prev_end, a0, headers)
        if start is None:
            # "[/INST] Hat.": the space before the reply belongs to its first token ("▁Hat").
            start = a0 - (len(text[prev_end:a0]) - len(text[prev_end:a0].rstrip(" ")))
        end = _turn_end(text, a1, bound, shape)
        eot = end is not None
        if end is None and messages[i].get("tool_calls") and render_through is not None:
            end = _tool_call_end(text, a1, bound, render_through(i), special)
        spans.append(ReplySpan(i, min(start, a1), a0, a1, a1 if end is None else end, eot))
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i not in located and (m.get("content") or "").strip():
            raise MaskError(f"the text of assistant message {i} ({m['content'][:40]!r}) is not in the rendered "
                            f"conversation [{shape.family}]")
    return spans
