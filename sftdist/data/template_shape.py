"""What a chat template puts around an assistant reply: the generation prompt before it and the end-of-turn
token after it, learned once per template by rendering a fixed probe conversation.

The encoder needs both facts for every template, including ones it has never seen, so they are measured
rather than looked up: the generation prompt is what ``add_generation_prompt=True`` adds to a render, and
the end-of-turn token is the first special token a finished assistant turn is followed by, provided it
also closes the final turn (or is the EOS token) and is not part of the generation prompt itself (which
would make it the next turn's opener, e.g. StarCoder2's ``###`` or a bare ``<|user|>``).
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
        end_of_turn: The special token that closes an assistant turn, or ``None`` when the template has
            none (then the model cannot learn to stop; the audit warns).
        eos: The tokenizer's EOS token. A template that appends it right after an end-of-turn token (Phi-3
            ends a finished conversation ``<|end|>\\n<|endoftext|>``) has it trained too, as TRL's training
            templates do.
        probe_error: Why the probe conversation could not be rendered, if it could not.
    """

    family: str
    generation_prompt: str
    end_of_turn: Optional[str]
    eos: Optional[str] = None
    probe_error: str = ""

    def header_candidates(self, special: tuple[str, ...]) -> list[str]:
        """The generation prompt, then ever shorter prefixes of it cut after a line break or a special token.

        A finished turn may render less than the generation prompt: DeepSeek-R1 adds ``<think>\\n`` to the
        prompt but not to a finished turn, so ``<｜Assistant｜>`` is what a finished turn starts with.

        Example:
            >>> TemplateShape("x", "<A><think>\\n", "<e>").header_candidates(("<A>", "<think>"))
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


def special_strings(tokenizer) -> tuple[str, ...]:
    """Every special token's text, longest first (so that a search finds ``<|im_end|>`` before ``<|im``)."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return tuple(sorted((s for s in found if s), key=lambda s: (-len(s), s)))


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


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


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


def _measure(tokenizer, probe: list[dict], family: str, special: tuple[str, ...]) -> TemplateShape:
    text = _render(tokenizer, probe, False)
    first_user = next(i for i, m in enumerate(probe) if m["role"] == "user")
    with_prompt = _render(tokenizer, probe[: first_user + 1], True)
    without = _render(tokenizer, probe[: first_user + 1], False)
    header = with_prompt[common_prefix(with_prompt, without):]
    reply_1 = text.index("Blue.") + len("Blue.")
    next_user = text.index("Another one.", reply_1)
    reply_2 = text.index("Green.", next_user) + len("Green.")
    between, after_last = text[reply_1:next_user], text[reply_2:]
    hit = first_special(between, special)
    eot = None
    if hit is not None and hit[1] not in header and (hit[1] in after_last or hit[1] == tokenizer.eos_token):
        eot = hit[1]
    return TemplateShape(family, header, eot, tokenizer.eos_token or None)


_SHAPES: dict[str, TemplateShape] = {}


def template_shape(tokenizer) -> TemplateShape:
    """Measure (once per template and special-token set) what surrounds an assistant reply.

    Returns:
        The shape; when the template cannot render the probe (with or without a system message) the
        shape has ``probe_error`` set, no generation prompt and no end-of-turn token.
    """
    template = tokenizer.chat_template or ""
    special = special_strings(tokenizer)
    key = hashlib.sha256(json.dumps([template, special, tokenizer.special_tokens_map], sort_keys=True,
                                    default=str).encode()).hexdigest()
    if key not in _SHAPES:
        family, error = template_family(template), ""
        for probe in (PROBE, [PROBE_SYSTEM, *PROBE]):
            try:
                _SHAPES[key] = _measure(tokenizer, probe, family, special)
                break
            except Exception as e:  # noqa: BLE001 - any template error means: try the next probe
                error = f"{type(e).__name__}: {e}"
        else:
            _SHAPES[key] = TemplateShape(family, "", None, probe_error=error)
    return _SHAPES[key]
