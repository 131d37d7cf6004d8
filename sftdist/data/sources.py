"""Read one source's raw records, from local files and folders (JSONL, JSON, Parquet, CSV, plain text) or
the Hugging Face hub, each tagged with where it came from (file and line or record index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

from sftdist.config import DataSource
from sftdist.data.demo import cache_root, resolve_builtin
from sftdist.data.messages import DataError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def source_files(path: str) -> list[Path]:
    """The local files behind ``path``: the file itself, or every supported file in a folder (sorted).

    A file that a symlink in the folder points to is read, wherever it lies: someone placed that link there.
    A symlinked sub-folder is not descended into (``rglob`` does not follow them): no loops, and no tree
    that nobody named. Nothing is ever written in or beside data folders (see ``prepare``).

    Raises:
        DataError: for an unsupported extension or a folder without supported files.
    """
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.suffix in EXTENSIONS) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{path}: folder holds no {'/'.join(EXTENSIONS)} files", "missing_file")
    for f in files:
        if f.suffix not in EXTENSIONS:
            raise DataError(f"{f}: unsupported file type; expected one of {EXTENSIONS}", "missing_file")
    return files


def is_local(source: DataSource) -> bool:
    """Whether the source is a local path (a path that does not exist but looks like ``org/name`` is a hub id)."""
    path = resolve_builtin(source.path)
    return Path(path).exists() or path.startswith((".", "/", "~")) or Path(path).suffix in EXTENSIONS


def _read_jsonl(f: Path) -> Iterator[tuple[str, Any]]:
    with f.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{f}: line {n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}", "invalid_json")


def _read_json(f: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json name
            yield from _read_jsonl(f)
            return
        raise DataError(f"{f}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", "invalid_json") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{f}: expected a JSON array of records (or JSON Lines)", "invalid_json")
    for i, row in enumerate(data):
        yield f"{f}: record {i}", row


def _read_with_datasets(builder: str, files: list[str], **kwargs) -> Iterator[tuple[str, Any]]:
    import datasets

    # Streamed: rows come straight from the user's file. Otherwise datasets writes an Arrow copy of the whole
    # file into its own cache (~/.cache/huggingface/datasets, often a small home quota) that nothing cleans
    # up; the lock files it still takes go under sftdist's cache, not there.
    ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True,
                               cache_dir=str(cache_root() / "hf-datasets"), **kwargs)
    for i, row in enumerate(ds):
        yield f"{files[0] if len(files) == 1 else files}: record {i}", row


def _read_file(f: Path) -> Iterator[tuple[str, Any]]:
    if f.suffix == ".jsonl":
        yield from _read_jsonl(f)
    elif f.suffix == ".json":
        yield from _read_json(f)
    elif f.suffix == ".txt":
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    yield f"{f}: line {n}", {"text": line.rstrip("\n")}
    else:
        yield from _read_with_datasets(f.suffix[1:], [str(f)])


def read_records(source: DataSource, path: Optional[str] = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every record of a source, in file order.

    ``row`` is a dict, or a ``DataError`` for a line that is not valid JSON (so that
    ``data.on_bad_record=skip`` can count it and go on). ``where`` names the file and line or record.

    Args:
        source: The source config.
        path: Read this path instead of ``source.path`` (used for ``eval_path``).

    Raises:
        DataError: when the file or dataset is missing or unreadable as a whole.
    """
    path = resolve_builtin(path or source.path)
    if not is_local(DataSource(name=source.name, path=path)):
        yield from _read_hub(source, path)
        return
    if not Path(path).exists():
        raise DataError(f"data source {source.name!r}: file not found: {path}", "missing_file")
    for f in source_files(path):
        yield from _read_file(f)


def _read_hub(source: DataSource, path: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        # Never a hub loading script: datasets 3.x runs one only with trust_remote_code=True, 4.x+ not at all.
        ds = datasets.load_dataset(path, name=source.config, split=source.split, revision=source.revision,
                                   trust_remote_code=False)
    except Exception as e:  # the hub client raises many types; all mean "cannot get this data set"
        raise DataError(f"data source {source.name!r}: cannot load hub dataset {path!r} "
                        f"(config={source.config}, split={source.split}): {e}", "missing_file") from e
    for i, row in enumerate(ds):
        yield f"{path}[{source.split}]: record {i}", row
