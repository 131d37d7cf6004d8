"""The data stage's single entry point: load every source of the mix, validate, tokenize and mask it.

Public names: ``build_datasets`` (config -> tokenized examples) and the pure functions it is made of,
``encode_conversation`` and ``encode_text``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sftdist.config import DataConfig, DataSource
from sftdist.data.demo import resolve_builtin
from sftdist.data.messages import DataError, to_messages, to_text
from sftdist.data.tokenize import IGNORE_INDEX, MaskError, encode_conversation, encode_text

__all__ = ["DataError", "MaskError", "TrainData", "build_datasets", "encode_conversation", "encode_text",
           "load_records"]


@dataclass
class TrainData:
    """Tokenized examples per source, plus what was done to them."""

    names: list[str]
    weights: list[float]
    examples: list[list[dict]]  # examples[source][record] = {"input_ids", "labels"}
    stats: list[dict] = field(default_factory=list)  # per source: records, truncated, dropped, tokens

    def get(self, source: int, record: int) -> dict:
        """The example at ``(source, record)``, tagged with its source id."""
        return {**self.examples[source][record], "source": source}


def load_records(source: DataSource) -> list[dict]:
    """Read one source's records with ``datasets``.

    Raises:
        DataError: naming the source and file when it is missing or unreadable.
    """
    path = resolve_builtin(source.path)
    if not Path(path).exists():
        raise DataError(f"data source {source.name!r}: file not found: {path}")
    if not path.endswith((".jsonl", ".json")):
        raise DataError(f"data source {source.name!r}: {path}: expected a .jsonl or .json file")
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:  # datasets wraps JSON errors in several exception types
        raise DataError(f"data source {source.name!r}: cannot read {path}: {e}") from e
    rows = ds.to_list()
    return rows[: source.max_samples] if source.max_samples is not None else rows


def _encode(source: DataSource, row: dict, where: str, tokenizer, train_on: str) -> dict:
    if source.format == "text":
        return encode_text(tokenizer, to_text(row, where))
    try:
        return encode_conversation(tokenizer, to_messages(row, where), tools=row.get("tools"), train_on=train_on)
    except MaskError as e:
        raise DataError(f"{where}: {e} (tokenizer {tokenizer.name_or_path!r})") from e


def build_datasets(cfg: DataConfig, tokenizer, *, max_length: int) -> TrainData:
    """Load, validate, tokenize and mask every source of the mix.

    Samples longer than ``max_length`` are truncated; those left with no trained token are dropped. Both
    are counted in ``stats``.

    Raises:
        DataError: naming the source, file and record of the first bad record.
    """
    names, weights, examples, stats = [], [], [], []
    for source in cfg.sources:
        path = resolve_builtin(source.path)
        encoded, truncated, dropped, tokens, supervised = [], 0, 0, 0, 0
        for i, row in enumerate(load_records(source)):
            ex = _encode(source, row, f"{path}: record {i}", tokenizer, cfg.train_on)
            if len(ex["input_ids"]) > max_length:
                truncated += 1
                ex = {k: v[:max_length] for k, v in ex.items()}
            if all(t == IGNORE_INDEX for t in ex["labels"][1:]):
                dropped += 1  # truncation cut away every trained token; counted and reported, not trained
                continue
            tokens += len(ex["input_ids"])
            supervised += sum(t != IGNORE_INDEX for t in ex["labels"][1:])
            encoded.append(ex)
        if not encoded:
            raise DataError(f"data source {source.name!r}: {path} has no records")
        names.append(source.name)
        weights.append(source.weight)
        examples.append(encoded)
        stats.append({"source": source.name, "records": len(encoded), "truncated": truncated,
                      "dropped_no_target": dropped, "tokens": tokens, "supervised_tokens": supervised})
    return TrainData(names, weights, examples, stats)
