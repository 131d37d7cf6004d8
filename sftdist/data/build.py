"""The data stage's single entry point: every source of the mix, read, validated, tokenised, masked,
cached and audited; then the mixed, optionally packed sample schedule."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sftdist.config import DataConfig, SFTConfig
from sftdist.data.audit import audit_source, check_chat_template, template_warnings
from sftdist.data.collate import collate as collate_rows
from sftdist.data.collate import collate_packed
from sftdist.data.loader import SampleSchedule, mix_counts
from sftdist.data.messages import DataError
from sftdist.data.prepare import prepare_source


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


@dataclass
class TrainData:
    """Every source of the mix, ready to sample from."""

    sources: list[SourceData]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def warnings(self) -> list[str]:
        """The mask audit's warnings, each once however many sources share a template."""
        return list(dict.fromkeys(w for s in self.sources for w in s.stats.get("mask_warnings", [])))

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


def prepare_all(cfg: DataConfig, tokenizer, *, max_length: int, seed: int) -> list[Path]:
    """Build (or find) the cache entry of every source; returns their directories in config order."""
    check_chat_template(cfg, tokenizer)
    return [prepare_source(s, cfg, tokenizer, max_length=max_length, seed=seed) for s in cfg.sources]


def build_datasets(cfg: DataConfig, tokenizer, *, max_length: int, seed: int,
                   dirs: Optional[list[Path]] = None) -> TrainData:
    """Load every source from the cache (building it when ``dirs`` is not given) and audit the masks.

    Raises:
        DataError: naming the source, file and record of a bad record (``data.on_bad_record=error``) or of
            a record whose masks fail the audit.
    """
    import datasets

    dirs = dirs or prepare_all(cfg, tokenizer, max_length=max_length, seed=seed)
    sources = []
    for source, d in zip(cfg.sources, dirs):
        stats = json.loads((d / "stats.json").read_text())
        if stats["kept"] == 0:
            raise DataError(f"data source {source.name!r}: no usable record out of {stats['records']} "
                            f"({stats['statuses']})", "empty_source")
        stats["audited"] = audit_source(source, tokenizer, train_on=cfg.train_on, samples=cfg.audit_samples, seed=seed)
        stats["mask_warnings"] = template_warnings(tokenizer) if source.format != "text" else []
        train = datasets.load_from_disk(str(d / "train"))
        evaluation = datasets.load_from_disk(str(d / "eval")) if (d / "eval").exists() else None
        sources.append(SourceData(source.name, source.weight, source.format, train, evaluation, stats,
                                  generic=source.is_generic))
    return TrainData(sources)


def column_values(dataset, name: str) -> list:
    """One column of a ``datasets.Dataset`` as a plain list, read in one pass.

    ``dataset[name]`` is a lazy column in datasets 5.x: each ``column[i]`` builds a one-column dataset
    (hundreds of microseconds on a memory-mapped cache entry, more the more chunks it has), which made
    packing a million-sample epoch take minutes on every rank. One Arrow copy takes milliseconds, and
    ``tolist`` gives Python ints, which the packer's arithmetic wants.

    Example:
        >>> import datasets
        >>> column_values(datasets.Dataset.from_dict({"num_tokens": [3, 5, 2]}), "num_tokens")
        [3, 5, 2]
    """
    return dataset.with_format("arrow")[name].to_numpy().tolist()


def build_schedule(data: TrainData, cfg: DataConfig, *, seed: int, global_batch_size: int,
                   max_length: int) -> SampleSchedule:
    """The mixed (and, with ``data.packing``, packed) sample order of the whole run."""
    sizes = [len(s.train) for s in data.sources]
    mean_supervised = [s.stats["supervised_tokens"] / max(len(s.train), 1) for s in data.sources]
    counts = mix_counts(sizes, [s.weight for s in data.sources], mix_by=cfg.mix_by, mean_supervised=mean_supervised)
    lengths = [column_values(s.train, "num_tokens") for s in data.sources] if cfg.packing else None
    return SampleSchedule(sizes, counts, seed, global_batch_size, lengths=lengths,
                          max_length=max_length if cfg.packing else None)


def mix_report(data: TrainData, schedule: SampleSchedule) -> list[dict]:
    """Per source: records read and kept, what happened to the others, and the realised mix of the first
    epoch (samples drawn, and shares of samples and of supervised tokens)."""
    supervised = [column_values(s.train, "num_supervised") for s in data.sources]
    lengths = [column_values(s.train, "num_tokens") for s in data.sources]
    drawn, tokens, all_tokens = [0] * len(data.sources), [0] * len(data.sources), [0] * len(data.sources)
    for seq in schedule.epoch(0):
        for src, i in seq:
            drawn[src] += 1
            tokens[src] += supervised[src][i]
            all_tokens[src] += lengths[src][i]
    return [{"source": src.name, "records": src.stats["records"], "kept": src.stats["kept"],
             "statuses": src.stats["statuses"], "samples_per_epoch": drawn[s],
             "sample_share": drawn[s] / max(sum(drawn), 1), "supervised_token_share": tokens[s] / max(sum(tokens), 1),
             "tokens_per_epoch": all_tokens[s], "supervised_tokens_per_epoch": tokens[s],
             "audited": src.stats.get("audited", 0)} for s, src in enumerate(data.sources)]


def build_for_run(cfg: SFTConfig, tokenizer) -> tuple[TrainData, SampleSchedule, list[Path]]:
    """The data, schedule and cache directories exactly as a training run with ``cfg`` builds them (the
    commands that use the data stage without training: ``sftdist data ...``, ``sftdist plan``)."""
    t = cfg.train
    dirs = prepare_all(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed)
    data = build_datasets(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed, dirs=dirs)
    schedule = build_schedule(data, cfg.data, seed=t.seed, global_batch_size=t.global_batch_size,
                              max_length=t.max_length)
    return data, schedule, dirs

