"""``sftdist-baseline``: what prompting alone gives on the eval split, and, after a run, what fine-tuning bought.

For every source with an eval split it measures the token loss on the eval replies (the same supervised
tokens, batches and loss head as the training loop's eval):

- **zero-shot**: the base model on the cached eval rows, exactly the training loop's step-0 ``eval_loss``;
- **k-shot**: the same eval conversations with ``k`` training conversations prepended as earlier turns
  (their replies not scored), drawn once per source by ``train.seed``;
- **fine-tuned** (``--run RUN_DIR``): the run's ``final/`` model (full weights, or the LoRA adapter on the
  base), on the zero-shot rows: the run's last ``eval_loss``.

and greedy answers to the first eval prompts of each source from each model, beside the reference reply.
It runs in one process with the whole model on one device (the GPU when there is one).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from sftdist.config import ConfigError, SFTConfig, load_run_config
from sftdist.data.build import SourceData, TrainData, make_batch
from sftdist.data.messages import DataError, to_conversation
from sftdist.data.prepare import OK_STATUSES, dedup_statuses, encode_record, raw_splits
from sftdist.data.split_turns import encode_samples, split_views, turn_messages
from sftdist.data.tokenize import encode_conversation
from sftdist.engine import attention

SHOT_CANDIDATES = 256  # training records tried per source when drawing shots


def _no_tick(n: int) -> None:
    """A progress callback that counts nothing."""


def few_shot_conversation(shots: list[list[dict]], messages: list[dict]) -> list[dict]:
    """``messages`` with the shot conversations as earlier turns: after its leading system messages, before
    its first other turn. The shots' replies get ``train: False``, so only ``messages``' replies are scored;
    the shots' own system messages are left out.

    Example:
        >>> shot = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1"},
        ...         {"role": "assistant", "content": "2"}]
        >>> msgs = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "2+2"},
        ...         {"role": "assistant", "content": "4"}]
        >>> [(m["role"], m["content"], m.get("train")) for m in few_shot_conversation([shot], msgs)]
        ... # doctest: +NORMALIZE_WHITESPACE
        [('system', 'Be brief', None), ('user', '1+1', None), ('assistant', '2', False), ('user', '2+2', None),
         ('assistant', '4', None)]
    """
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    prefix = []
    for shot in shots:
        turns = [m for m in shot if m["role"] != "system"]
        while turns and turns[-1]["role"] != "assistant":  # a shot ends with its answer
            turns.pop()
        prefix += [{**m, "train": False} if m["role"] == "assistant" else dict(m) for m in turns]
    return [*messages[:head], *prefix, *messages[head:]]


def merged_tools(*tool_lists: Optional[list]) -> Optional[list]:
    """The tool schemas of the shots and the eval record, each once (a shot may call a tool the record
    does not have).

    Example:
        >>> merged_tools([{"name": "a"}], None, [{"name": "a"}, {"name": "b"}])
        [{'name': 'a'}, {'name': 'b'}]
        >>> merged_tools(None, None) is None
        True
    """
    seen = {}
    for tools in tool_lists:
        for t in tools or []:
            seen.setdefault(json.dumps(t, sort_keys=True, default=str), t)
    return list(seen.values()) or None


def _encode_kwargs(cfg: SFTConfig, source, tokenizer) -> dict:
    d = cfg.data
    return dict(fmt=source.format, columns=dict(source.columns), train_on=d.train_on, max_length=cfg.train.max_length,
                truncation=d.truncation, tokenizer=tokenizer, min_reply_tokens=d.min_reply_tokens,
                drop_cut_replies=d.drop_cut_replies, split_turns=d.split_turns)


def kept_records(table: dict[str, list], source, cfg: SFTConfig, tokenizer) -> list[dict]:
    """The samples of a raw split that the data stage keeps, in its order, each with its ``messages``,
    ``tools`` and zero-shot encoding (``input_ids``, ``num_tokens``): the same filters, dedup, statuses and
    ``data.split_turns`` as ``prepare._encode_table``, so the i-th entry is the i-th row of the cached split.
    The sample of one reply of a split conversation has the conversation up to that reply as its messages,
    with only that reply trained."""
    pre = dedup_statuses(table, source.format, dict(source.columns), cfg.data.dedup, cfg.data.near_dup_threshold)
    kw = _encode_kwargs(cfg, source, tokenizer)
    out = []
    for raw, where, error, status in zip(table["raw"], table["where"], table["read_error"], pre):
        if error or status:
            continue
        samples = encode_record(raw, where, **kw)
        if not any(enc["status"] in OK_STATUSES for enc in samples):
            continue
        messages, tools = to_conversation(json.loads(raw), source.format, where, dict(source.columns))
        views = split_views(tokenizer, messages, tools, train_on=cfg.data.train_on, split_turns=cfg.data.split_turns)
        for view, enc in zip(views or [None], samples):
            if enc["status"] in OK_STATUSES:
                out.append({"where": enc["where"], "tools": tools, "input_ids": enc["input_ids"],
                            "messages": messages if view is None else turn_messages(messages, view.turn),
                            "num_tokens": enc["num_tokens"]})
    return out


def draw_shots(table: dict[str, list], source, cfg: SFTConfig, tokenizer, k: int) -> list[dict]:
    """``k`` training records for the prompt, the same for every eval record of the source.

    Records are tried in an order drawn from ``train.seed`` (at most ``SHOT_CANDIDATES``); those the data
    stage would keep and no longer than ``max_length / (k + 1)`` tokens are taken first, so that the shots
    leave room for the eval conversation, then the shortest of the others.
    """
    order = list(range(len(table["raw"])))
    random.Random(f"shots:{cfg.train.seed}:{source.name}").shuffle(order)
    sub = {key: [col[i] for i in order[:SHOT_CANDIDATES]] for key, col in table.items()}
    candidates = kept_records(sub, source, cfg, tokenizer)
    budget = cfg.train.max_length // (k + 1)
    short = [c for c in candidates if c["num_tokens"] <= budget]
    rest = sorted((c for c in candidates if c["num_tokens"] > budget), key=lambda c: c["num_tokens"])
    return (short + rest)[:k]


def few_shot_row(record: dict, shots: list[dict], cfg: SFTConfig, tokenizer) -> tuple[Optional[dict], int]:
    """The eval record encoded after as many of the shots as fit in ``train.max_length`` (dropping the
    first ones), and how many that is; ``(None, 0)`` when not even one fits."""
    for used in range(len(shots), 0, -1):
        kept = shots[len(shots) - used:]
        messages = few_shot_conversation([s["messages"] for s in kept], record["messages"])
        tools = merged_tools(*(s["tools"] for s in kept), record["tools"])
        try:
            # A record's sample of one reply (data.split_turns) stays one sample, rendered as at inference.
            samples = encode_samples(tokenizer, messages, tools, train_on=cfg.data.train_on,
                                     split_turns=cfg.data.split_turns)
            enc = (samples[0][1] if len(samples) == 1 else
                   encode_conversation(tokenizer, messages, tools=tools, train_on=cfg.data.train_on))
        except Exception:  # noqa: BLE001 - a template refusing the longer conversation: try fewer shots
            continue
        if len(enc["input_ids"]) <= cfg.train.max_length:
            return enc, used
    return None, 0


def few_shot_source(src: SourceData, source, cfg: SFTConfig, tokenizer, k: int,
                    tick: Callable[[int], None] = _no_tick) -> tuple[list[dict], list[int]]:
    """The eval split of one conversational source as k-shot rows, and the shots each row got; ``tick(1)``
    after each row.

    A record that no shot fits beside keeps its zero-shot row (0 shots).

    Raises:
        DataError: when the re-encoded eval records do not match the cached split (the cache is stale).
    """
    train_table, eval_table = raw_splits(source, cfg.train.seed)
    records = kept_records(eval_table, source, cfg, tokenizer)
    cached = [src.eval[i]["input_ids"] for i in range(len(src.eval))]
    if [r["input_ids"] for r in records] != cached:
        raise DataError(f"data source {source.name!r}: its eval records no longer encode as the data cache holds "
                        f"them (changed files?); rerun `sftdist-prepare` with the same overrides", "stale_cache")
    shots = draw_shots(train_table, source, cfg, tokenizer, k)
    rows, used = [], []
    for i, record in enumerate(records):
        enc, n = few_shot_row(record, shots, cfg, tokenizer)
        rows.append(enc or {"input_ids": src.eval[i]["input_ids"], "labels": src.eval[i]["labels"]})
        used.append(n)
        tick(1)
    return rows, used


def shot_sources(data: TrainData, cfg: SFTConfig, k: int) -> list[str]:
    """The sources that get k-shot rows: those with an eval split that hold conversations (a text document
    takes no shots). None with ``k=0``, or with ``data.train_on=all``: every token of a row is scored, the
    shots' too."""
    if k <= 0 or cfg.data.train_on == "all":
        return []
    return [s.name for s in data.sources if s.eval is not None and s.format != "text"]


