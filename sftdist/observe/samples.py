"""Sample generations during training (``logging.samples``): a few fixed prompts answered greedily at step 0
and at every eval, written to ``<run>/samples.jsonl`` (one line per prompt and eval) and to a W&B table, so
a user sees the answers change as training goes.

The prompts are ``logging.sample_prompts`` (user messages, rendered with the chat template and its
generation prompt), else the first ``logging.samples`` records of each eval split: a conversation up to its
last trained reply (the reply is kept as the reference), or the first half of a text document (at most 64
tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sftdist.config import LoggingConfig
from sftdist.data.build import TrainData
from sftdist.data.tokenize import IGNORE_INDEX

TEXT_PROMPT_TOKENS = 64


@dataclass
class SamplePrompt:
    source: str  # the eval split it came from, or "prompt" for logging.sample_prompts
    input_ids: list[int]
    reference: Optional[list[int]] = None  # what the data says comes next (the trained reply), if known


def split_at_last_reply(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """``(prompt, reply)``: the tokens before the last supervised run, and that run.

    A text document is supervised throughout; its prompt is its first half, at most ``TEXT_PROMPT_TOKENS``.

    Example:
        >>> split_at_last_reply([1, 2, 3, 4, 5, 6, 7], [-100, -100, 3, -100, -100, 6, 7])
        ([1, 2, 3, 4, 5], [6, 7])
        >>> split_at_last_reply([1, 2, 3, 4], [1, 2, 3, 4])
        ([1, 2], [3, 4])
    """
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not supervised:
        return list(input_ids), []
    start = supervised[-1]
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    if start == 0:  # supervised from the first token: plain text
        start = min(max(len(input_ids) // 2, 1), TEXT_PROMPT_TOKENS)
    end = supervised[-1] + 1
    return list(input_ids[:start]), list(input_ids[start:end])


def sample_prompts(data: TrainData, tokenizer, cfg: LoggingConfig) -> list[SamplePrompt]:
    """The prompts of ``logging.sample_prompts``, else ``logging.samples`` records per eval split."""
    if cfg.sample_prompts:
        out = []
        for text in cfg.sample_prompts:
            if tokenizer.chat_template:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = tokenizer(text)["input_ids"]
            out.append(SamplePrompt("prompt", list(ids)))
        return out
    return eval_split_prompts(data, cfg.samples)


def eval_split_prompts(data: TrainData, n: int) -> list[SamplePrompt]:
    """The first ``n`` records of every eval split as prompts: each up to its last trained reply, which is
    kept as the reference."""
    out = []
    for source in data.sources:
        for i in range(min(n, len(source.eval) if source.eval is not None else 0)):
            row = source.eval[i]
            prompt, reply = split_at_last_reply(row["input_ids"], row["labels"])
            out.append(SamplePrompt(source.name, prompt, reply or None))
    return out


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the chat template's end-of-turn tokens: where a generated reply ends."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        from sftdist.data.template_shape import template_shape

        ids += [tokenizer.convert_tokens_to_ids(t) for t in template_shape(tokenizer).end_tokens]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate_samples(engine, tokenizer, prompts: list[SamplePrompt], *, step: int, max_new_tokens: int,
                     synced: bool) -> list[dict]:
    """Greedy completions of every prompt, as ``samples.jsonl`` rows.

    Every rank must call this with the same prompts. ``synced`` (ZeRO-3 on several ranks) keeps the ranks
    stepping together until all are done, since each forward gathers parameters collectively.
    """
    from transformers import GenerationConfig

    model = getattr(engine, "module", engine)  # a DeepSpeed engine, or a bare/PEFT model (sftdist-baseline)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_token_ids(tokenizer),
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)  # training turned the cache off
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # generation must not move the training RNG
        for p in prompts:
            ids = torch.tensor([p.input_ids], device=dev)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 synced_gpus=synced)
            rows.append({"step": step, "source": p.source, "prompt": tokenizer.decode(p.input_ids),
                         "completion": tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False),
                         "reference": tokenizer.decode(p.reference) if p.reference else None})
    model.train(was_training)
    return rows
