"""The data stage's single entry point: every source of the mix, read, validated, tokenised, masked,
cached and audited; then the mixed, optionally packed sample schedule."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sftdist.config import DataConfig, DataSource, SFTConfig
from sftdist.data.audit import audit_entry, check_chat_template, template_warnings
from sftdist.data.collate import collate as collate_rows
from sftdist.data.collate import collate_packed
from sftdist.data.loader import SampleSchedule, mix_counts
from sftdist.data.prepare import no_usable_record, prepare_source
from sftdist.data.sources import check_shard_columns
from sftdist.data.stream_reader import is_streamed_hub, stream_files
from sftdist.data.streaming import audit_stream

# An eval split below either floor measures noise, not the model. Records' mean losses differ by ~0.3-0.5 nats
# on chat data, so the eval loss of n records is uncertain by about that / sqrt(n): ~0.1 nats at 20 records,
# as large as what fine-tuning changes between two evals. 1,000 supervised tokens is the same floor for sets of
# very short replies (identity sets: 20 replies of ~20 tokens say little about how the model answers).
MIN_EVAL_RECORDS = 20
MIN_EVAL_SUPERVISED_TOKENS = 1000


@dataclass
class SourceData:
    """One source after the data stage."""

    name: str
    weight: float
    format: str
    train: Any  # datasets.Dataset: input_ids, labels, num_tokens, num_supervised, where
    eval: Optional[Any]
    stats: dict
    generic: bool = False  # replay data: its eval loss change is the forgetting curve
    stream: Optional[DataSource] = None  # a streaming source's config (``train`` is then None): streaming.py


@dataclass
class TrainData:
    """Every source of the mix, ready to sample from."""

    sources: list[SourceData]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def warnings(self) -> list[str]:
        """The mask audit's warnings, each once however many sources share a template; then one line per
        source whose eval split is too small to mean anything."""
        masks = dict.fromkeys(w for s in self.sources for w in s.stats.get("mask_warnings", []))
        return [*masks, *(s.stats["eval_warning"] for s in self.sources if s.stats.get("eval_warning"))]

    def get(self, source: int, record: int, split: str = "train") -> dict:
        """The example at ``(source, record)``, tagged with its source id."""
        row = getattr(self.sources[source], split)[record]
        return {"input_ids": row["input_ids"], "labels": row["labels"], "source": source}

    def has_eval(self) -> bool:
        return any(s.eval is not None and len(s.eval) for s in self.sources)


def make_batch(data: TrainData, sequences: list[list[tuple[int, int]]], pad_id: int, *, packed: bool,
               split: str = "train") -> dict:
    """Collate sequences of ``(source, record)`` samples: one sample per row, or packed rows."""
    rows = [[data.get(s, i, split) for s, i in seq] for seq in sequences]
    return collate_packed(rows, pad_id) if packed else collate_rows([r[0] for r in rows], pad_id)


def eval_size_warning(source: DataSource, key: str, stats: dict) -> str:
    """A warning when the source's eval split has under ``MIN_EVAL_RECORDS`` records or under
    ``MIN_EVAL_SUPERVISED_TOKENS`` supervised tokens, saying what to do; "" when it is large enough or absent.

    Example:
        >>> src = DataSource(name="identity", path="identity.json", format="alpaca", eval_fraction=0.02)
        >>> stats = {"records": 89, "eval": {"records": 2, "kept": 2, "supervised_tokens": 48}}
        >>> print(eval_size_warning(src, "data.sources.0", stats))
        data source 'identity': its eval split has only 2 records and 48 supervised tokens, too few for its eval loss to mean anything (under 20 records or 1,000 supervised tokens): raise data.sources.0.eval_fraction (0.02 of 91 records; about 0.47 would hold ~42 records and ~1,008 supervised tokens), or set data.sources.0.eval_path to a held-out file

    Args:
        source: The source's config.
        key: Its config path, e.g. ``data.sources.0``.
        stats: Its ``stats.json`` (``records`` of the train split; ``eval``: ``records``, ``kept``,
            ``supervised_tokens``).
    """
    ev = stats.get("eval")
    if ev is None or (ev["kept"] >= MIN_EVAL_RECORDS and ev["supervised_tokens"] >= MIN_EVAL_SUPERVISED_TOKENS):
        return ""
    n = f"{ev['kept']} record{'s' * (ev['kept'] != 1)}"
    what = (f"data source {source.name!r}: its eval split has only {n} and {ev['supervised_tokens']:,} "
            f"supervised tokens, too few for its eval loss to mean anything (under {MIN_EVAL_RECORDS} records or "
            f"{MIN_EVAL_SUPERVISED_TOKENS:,} supervised tokens)")
    if source.eval_path:
        return (f"{what}: add held-out records to {key}.eval_path={source.eval_path}, or hold out a share of the "
                f"training file with {key}.eval_fraction instead")
    total = stats["records"] + ev["records"]
    per_record = ev["supervised_tokens"] / ev["kept"] if ev["kept"] else 0
    need = max(MIN_EVAL_RECORDS, math.ceil(MIN_EVAL_SUPERVISED_TOKENS / per_record) if per_record else 0)
    fraction = math.ceil(100 * need / total) / 100
    if fraction >= 0.5:  # the file is too small to give up that much of it
        return (f"{what}: {source.path} holds only {total} records; set {key}.eval_path to a separate held-out "
                f"file")
    return (f"{what}: raise {key}.eval_fraction ({source.eval_fraction} of {total} records; about {fraction} would "
            f"hold ~{need} records and ~{round(need * per_record):,} supervised tokens), or set {key}.eval_path to a "
            f"held-out file")


def prepare_all(cfg: DataConfig, tokenizer, *, max_length: int, seed: int) -> list[Path]:
    """Build (or find) the cache entry of every source; returns their directories in config order."""
    check_chat_template(cfg, tokenizer)
    return [prepare_stream_eval(s, cfg, tokenizer, max_length=max_length, seed=seed) if s.streaming else
            prepare_source(s, cfg, tokenizer, max_length=max_length, seed=seed) for s in cfg.sources]


def prepare_stream_eval(source: DataSource, cfg: DataConfig, tokenizer, *, max_length: int,
                        seed: int) -> Optional[Path]:
    """A streaming source has no cache entry; its ``eval_path`` gets one (as the train split of a source
    ``<name>.eval``), or None without one. Its shards are checked first (the same columns in each)."""
    if not is_streamed_hub(source):
        check_shard_columns(stream_files(source), source.name)
    if not source.eval_path:
        return None
    held_out = DataSource(name=f"{source.name}.eval", path=source.eval_path, format=source.format,
                          columns=dict(source.columns))
    return prepare_source(held_out, cfg, tokenizer, max_length=max_length, seed=seed)


def streamed_source(source: DataSource, cfg: DataConfig, tokenizer, eval_dir: Optional[Path], *,
                    seed: int) -> SourceData:
    """A streaming source's ``SourceData``: its config, its eval split, and the audit of its first records."""
    import datasets

    stats = {"records": 0, "kept": 0, "tokens": 0, "supervised_tokens": 0, "statuses": {}, "streaming": True,
             "audited": audit_stream(source, tokenizer, train_on=cfg.train_on, samples=cfg.audit_samples,
                                     seed=seed, split_turns=cfg.split_turns),
             "mask_warnings": template_warnings(tokenizer, cfg.split_turns) if source.format != "text" else []}
    evaluation = datasets.load_from_disk(str(eval_dir / "train")) if eval_dir else None
    return SourceData(source.name, source.weight, source.format, None, evaluation, stats,
                      generic=source.is_generic, stream=source)


