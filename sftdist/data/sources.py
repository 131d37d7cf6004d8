"""Read one source's raw records, from local files and folders (JSONL, JSON, Parquet, CSV, plain text) or
the Hugging Face hub, each tagged with where it came from (file and line or record index)."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from sftdist.config import DataSource
from sftdist.data.demo import cache_root, resolve_builtin
from sftdist.data.messages import DataError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def is_glob(path: str) -> bool:
    """Whether ``path`` is a pattern (``shards/*.jsonl``, ``data/**/*.parquet``) rather than one path."""
    return any(c in path for c in "*?[")


def local_path_exists(path: str) -> bool:
    """The file or folder exists, or the pattern matches a file."""
    return Path(path).exists() or (is_glob(path) and any(Path(p).is_file() for p in glob.iglob(path, recursive=True)))


def source_files(path: str) -> list[Path]:
    """The local files behind ``path``: the file itself, every supported file in a folder, or every file a glob
    matches (``**`` descends), sorted.

    A file that a symlink in the folder points to is read, wherever it lies: someone placed that link there.
    A symlinked sub-folder is not descended into (``rglob`` does not follow them): no loops, and no tree
    that nobody named. Nothing is ever written in or beside data folders (see ``prepare``).

    Raises:
        DataError: for an unsupported extension or a folder without supported files.
    """
    p = Path(path)
    if is_glob(path):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{path}: no files match", "missing_file")
    else:
        files = sorted(f for f in p.rglob("*") if f.suffix in EXTENSIONS) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{path}: folder holds no {'/'.join(EXTENSIONS)} files", "missing_file")
    for f in files:
        if f.suffix not in EXTENSIONS:
            raise DataError(f"{f}: unsupported file type; expected one of {EXTENSIONS}", "missing_file")
    return files


def _first_json_value(f: Path) -> Any:
    """The first record of a ``.json`` file (the first element of its array, of its ``data`` array, or its
    first JSON Lines object), read from the file's start only; ``None`` when there is none or it does not
    parse (the reader then reports the file)."""
    decoder, size = json.JSONDecoder(), 1 << 16
    with f.open(encoding="utf-8") as fh:
        text = fh.read(size)
        while True:
            body = text.lstrip()
            start = body[1:].lstrip() if body[:1] == "[" else body
            try:
                value = decoder.raw_decode(start)[0]
            except json.JSONDecodeError:
                more = fh.read(size)
                if not more:
                    return None
                text, size = text + more, size * 2
                continue
            if body[:1] == "{" and isinstance(value, dict) and isinstance(value.get("data"), list):
                value = value["data"][0] if value["data"] else None
            return value


def shard_columns(f: Path) -> Optional[set[str]]:
    """The columns of one file of a source: the top-level keys of its first record (JSON Lines, JSON), the
    schema's names (Parquet) or the header (CSV); ``None`` for plain text, an empty file or a first record that
    is not an object (the reader reports those).

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "a.jsonl"
        >>> _ = f.write_text('\\n{"messages": [], "id": 1}\\n{"other": 2}\\n')
        >>> sorted(shard_columns(f))
        ['id', 'messages']
    """
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(f).names)
    if f.suffix == ".csv":
        import csv

        with f.open(encoding="utf-8", newline="") as fh:
            return set(next(csv.reader(fh), None) or []) or None
    if f.suffix == ".jsonl":
        row = next((parse_line(line, "") for _, line in _jsonl_lines(f)), None)
    elif f.suffix == ".json":
        row = _first_json_value(f)
    else:
        return None
    return set(row) if isinstance(row, dict) else None


def check_shard_columns(files: list[Path], source_name: str) -> None:
    """Refuse a source whose files (the shards of a folder) disagree on their columns, before anything is
    tokenised: every file's columns (``shard_columns``) must be the first file's.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.jsonl").write_text('{"messages": []}\\n')
        >>> _ = (d / "b.jsonl").write_text('{"conversations": [], "id": 3}\\n')
        >>> check_shard_columns(source_files(str(d)), "chat")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sftdist.data.messages.DataError: data source 'chat': shard .../b.jsonl has columns ['conversations', 'id'], ...

    Raises:
        DataError: ``shard_columns``, naming the shard, the first shard and the differing columns.
    """
    first, first_columns = None, None
    for f in files:
        columns = shard_columns(f)
        if columns is None:
            continue
        if first_columns is None:
            first, first_columns = f, columns
        elif columns != first_columns:
            raise DataError(f"data source {source_name!r}: shard {f} has columns {sorted(columns)}, but the first "
                            f"shard {first} has {sorted(first_columns)}: {sorted(columns - first_columns)} only in "
                            f"{f}, {sorted(first_columns - columns)} only in the first; make every file of the "
                            f"folder the same format (or give each its own source)", "shard_columns")


def is_local(source: DataSource) -> bool:
    """Whether the source is a local path (a path that does not exist but looks like ``org/name`` is a hub id)."""
    path = resolve_builtin(source.path)
    return Path(path).exists() or path.startswith((".", "/", "~")) or Path(path).suffix in EXTENSIONS


def parse_line(line: str, where: str) -> Any:
    """One JSON Lines record, or the ``invalid_json`` ``DataError`` that names its file and line.

    Example:
        >>> parse_line('{"a": 1}\\n', "c.jsonl: line 1")
        {'a': 1}
        >>> print(parse_line('{"a": 1,\\n', "c.jsonl: line 2"))
        c.jsonl: line 2: invalid JSON: Expecting property name enclosed in double quotes at column 1
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return DataError(f"{where}: invalid JSON: {e.msg} at column {e.colno}", "invalid_json")


