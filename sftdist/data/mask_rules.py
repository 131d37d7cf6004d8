"""The rules a conversation's masks must obey, checked by a method independent of the encoder.

The encoder searches reply texts in one render. These checks instead re-render the conversation with one
message's text swapped for a sentinel: the characters that change are exactly where the template put
that message, wherever it moved it. The generation prompt comes from rendering the conversation up to
each reply with ``add_generation_prompt=True``. The mask audit and the tests both run these rules:

* ``token_ids``: the ids equal ``apply_chat_template(tokenize=True)``;
* ``labels_aligned``: a supervised label equals its input id (labels are not pre-shifted);
* ``reply_trained``: every token inside a trained reply (its content, reasoning and tool-call names) is
  supervised;
* ``end_of_turn_trained``: the end-of-turn token right after a trained reply is supervised;
* ``only_replies_trained``: nothing else is: no system, user or tool text, no untrained reply, no header
  of the next turn. Allowed besides the replies: what the model generates between its generation prompt
  and the reply (``<think>\\n\\n</think>``), a tool call's rendering, a token straddling a reply's edge
  (required when what lies outside the reply is whitespace), and the reply's tail of whitespace and
  special tokens up to the next turn's opener.

A conversation split into one sample per turn (``split_turns``) has each sample checked: one the template
rendered by the rules above, one built as the generation prompt plus the reply by ``check_built_sample``;
one kept whole, under ``data.split_turns`` auto or always, also by ``check_history``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sftdist.data.messages import REASONING_KEYS
from sftdist.data.reply_spans import reply_texts
from sftdist.data.split_turns import turn_view
from sftdist.data.template_shape import common_prefix, render, snap_to_token, special_strings, template_shape
from sftdist.data.tokenize import render_and_tokenize, tokenize_text

SENTINEL = "\u2591sftdist\u2591"  # never stripped or escaped by a template; unlikely in real text
# Special tokens whose names say they open a turn; they never end one.
OPENER_WORDS = ("start", "begin", "user", "system", "header", "[inst]", "<s>", "bos", "assistant", "human",
                "observation", "role")


@dataclass(frozen=True)
class MaskProblem:
    """One broken rule, with the token that shows it."""

    rule: str
    detail: str

    def __str__(self) -> str:
        return f"rule {self.rule}: {self.detail}"


def _changed(text: str, other: str) -> tuple[int, int]:
    """The range of ``text`` that differs from ``other`` (common prefix and suffix removed)."""
    p = common_prefix(text, other)
    q = 0
    while q < min(len(text), len(other)) - p and text[-1 - q] == other[-1 - q]:
        q += 1
    return p, len(text) - q


def _with(messages, i, **changes):
    return [({**m, **changes} if j == i else m) for j, m in enumerate(messages)]


def message_regions(tokenizer, messages, tools, text) -> dict[int, tuple[int, int]]:
    """Where each message's own text (and an assistant's reasoning field and tool-call names) lies in ``text``.

    A message is missing when swapping its text changes nothing recognisable (the template drops it).
    """
    regions = {}
    for i, m in enumerate(messages):
        found = []
        content = m.get("content") or ""
        forms = reply_texts(content) if m["role"] == "assistant" else [content, content.strip()]
        if content:
            try:
                a, b = _changed(text, render(tokenizer, _with(messages, i, content=SENTINEL), tools))
            except Exception:  # noqa: BLE001 - the template refuses the sentinel: nothing to compare
                a, b = 0, -1
            if any(f and f in text[a:b] for f in forms):
                found.append((a, b))
        for key in REASONING_KEYS if m["role"] == "assistant" else ():
            reasoning = m.get(key)
            if not (isinstance(reasoning, str) and reasoning.strip()):
                continue
            try:  # a template that drops the field (earlier turns, or always) changes nothing: no region
                a, b = _changed(text, render(tokenizer, _with(messages, i, **{key: SENTINEL}), tools))
            except Exception:  # noqa: BLE001
                continue
            if reasoning.strip() in text[a:b]:
                found.append((a, b))
        for k, call in enumerate(m.get("tool_calls") or []):
            calls = [dict(c) for c in m["tool_calls"]]
            calls[k] = {**call, "function": {**call["function"], "name": f"{SENTINEL}{k}"}}
            try:
                a, b = _changed(text, render(tokenizer, _with(messages, i, tool_calls=calls), tools))
            except Exception:  # noqa: BLE001
                continue
            name = call["function"]["name"]
            if text.startswith(name, a):  # the name itself, not a later header that repeats it (gpt-oss)
                found.append((a, a + len(name)))
        if found:
            regions[i] = (min(a for a, _ in found), max(b for _, b in found))
    return regions


def _opens_turn(piece: str) -> bool:
    return any(w in piece.lower() for w in OPENER_WORDS)


def _generation_end(tokenizer, messages, tools, text, i, regions, special) -> Optional[int]:
    """Where the generation prompt before reply ``i`` ends in ``text``, if the prefix render agrees there."""
    try:
        prompt = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
    except Exception:  # noqa: BLE001
        return None
    end = snap_to_token(text, common_prefix(prompt, text), special)
    before = [b for j, (_, b) in regions.items() if j < i]
    # The prefix render may diverge early (a template that moves the system prompt to the last user turn).
    # It may also end inside the reply's text: Qwen3.5's prompt ends with the reply's opening "<think>\n".
    return end if end >= max(before, default=0) and end < regions[i][1] else None


def _mark_reply(text, offsets, special, reply: tuple[int, int], *, lo: int, gen_end: Optional[int], bound: int,
                has_tool_calls: bool, required: list[bool], allowed: list[bool]) -> None:
    """Mark the tokens one trained reply requires (its text, its end-of-turn) and allows (scaffolding
    after the generation prompt from ``lo``, edge straddlers, its tail up to the next turn at ``bound``)."""
    a, b = reply
    tail_open, first_special = True, True
    for t, (s, e) in enumerate(offsets):
        piece = text[s:e]
        if s >= a and e <= b and e > s:
            required[t] = allowed[t] = True
        elif s < a < e or s < b < e:
            # A word that carries the space before the reply ("[/INST] Sorry" -> "▁Sorry") or the newline
            # after it (Falcon's ".\n") is the reply's own first or last token.
            allowed[t] = True
            outside = text[s:a] if s < a else text[b:e]
            required[t] = required[t] or (outside.strip() == "" and (s >= a or gen_end is None or s >= gen_end))
        elif s >= lo and e <= b:
            allowed[t] = True  # scaffolding the model generates after its generation prompt
        elif s >= b and tail_open and s < bound:
            is_special = piece in special
            if is_special and not _opens_turn(piece):
                allowed[t] = True
                required[t] = required[t] or first_special
                first_special = False
            elif (not is_special and piece.strip() == "") or (has_tool_calls and not is_special):
                allowed[t] = True  # whitespace, or the rest of a tool call's rendering
            else:
                tail_open = False


def check_masks(tokenizer, messages: list[dict[str, Any]], tools, enc: dict, trained: list[int],
                train_on: str = "assistant") -> list[MaskProblem]:
    """Every broken rule for one encoded conversation (empty when its masks are exact).

    Args:
        tokenizer: The tokenizer (with its chat template) that encoded the conversation.
        messages, tools: The conversation as given to the encoder.
        enc: The encoder's ``{"input_ids", "labels"}`` (untruncated).
        trained: Indices of the assistant messages that should be trained.
        train_on: ``all`` checks only the ids and that every token is supervised.
    """
    ids, labels = list(enc["input_ids"]), list(enc["labels"])
    reference = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"]
    if ids != list(reference):
        return [MaskProblem("token_ids", f"{len(ids)} ids differ from apply_chat_template's {len(reference)}")]
    for i, (lab, tid) in enumerate(zip(labels, ids)):
        if lab != -100 and lab != tid:
            return [MaskProblem("labels_aligned", f"label {lab} at token {i} is not its input id {tid}")]
    if train_on == "all":
        missing = [i for i, lab in enumerate(labels) if lab == -100]
        return [MaskProblem("reply_trained", f"train_on=all leaves token {missing[0]} unsupervised")] if missing else []
    text, _, offsets = render_and_tokenize(tokenizer, messages, tools)
    if offsets is None:
        return []  # a tokenizer without offsets: only the token ids can be checked
    special_order = special_strings(tokenizer)
    special = set(special_order)
    regions = message_regions(tokenizer, messages, tools, text)
    sup = [lab != -100 for lab in labels]
    required, allowed = [False] * len(ids), [False] * len(ids)
    for i in trained:
        if i not in regions:
            continue  # the template does not render this reply
        a, b = regions[i]
        later = [s for j, (s, _) in regions.items() if j > i]
        bound = min(later, default=len(text))
        gen_end = _generation_end(tokenizer, messages, tools, text, i, regions, special_order)
        lo = a if gen_end is None else gen_end
        a = max(a, lo)  # what the generation prompt supplies is not the model's to generate
        _mark_reply(text, offsets, special, (a, b), lo=lo, gen_end=gen_end, bound=bound,
                    has_tool_calls=bool(messages[i].get("tool_calls")), required=required, allowed=allowed)
    problems = []
    shape = template_shape(tokenizer)
    for t in range(len(ids)):
        if required[t] and not sup[t]:
            kind = "end_of_turn_trained" if text[offsets[t][0]:offsets[t][1]] in special else "reply_trained"
            problems.append(MaskProblem(kind, f"token {t} {tokenizer.decode([ids[t]])!r} is not supervised "
                                              f"[{shape.family}]"))
            break
    for t in range(len(ids)):
        if sup[t] and not allowed[t]:
            problems.append(MaskProblem("only_replies_trained", f"token {t} {tokenizer.decode([ids[t]])!r} is "
                                        f"supervised but is not part of a trained reply [{shape.family}]"))
            break
    return problems


def _reply_pieces(message: dict[str, Any]) -> list[str]:
    """A reply's reasoning and answer, whitespace collapsed: what a sample of it must train, in order."""
    content = message.get("content") or ""
    reasoning, _, answer = content.rpartition("</think>")
    pieces = [reasoning.split("<think>")[-1], answer, *(message.get(k) or "" for k in REASONING_KEYS)]
    return [" ".join(p.split()) for p in pieces if p.strip()]