def build_datasets(cfg: DataConfig, tokenizer, *, max_length: int, seed: int,
                   dirs: Optional[list[Path]] = None) -> TrainData:
    """Load every source from the cache (building it when ``dirs`` is not given), with its mask-audit verdict.

    Raises:
        DataError: naming the source, file and record of a bad record (``data.on_bad_record=error``) or of
            a record whose masks fail the audit.
    """
    import datasets

    dirs = dirs or prepare_all(cfg, tokenizer, max_length=max_length, seed=seed)
    sources = []
    for i, (source, d) in enumerate(zip(cfg.sources, dirs)):
        if source.streaming:
            sources.append(streamed_source(source, cfg, tokenizer, d, seed=seed))
            continue
        stats = json.loads((d / "stats.json").read_text())
        if stats["kept"] == 0:  # a cache entry written before prepare_source refused such a source
            raise no_usable_record(source.name, stats["records"], stats["statuses"])
        stats["eval_warning"] = eval_size_warning(source, f"data.sources.{i}", stats)
        # The verdict kept with the entry by prepare_source (local rank 0 of each node): no rank reads the file.
        stats["audited"] = audit_entry(d, source, tokenizer, train_on=cfg.train_on, samples=cfg.audit_samples,
                                       seed=seed, split_turns=cfg.split_turns)
        stats["mask_warnings"] = template_warnings(tokenizer, cfg.split_turns) if source.format != "text" else []
        train = datasets.load_from_disk(str(d / "train"))
        evaluation = datasets.load_from_disk(str(d / "eval")) if (d / "eval").exists() else None
        sources.append(SourceData(source.name, source.weight, source.format, train, evaluation, stats,
                                  generic=source.is_generic))
    return TrainData(sources)