def few_shot_data(data: TrainData, cfg: SFTConfig, tokenizer, k: int,
                  tick: Callable[[int], None] = _no_tick) -> tuple[TrainData, dict[str, list[int]]]:
    """``data`` with the eval split of every ``shot_sources`` source replaced by its k-shot rows (the others
    keep theirs), and the shots per row of each of them (``tick(1)`` after each row)."""
    names = shot_sources(data, cfg, k)
    if not names:
        return data, {}
    sources, used = [], {}
    for src, source in zip(data.sources, cfg.data.sources):
        rows = src.eval
        if src.name in names:
            rows, used[src.name] = few_shot_source(src, source, cfg, tokenizer, k, tick)
        sources.append(SourceData(src.name, src.weight, src.format, src.train, rows, src.stats, src.generic))
    return TrainData(sources), used


def run_config(run_dir: Path) -> SFTConfig:
    """The typed config a finished run trained with, from its ``config.yaml``.

    Raises:
        ConfigError: when ``run_dir`` is no run directory or has no ``final/`` model yet.
    """
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: no config.yaml there: not an sftdist run directory")
    if not (run_dir / "final").is_dir():
        raise ConfigError(f"--run {run_dir}: no final/ model yet (the run has not finished: the training command "
                          f"resumes it)")
    return load_run_config(run_dir)


