"""What a chat template puts around an assistant reply: the generation prompt before it and the end-of-turn
token after it, learned once per template by rendering a fixed probe conversation.

The encoder needs both facts for every template, including ones it has never seen, so they are measured
rather than looked up: the generation prompt is what ``add_generation_prompt=True`` adds to a render, and
the end-of-turn token is the first special token a finished assistant turn is followed by, unless it is
the next turn's opener (part of the generation prompt, or a bare ``<|user|>`` header in a template with
no end-of-turn token); the final reply may end with another one (gpt-oss's ``<|return|>``). StarCoder2's
``###`` is plain text, never an end-of-turn token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

# Plain words, so that no template strips, escapes or branches on them.
PROBE = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another one."}, {"role": "assistant", "content": "Green."}]
PROBE_SYSTEM = {"role": "system", "content": "Answer in one word."}

# Distinctive strings -> family name, for error messages only (the encoder never branches on them).
FAMILIES = (
    ("<|start_header_id|>", "Llama-3"), ("<start_of_turn>", "Gemma"), ("<|START_OF_TURN_TOKEN|>", "Command-R"),
    ("<|start_of_role|>", "Granite"), ("<｜Assistant｜>", "DeepSeek-R1"), ("GPT4 Correct", "OpenChat"),
    ("[INST]", "Llama-2/Mistral"), ("<|im_start|>", "ChatML/Qwen"), ("<|assistant|>", "Phi-3/Zephyr/Tulu"),
    ("### Response", "Alpaca/StarCoder2-style"), ("ASSISTANT:", "Vicuna"), ("Falcon:", "Falcon"),
    ("Assistant:", "plain-text User/Assistant"),
)


@dataclass(frozen=True)
class TemplateShape:
    """The scaffolding a template renders around every assistant reply.

    Attributes:
        family: A human name for the template (e.g. ``ChatML/Qwen``), plus a short hash of its text.
        generation_prompt: The text ``add_generation_prompt=True`` appends (``""`` when the template
            ignores the flag).
        end_tokens: The special tokens that close an assistant turn: the one after a reply that more turns
            follow, and the one after the final reply when it differs (gpt-oss ends earlier turns with
            ``<|end|>`` and the last with ``<|return|>``). Empty when the template has none (then the
            model cannot learn to stop; the audit warns).
        eos: The tokenizer's EOS token. A template that appends it right after an end-of-turn token (Phi-3
            ends a finished conversation ``<|end|>\\n<|endoftext|>``) has it trained too, as TRL's training
            templates do.
        probe_error: Why the probe conversation could not be rendered, if it could not.
    """

    family: str
    generation_prompt: str
    end_tokens: tuple[str, ...]
    eos: Optional[str] = None
    probe_error: str = ""

    @property
    def end_of_turn(self) -> Optional[str]:
        """The end-of-turn token between turns (``None`` when the template has none)."""
        return self.end_tokens[0] if self.end_tokens else None

    def header_candidates(self, special: tuple[str, ...]) -> list[str]:
        """The generation prompt, then ever shorter prefixes of it cut after a line break or a special token.

        A finished turn may render less than the generation prompt: DeepSeek-R1 adds ``<think>\\n`` to the
        prompt but not to a finished turn, so ``<｜Assistant｜>`` is what a finished turn starts with.

        Example:
            >>> TemplateShape("x", "<A><think>\\n", ("<e>",)).header_candidates(("<A>", "<think>"))
            ['<A><think>\\n', '<A><think>', '<A>']
        """
        h = self.generation_prompt
        cuts = {len(h), len(h.rstrip())}
        cuts |= {i + 1 for i, ch in enumerate(h) if ch == "\n"}
        for s in special:
            start = h.find(s)
            while start >= 0:
                cuts.add(start + len(s))
                start = h.find(s, start + 1)
        return [h[:c] for c in sorted(cuts, reverse=True) if h[:c].strip()]


_SPECIAL: dict[tuple, tuple[str, ...]] = {}


def special_strings(tokenizer) -> tuple[str, ...]:
    """Every special token's text, longest first (so that a search finds ``<|im_end|>`` before ``<|im``)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    key = (id(tokenizer), len(decoder), tuple(tokenizer.all_special_tokens))
    if key not in _SPECIAL:
        found = set(tokenizer.all_special_tokens) | {t.content for t in decoder.values() if t.special}
        _SPECIAL[key] = tuple(sorted((s for s in found if s), key=lambda s: (-len(s), s)))
    return _SPECIAL[key]


def snap_to_token(text: str, pos: int, special: tuple[str, ...]) -> int:
    """``pos``, moved back to the start of a special token it would cut in two.

    Character-level common prefixes stop inside tokens that share a first character: ``<|end|>`` and
    ``<|assistant|>`` share ``<|``.

    Example:
        >>> snap_to_token("hi<|assistant|>", 4, ("<|assistant|>",))
        2
    """
    for s in special:
        hit = text.find(s, max(0, pos - len(s) + 1), pos + len(s) - 1)
        if 0 <= hit < pos:
            return hit
    return pos