def _jsonl_lines(f: Path) -> Iterator[tuple[str, str]]:
    """``(where, line)`` of every non-blank line, unparsed and as read (one line in memory at a time)."""
    with f.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                yield f"{f}: line {n}", line


def _read_jsonl(f: Path) -> Iterator[tuple[str, Any]]:
    for where, line in _jsonl_lines(f):
        yield where, parse_line(line, where)


_CHUNK = 1 << 20  # characters read at a time from a JSON array file
_MAX_RECORD = 1 << 26  # a record that does not parse within this many characters is an error, not a long one
_NON_SPACE = re.compile(r"\S")


def read_json_file(f: Path) -> Iterator[tuple[str, Any]]:
    with f.open(encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        yield from _read_json_array(f)
    else:
        yield from _read_json_whole(f)


def _read_json_array(f: Path) -> Iterator[tuple[str, Any]]:
    """The records of a file holding one JSON array, parsed one at a time from a sliding window of the text,
    so that a large file is never held whole. Anything the window cannot parse is handed to the whole-file
    reader, which says what is wrong exactly as it always has (a bad file's error costs its memory)."""
    decoder, done = json.JSONDecoder(), 0
    with f.open(encoding="utf-8") as fh:
        buf, pos = "", 0

        def fill() -> bool:  # read on, dropping what was parsed; False at the end of the file
            nonlocal buf, pos
            more = fh.read(_CHUNK)
            buf, pos = buf[pos:] + more, 0
            return bool(more)

        def next_char() -> str:  # the next non-space character ("" at the end of the file)
            nonlocal pos
            while not (m := _NON_SPACE.search(buf, pos)):
                pos = len(buf)
                if not fill():
                    return ""
            pos = m.start()
            return buf[pos]

        def value() -> tuple[bool, Any]:
            nonlocal pos
            while True:
                try:
                    row, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if len(buf) - pos > _MAX_RECORD or not fill():
                        return False, None
                    continue
                if end < len(buf):
                    pos = end
                    return True, row
                length = end - pos
                if not fill():  # at the end of the file: the value was whole
                    pos = length
                    return True, row
                # else: a number cut by the window's end is not the whole number; parse it again

        next_char()
        pos += 1  # the "["
        sep = "" if next_char() != "]" else "]"
        while not sep:
            ok, row = value()
            if not ok:
                break
            yield f"{f}: record {done}", row
            done += 1
            sep = next_char()
            if sep == ",":
                pos += 1
                sep = "" if next_char() else "end"  # the next value starts at a non-space character
        if sep == "]":
            pos += 1
            if next_char() == "":
                return
            try:  # more after the array: not one JSON document (read whole here only to say where)
                json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{f}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                                "invalid_json") from e
    for n, record in enumerate(_read_json_whole(f)):  # raises the file's error, as it always has
        if n >= done:
            yield record


def _read_json_whole(f: Path) -> Iterator[tuple[str, Any]]:
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
        yield from read_json_file(f)
    elif f.suffix == ".txt":
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    yield f"{f}: line {n}", {"text": line.rstrip("\n")}
    else:
        yield from _read_with_datasets(f.suffix[1:], [str(f)])


def raw_records(source: DataSource, path: Optional[str] = None) -> Iterator[tuple[str, Any]]:
    """``read_records``, except that a JSON Lines file's records come as their lines, unparsed (``str``): the
    data stage stores them as read and parses each once, where it encodes it (``encode.parse_raw``).

    Raises:
        DataError: as ``read_records``.
    """
    path = resolve_builtin(path or source.path)
    if not is_local(DataSource(name=source.name, path=path)) or not local_path_exists(path):
        yield from read_records(source, path)
        return
    for f in source_files(path):
        yield from (_jsonl_lines(f) if f.suffix == ".jsonl" else _read_file(f))


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
    if not local_path_exists(path):
        raise DataError(f"data source {source.name!r}: file not found: {path}", "missing_file")
    for f in source_files(path):
        yield from _read_file(f)


def _read_hub(source: DataSource, path: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        # Never a hub loading script: datasets 3.x runs one only with trust_remote_code=True, 4.x+ not at all.
        # With max_samples, only the first records are wanted: streamed, nothing else is downloaded.
        ds = datasets.load_dataset(path, name=source.config, split=source.split, revision=source.revision,
                                   trust_remote_code=False, streaming=source.max_samples is not None)
    except Exception as e:  # the hub client raises many types; all mean "cannot get this data set"
        raise DataError(f"data source {source.name!r}: cannot load hub dataset {path!r} "
                        f"(config={source.config}, split={source.split}): {e}", "missing_file") from e
    for i, row in enumerate(ds):
        yield f"{path}[{source.split}]: record {i}", row
