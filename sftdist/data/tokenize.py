"""Render conversations with the tokenizer's own chat template and label exactly the trained tokens.

Masks come from token spans, never from string prefixes: for assistant turn ``i`` the prompt is the render
of ``messages[:i]`` with the generation prompt, and the turn ends where the render of ``messages[:i+1]``
ends, minus trailing whitespace that the template puts after its end-of-turn token. Both renders must be
token-prefixes of the full conversation; a template for which that fails raises instead of mis-masking.
"""

from __future__ import annotations

from typing import Any, Optional

IGNORE_INDEX = -100


class MaskError(ValueError):
    """The chat template renders a conversation inconsistently, so no exact mask exists."""


def _render(tokenizer, messages, tools, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    # apply_chat_template(tokenize=True) tokenizes the rendered text without adding special tokens; so do we.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _turn_end(tokenizer, ids: list[int], start: int) -> int:
    """Index after the last trained token of a turn: drop trailing plain whitespace after end-of-turn."""
    special = set(tokenizer.all_special_ids)
    end = len(ids)
    while end > start and ids[end - 1] not in special and not tokenizer.decode(ids[end - 1:end]).strip():
        end -= 1
    return end


def encode_conversation(tokenizer, messages: list[dict[str, Any]], *, tools: Optional[list] = None,
                        train_on: str = "assistant", max_length: Optional[int] = None) -> dict[str, list[int]]:
    """Tokenize a conversation with its chat template and mask everything but the trained replies.

    Each trained assistant turn is supervised on its content plus the end-of-turn tokens the template
    emits right after it, so the model learns to stop. Role headers, the generation prompt and all
    system/user/tool text get ``-100``.

    Example (ChatML, one token per piece for readability; ``<e>`` = ``<|im_end|>``)::

        messages  = [user "Hi", assistant "Yo"]
        input_ids = [<s> user \\n Hi <e> \\n <s> assistant \\n Yo <e> \\n]
        labels    = [-100 ...................................  Yo <e> -100]

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: ``[{"role", "content"}, ...]`` with at least one assistant turn.
        tools: Tool schemas passed to the template.
        train_on: ``assistant`` (every assistant turn), ``last`` (final assistant turn) or ``all``.
        max_length: Truncate both lists to this many tokens.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length, ``-100`` where not supervised.

    Raises:
        MaskError: if the template's renders of a conversation prefix are not token prefixes of the
            whole conversation.
    """
    full = _render(tokenizer, messages, tools, add_generation_prompt=False)
    if train_on == "all":
        labels = list(full)
    else:
        labels = [IGNORE_INDEX] * len(full)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i in turns if train_on == "assistant" else turns[-1:]:
            prompt = _render(tokenizer, messages[:i], tools, add_generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1], tools, add_generation_prompt=False)
            end = _turn_end(tokenizer, upto, len(prompt))
            if upto[: len(prompt)] != prompt or full[:end] != upto[:end]:
                raise MaskError(f"chat template is not prefix-stable at assistant turn {i}: rendering the "
                                f"conversation up to that turn does not give a token prefix of the whole")
            labels[len(prompt):end] = full[len(prompt):end]
    if max_length is not None:
        full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "labels": labels}


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