def check_built_sample(tokenizer, messages: list[dict[str, Any]], tools, turn: int, enc: dict) -> list[MaskProblem]:
    """Every broken rule for the sample of reply ``turn`` built as the generation prompt plus the reply
    (``split_turns.turn_view``): a template that drops the reply's reasoning even from a final turn
    (DeepSeek-R1), or renders the turns before it otherwise than its generation prompt (Mistral v0.3).

    * ``prompt_as_at_inference``: the ids start with ``apply_chat_template(messages[:turn],
      add_generation_prompt=True, tokenize=True)``, the prompt inference feeds, and none of it is supervised;
    * ``labels_aligned``; ``reply_trained``: every token after the prompt is supervised, they hold the
      reply's reasoning and answer, and they do not start by repeating what the prompt ends with;
      ``end_of_turn_trained``: the last one is the template's end-of-turn token (or the EOS it appends to a
      finished conversation right after it).
    """
    ids, labels = list(enc["input_ids"]), list(enc["labels"])
    prompt = list(tokenizer.apply_chat_template(messages[:turn], tools=tools, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
    if ids[:len(prompt)] != prompt:
        return [MaskProblem("prompt_as_at_inference", f"the sample's first {len(prompt)} ids differ from the "
                                                      f"generation prompt of messages[:{turn}]")]
    for t, (lab, tid) in enumerate(zip(labels, ids)):
        if lab != -100 and lab != tid:
            return [MaskProblem("labels_aligned", f"label {lab} at token {t} is not its input id {tid}")]
    if any(lab != -100 for lab in labels[:len(prompt)]):
        return [MaskProblem("prompt_as_at_inference", "a token of the generation prompt is supervised")]
    if len(ids) == len(prompt) or any(lab == -100 for lab in labels[len(prompt):]):
        return [MaskProblem("reply_trained", f"reply {turn}: not every token after the generation prompt is "
                                             f"supervised")]
    completion = tokenizer.decode(ids[len(prompt):])
    said = tokenizer.decode(prompt)
    repeated = next((completion[:n] for n in range(min(64, len(said), len(completion)), 0, -1)
                     if completion[:n].strip() and said.endswith(completion[:n])), "")
    if repeated:  # what the prompt supplies, written again (a doubled "<think>\n")
        return [MaskProblem("reply_trained", f"reply {turn} starts by repeating the end of its generation prompt "
                                             f"({repeated!r})")]
    reply = " ".join(completion.split())
    missing = [p for p in _reply_pieces(messages[turn]) if p not in reply]
    if missing:
        return [MaskProblem("reply_trained", f"reply {turn}: {missing[0][:40]!r} is not among its trained tokens")]
    shape = template_shape(tokenizer)
    last = tokenizer.convert_ids_to_tokens(ids[-1])
    if shape.end_tokens and last not in (*shape.end_tokens, shape.eos):
        return [MaskProblem("end_of_turn_trained", f"reply {turn} ends with {last!r}, not an end-of-turn token "
                                                   f"[{shape.family}]")]
    return []


def check_history(tokenizer, messages: list[dict[str, Any]], tools, enc: dict, trained: list[int]) -> list[MaskProblem]:
    """``history_as_at_inference``: in a conversation kept whole, each trained reply's tokens, and all before
    them, are those it has at inference (its ``turn_view``), through its end-of-turn token. Compared in
    tokens, where ``split_turns`` decides in characters."""
    ids = list(enc["input_ids"])
    for k in trained:
        try:
            view = turn_view(tokenizer, messages, tools, k)
        except Exception:  # noqa: BLE001 - a template that refuses the prefix: split_turns kept it whole for that
            continue
        if view is None:
            continue
        view_ids, offsets = tokenize_text(tokenizer, view.text)
        if offsets is not None:
            n = sum(1 for _, e in offsets if e <= view.turn_end)
        else:  # without offsets, leave out a last token that may merge with what follows the reply
            n = max(0, len(tokenize_text(tokenizer, view.text[:view.turn_end])[0]) - 1)
        if ids[:n] != view_ids[:n]:
            at = next((t for t, (a, b) in enumerate(zip(ids, view_ids[:n])) if a != b), min(len(ids), n))
            return [MaskProblem("history_as_at_inference", f"reply {k} is trained after other tokens than at "
                                f"inference (from token {at}), yet its conversation was kept whole "
                                f"[{template_shape(tokenizer).family}]")]
    return []
