"""Render conversations with the tokenizer's own chat template and label exactly the trained tokens.

Masks come from token spans, never from string prefixes: for assistant turn ``i`` the prompt is the render
of ``messages[:i]`` with the generation prompt, and the turn ends where the render of ``messages[:i+1]``
ends, minus trailing whitespace that the template puts after its end-of-turn token. Both renders must be
token-prefixes of the full conversation; a template for which that fails raises instead of mis-masking.
The one tolerated exception is a template that rewrites history (e.g. drops the ``<think>`` block of
earlier turns): an earlier turn whose text changes once later turns follow is left unsupervised, and the
final turn, rendered exactly as at inference, is trained.
"""

from __future__ import annotations

from typing import Any, Optional

IGNORE_INDEX = -100


class MaskError(ValueError):
    """The chat template renders a conversation inconsistently, so no exact mask exists."""


def _render_text(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


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
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    default = set(assistant if train_on != "last" else assistant[-1:])
    for i, m in enumerate(messages):
        if m.get("train") and m["role"] != "assistant":
            raise MaskError(f"message {i} ({m['role']}) sets train/loss_weight=1; only assistant turns can be trained")
    return [i for i in assistant if _wants_training(messages[i], i in default)]


def _wants_training(message: dict[str, Any], default: bool) -> bool:
    return default if message.get("train") is None else bool(message["train"])


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
    full_text = _render_text(tokenizer, messages, tools, add_generation_prompt=False)
    full = _tokens(tokenizer, full_text)
    if train_on == "all":
        labels = list(full)
    else:
        labels = [IGNORE_INDEX] * len(full)
        turns = trained_turns(messages, train_on)
        for i in turns:
            prompt = _tokens(tokenizer, _render_text(tokenizer, messages[:i], tools, add_generation_prompt=True))
            upto_text = _render_text(tokenizer, messages[: i + 1], tools, add_generation_prompt=False)
            upto = _tokens(tokenizer, upto_text)
            end = _turn_end(tokenizer, upto, len(prompt))
            if upto[: len(prompt)] != prompt:
                raise MaskError(f"the generation prompt before assistant turn {i} is not a token prefix of the "
                                f"rendered turn")
            if full[:end] != upto[:end]:
                if i != turns[-1] and not full_text.startswith(upto_text.rstrip()):
                    # The template rewrites history (e.g. drops earlier <think> blocks): this turn is
                    # rendered differently once later turns follow, so it cannot be supervised in place.
                    continue
                raise MaskError(f"rendering up to assistant turn {i} is not a token prefix of the whole "
                                f"conversation (tokens merge across the turn boundary)")
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