def base_model(cfg: SFTConfig, tokenizer, precision: str):
    """The model as training starts from it: loaded, or built from ``model.from_config`` with ``train.seed``
    (the same initial weights as the run's)."""
    from sftdist.engine.distributed import device
    from sftdist.engine.model import build_model

    model = build_model(cfg.model, tokenizer, precision=precision, seed=cfg.train.seed, activation_checkpointing=False,
                        quantize_4bit=cfg.peft.method == "qlora")
    attention.use_for(model, cfg.model.attn_implementation, cfg.train.max_length)  # as train.build_engine does
    return model.to(device()) if cfg.peft.method != "qlora" else model


def finetuned_model(cfg: SFTConfig, run_dir: Path, tokenizer, precision: str, base: Any):
    """The run's ``final/``: its LoRA adapter put on ``base`` (which it then changes), or its full weights."""
    from transformers import AutoModelForCausalLM

    from sftdist.engine.distributed import device
    from sftdist.engine.model import DTYPES

    final = run_dir / "final"
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, str(final))
        return tuned if cfg.peft.method == "qlora" else tuned.to(device())  # 4-bit weights stay where they load
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=DTYPES[precision],
                                                 attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    return attention.use_for(model, cfg.model.attn_implementation, cfg.train.max_length).to(device())


def eval_batches(data: TrainData, micro_batch_size: int):
    """``data`` cut into one micro-batch of the eval pass each: the same records, in the same batches, as
    ``evaluate`` forms over the whole of it on one process (the eval splits are lists of those rows).

    Yields:
        ``(part, records)``: the micro-batch as a ``TrainData`` and how many eval records it holds.
    """
    samples = [(s, i) for s, src in enumerate(data.sources) if src.eval is not None
               for i in range(len(src.eval))]
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        rows: dict[int, list] = {s: [] for s in range(len(data.sources))}
        for s, i in chunk:
            rows[s].append(data.sources[s].eval[i])
        yield TrainData([dataclasses.replace(src, eval=None if src.eval is None else rows[s])
                         for s, src in enumerate(data.sources)]), len(chunk)


def eval_losses(model, data: TrainData, cfg: SFTConfig, tokenizer,
                tick: Callable[[int], None] = _no_tick) -> dict[str, float]:
    """``eval_loss``, ``eval_loss/<source>`` and ``eval_supervised_tokens/<source>`` of ``model``, computed as
    the training loop's eval pass is (its loss head checked on the first eval record, as
    ``startup.choose_head`` checks the first batch). It runs one micro-batch at a time, ``tick(records)``
    after each, and sums the token-weighted losses as ``evaluate`` does."""
    from sftdist.lifecycle.startup import head_for_batch
    from sftdist.observe.evaluation import evaluate, per_source_metrics

    first = next((s, 0) for s, src in enumerate(data.sources) if src.eval is not None and len(src.eval))
    head = head_for_batch(model, make_batch(data, [[first]], tokenizer.pad_token_id, packed=False, split="eval"),
                          mode=cfg.train.lm_head, chunk_tokens=cfg.train.loss_chunk_tokens)
    names, num = data.names, len(data.sources)
    sums = [0.0] * (2 * num)  # per source: the summed token losses, then the supervised token counts
    for part, records in eval_batches(data, cfg.train.micro_batch_size):
        out = evaluate(model, part, micro_batch_size=cfg.train.micro_batch_size,
                       pad_id=tokenizer.pad_token_id, head=head)
        for i, name in enumerate(names):
            count = out[f"eval_supervised_tokens/{name}"]
            sums[i] += (out[f"eval_loss/{name}"] or 0.0) * count
            sums[num + i] += count
        tick(records)
    return {"eval_loss": sum(sums[:num]) / max(sum(sums[num:]), 1),
            **per_source_metrics("eval_loss", names, sums)}