def column_array(dataset, name: str) -> np.ndarray:
    """One column of a ``datasets.Dataset`` as a numpy array, read in one pass (8 bytes a value, where a list
    of ints takes ~36: a million-sample schedule stays small on every rank).

    ``dataset[name]`` is a lazy column in datasets 5.x: each ``column[i]`` builds a one-column dataset
    (hundreds of microseconds on a memory-mapped cache entry, more the more chunks it has), which made
    packing a million-sample epoch take minutes on every rank. One Arrow copy takes milliseconds.

    Example:
        >>> import datasets
        >>> column_array(datasets.Dataset.from_dict({"num_tokens": [3, 5, 2]}), "num_tokens").tolist()
        [3, 5, 2]
    """
    return dataset.with_format("arrow")[name].to_numpy()


def build_schedule(data: TrainData, cfg: DataConfig, *, seed: int, global_batch_size: int,
                   max_length: int) -> SampleSchedule:
    """The mixed (and, with ``data.packing``, packed) sample order of the whole run."""
    sizes = [len(s.train) for s in data.sources]
    mean_supervised = [s.stats["supervised_tokens"] / max(len(s.train), 1) for s in data.sources]
    counts = mix_counts(sizes, [s.weight for s in data.sources], mix_by=cfg.mix_by, mean_supervised=mean_supervised)
    lengths = [column_array(s.train, "num_tokens") for s in data.sources] if cfg.packing else None
    return SampleSchedule(sizes, counts, seed, global_batch_size, lengths=lengths,
                          max_length=max_length if cfg.packing else None)


def mix_report(data: TrainData, schedule: SampleSchedule) -> list[dict]:
    """Per source: records read and kept, what happened to the others, the conversations ``data.split_turns``
    split and the samples they became, and the realised mix of the first epoch (samples drawn, and shares of
    samples and of supervised tokens)."""
    epoch = schedule.compact(0)
    drawn, tokens, all_tokens = [], [], []
    for s, src in enumerate(data.sources):
        mine = epoch.idx[epoch.src == s]
        drawn.append(len(mine))
        tokens.append(int(column_array(src.train, "num_supervised")[mine].sum()))
        all_tokens.append(int(column_array(src.train, "num_tokens")[mine].sum()))
    return [{"source": src.name, "records": src.stats["records"], "kept": src.stats["kept"],
             "statuses": src.stats["statuses"], "samples_per_epoch": drawn[s],
             "sample_share": drawn[s] / max(sum(drawn), 1), "supervised_token_share": tokens[s] / max(sum(tokens), 1),
             "tokens_per_epoch": all_tokens[s], "supervised_tokens_per_epoch": tokens[s],
             "audited": src.stats.get("audited", 0), "split": split_counts(src.stats)}
            for s, src in enumerate(data.sources)]


def split_counts(stats: dict) -> dict[str, int]:
    """``{"conversations": ..., "samples": ...}``: how many conversations of a source's train split
    ``data.split_turns`` split into one sample per trained turn, and how many samples they became (zeros for
    a cache entry written before the setting existed).

    Example:
        >>> split_counts({"split": {"conversations": 2, "samples": 5}}), split_counts({})
        ({'conversations': 2, 'samples': 5}, {'conversations': 0, 'samples': 0})
    """
    return {"conversations": 0, "samples": 0, **stats.get("split", {})}


def split_note(split: dict[str, int]) -> str:
    """The data report's words for ``split_counts``; "" when nothing was split.

    Example:
        >>> split_note({"conversations": 2, "samples": 5}), split_note({"conversations": 0, "samples": 0})
        ('; 2 conversations split into 5 samples, one per trained turn (data.split_turns)', '')
    """
    if not split["conversations"]:
        return ""
    return (f"; {split['conversations']} conversation{'s' * (split['conversations'] != 1)} split into "
            f"{split['samples']} samples, one per trained turn (data.split_turns)")


def build_for_run(cfg: SFTConfig, tokenizer) -> tuple[TrainData, SampleSchedule, list[Path]]:
    """The data, schedule and cache directories exactly as a training run with ``cfg`` builds them (the
    commands that use the data stage without training: ``sftdist data ...``, ``sftdist plan``)."""
    t = cfg.train
    dirs = prepare_all(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed)
    data = build_datasets(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed, dirs=dirs)
    schedule = build_schedule(data, cfg.data, seed=t.seed, global_batch_size=t.global_batch_size,
                              max_length=t.max_length)
    return data, schedule, dirs