def first_special(text: str, special: tuple[str, ...], start: int = 0) -> Optional[tuple[int, str]]:
    """The earliest special token in ``text[start:]`` as ``(position, token)``, or ``None``.

    Example:
        >>> first_special("ab</s><s>c", ("</s>", "<s>"))
        (2, '</s>')
    """
    best = None
    for s in special:
        pos = text.find(s, start)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def template_family(template: str) -> str:
    """A readable name for a chat template, for messages.

    Example:
        >>> template_family("{{ '<|im_start|>' + m['role'] }}").startswith("ChatML/Qwen")
        True
    """
    digest = hashlib.sha1(template.encode()).hexdigest()[:8]
    name = next((fam for marker, fam in FAMILIES if marker in template), "custom")
    return f"{name} template {digest}"


def render(tokenizer, messages, tools=None, add_generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template renders it (text, not tokens)."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings.

    Example:
        >>> common_prefix("<A>hi<e>", "<A>hi<A>")
        6
    """
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _end_tokens(between: str, after_last: str, header: str, eos: Optional[str],
                special: tuple[str, ...]) -> tuple[str, ...]:
    """The end-of-turn tokens, from what follows a reply that more turns follow and the final reply.

    After a mid-conversation reply, the first special token ends the turn unless it opens the next one: a
    token of the generation prompt, or (in a template with no end-of-turn token) the next user header,
    which neither closes the final reply, nor is the EOS, nor is followed by another special token.

    Example:
        >>> sp = ("<|im_start|>", "<|im_end|>", "<|user|>")
        >>> _end_tokens("<|im_end|>\\n<|im_start|>user\\n", "<|im_end|>\\n", "<|im_start|>assistant\\n", None, sp)
        ('<|im_end|>',)
        >>> _end_tokens("<|user|>\\n", "", "<|assistant|>\\n", None, sp)
        ()
    """
    ends = []
    mid = first_special(between, special)
    if mid is not None and mid[1] not in header and (
            mid[1] in after_last or mid[1] == eos or first_special(between, special, mid[0] + len(mid[1]))):
        ends.append(mid[1])
    last = first_special(after_last, special)
    if last is not None and last[1] not in header and last[1] not in ends:
        ends.append(last[1])
    return tuple(ends)


def _measure(tokenizer, probe: list[dict], tools, family: str, special: tuple[str, ...]) -> TemplateShape:
    text = render(tokenizer, probe, tools, False)
    first_user = next(i for i, m in enumerate(probe) if m["role"] == "user")
    with_prompt = render(tokenizer, probe[: first_user + 1], tools, True)
    without = render(tokenizer, probe[: first_user + 1], tools, False)
    header = with_prompt[snap_to_token(with_prompt, common_prefix(with_prompt, without), special):]
    reply_1 = text.index("Blue.") + len("Blue.")
    next_user = text.index("Another one.", reply_1)
    reply_2 = text.index("Green.", next_user) + len("Green.")
    ends = _end_tokens(text[reply_1:next_user], text[reply_2:], header, tokenizer.eos_token, special)
    return TemplateShape(family, header, ends, tokenizer.eos_token or None)


_SHAPES: dict[str, TemplateShape] = {}
_SHAPE_KEYS: dict[tuple, str] = {}


def template_shape(tokenizer) -> TemplateShape:
    """Measure (once per template and special-token set) what surrounds an assistant reply.

    Returns:
        The shape; when the template cannot render the probe (with or without a system message, with
        ``tools`` unset or empty) the shape has ``probe_error`` set, no generation prompt and no
        end-of-turn token.
    """
    template = tokenizer.chat_template or ""
    special = special_strings(tokenizer)
    fast_key = (id(tokenizer), template, special, tokenizer.eos_token, tokenizer.bos_token)
    if fast_key not in _SHAPE_KEYS:
        _SHAPE_KEYS[fast_key] = hashlib.sha256(json.dumps(
            [template, special, tokenizer.special_tokens_map], sort_keys=True, default=str).encode()).hexdigest()
    key = _SHAPE_KEYS[fast_key]
    if key not in _SHAPES:
        family, error = template_family(template), ""
        # Some templates test ``tools is defined`` and then loop over it, so None crashes them (Phi-4-mini).
        for probe, tools in ((PROBE, None), (PROBE, []), ([PROBE_SYSTEM, *PROBE], None), ([PROBE_SYSTEM, *PROBE], [])):
            try:
                _SHAPES[key] = _measure(tokenizer, probe, tools, family, special)
                break
            except Exception as e:  # noqa: BLE001 - any template error means: try the next probe
                error = f"{type(e).__name__}: {e}"
        else:
            _SHAPES[key] = TemplateShape(family, "", (), probe_error=error)
    return _SHAPES[key]
