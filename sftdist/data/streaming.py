"""The data of a run with a streaming source (``streaming: true``): records read, tokenised, mixed and packed
on the fly, in bounded memory, by each data-parallel rank from its own share of every source, with a state
that a checkpoint keeps so that a resumed run gets exactly the batches the uninterrupted one would have.

A rank's pipeline, per step::

    feeds (one per source)   streaming: RecordReader -> encode_record (masks as in the cached path)
                             cached:    this rank's share of the Arrow cache, in a shuffled order per pass
          |  mixer: the next record comes from the source furthest behind its weight's share (samples or
          v         supervised tokens, data.mix_by), so the shares hold exactly at every point of the stream
    buffer (data.stream_buffer samples)
          |  each row: one sample drawn at random, then (data.packing) best fit: the longest buffered
          v  samples that still fit train.max_length
    rows -> collate -> micro-batches

The buffer shuffles and packs; it also delays samples, so over any window of W samples a source's share is
within ``stream_buffer / W`` of its target. Nothing here touches torch.distributed: ranks differ only in
``part``.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any, Optional

import numpy
import torch

from sftdist.config import ConfigError, DataConfig, DataSource
from sftdist.data.audit import audit_pool_size, audit_source
from sftdist.data.collate import collate, collate_packed
from sftdist.data.encode import encode_record
from sftdist.data.messages import DataError
from sftdist.data.prepare import FILTER_STATUSES, LENGTH_STATUSES, OK_STATUSES, bad_record_error
from sftdist.data.stream_reader import RecordReader


class StreamFeed:
    """Samples of one streaming source: its records (this rank's share) encoded one at a time."""

    def __init__(self, index: int, source: DataSource, reader: RecordReader, encode: dict, on_bad_record: str):
        self.index, self.source, self.reader, self.encode = index, source, reader, encode
        self.on_bad_record = on_bad_record
        self.statuses: Counter = Counter()
        self._records = None

    def next_samples(self) -> list[dict]:
        """The samples of this rank's next usable record (one, or one per trained turn when split).

        Raises:
            DataError: at a bad record under ``data.on_bad_record=error``, naming its file and line.
        """
        if self._records is None:
            self._records = iter(self.reader)
        while True:
            where, row = next(self._records)
            samples = encode_record(row, where, **self.encode)  # (a row that is a DataError: one bad sample)
            ok = [s for s in samples if s["status"] in OK_STATUSES]
            for s in samples:
                self.statuses[s["status"]] += 1
                if s["status"] not in OK_STATUSES + LENGTH_STATUSES + FILTER_STATUSES and \
                        self.on_bad_record == "error":
                    raise bad_record_error(s["error"], self.source.name, s["status"])
            if ok:
                return [{"input_ids": s["input_ids"], "labels": s["labels"], "source": self.index,
                         "num_supervised": s["num_supervised"]} for s in ok]

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "statuses": dict(self.statuses)}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.statuses = Counter(state["statuses"])
        self._records = None  # read again from the restored position


class CachedFeed:
    """Samples of a prepared (cached) source in a run that streams another: this rank's share of a
    permutation of its samples, a new permutation each pass."""

    def __init__(self, index: int, dataset, *, seed: int, part: int, parts: int, name: str):
        self.index, self.dataset, self.seed, self.part, self.parts, self.name = index, dataset, seed, part, parts, name
        self.epoch, self.pos, self._order = 0, 0, None
        if len(dataset) < parts:
            raise DataError(f"data source {name!r}: {len(dataset)} samples, fewer than the {parts} data-parallel "
                            f"ranks that share it", "empty_source")

    def _pass(self) -> list[int]:
        if self._order is None:  # (numpy: 8 bytes per sample, where a list of ints takes ~36)
            key = random.Random(f"cached-feed:{self.seed}:{self.name}:{self.epoch}").getrandbits(64)
            self._order = numpy.random.default_rng(key).permutation(len(self.dataset))[self.part::self.parts]
        return self._order

    def next_samples(self) -> list[dict]:
        order = self._pass()
        if self.pos >= len(order):
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
            order = self._pass()
        row = self.dataset[int(order[self.pos])]
        self.pos += 1
        return [{"input_ids": row["input_ids"], "labels": row["labels"], "source": self.index,
                 "num_supervised": row["num_supervised"]}]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None


class StreamMix:
    """Rows of samples from weighted feeds, through a shuffling (and packing) buffer; see the module docstring.

    Example (weights 1:1 by samples, buffer 2, no packing; feed 0 gives a0 a1 ..., feed 1 b0 b1 ...)::

        mixer order: a0 b0 a1 b1 a2 ...   (the source furthest behind its share goes next; ties: lower index)
        buffer [a0 b0] -> a row takes one at random, say b0; the buffer refills with a1 -> [a0 a1] ...
    """

    def __init__(self, feeds: list, weights: list[float], *, mix_by: str, packing: bool, max_length: int,
                 buffer_size: int, seed: int, part: int):
        self.feeds, self.weights, self.mix_by = feeds, weights, mix_by
        self.packing, self.max_length, self.buffer_size = packing, max_length, buffer_size
        self.rng = random.Random(f"stream-mix:{seed}:{part}")
        self.delivered = [0.0] * len(feeds)  # samples, or supervised tokens (data.mix_by), each source gave
        self.buffer: list[dict] = []

    def _next_source(self) -> int:
        active = [i for i, w in enumerate(self.weights) if w > 0]
        return min(active, key=lambda i: (self.delivered[i] / self.weights[i], i))

    def _fill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            src = self._next_source()
            samples = self.feeds[src].next_samples()
            self.delivered[src] += len(samples) if self.mix_by == "samples" else sum(
                s["num_supervised"] for s in samples)
            self.buffer += samples

    def _take(self, i: int) -> dict:
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def next_row(self) -> list[dict]:
        """One row: a random buffered sample, then (packing) the longest buffered samples that still fit."""
        self._fill()
        row = [self._take(self.rng.randrange(len(self.buffer)))]
        room = self.max_length - len(row[0]["input_ids"])
        while self.packing and room > 0:
            best, best_len = -1, 0
            for i, s in enumerate(self.buffer):
                n = len(s["input_ids"])
                if best_len < n <= room:
                    best, best_len = i, n
            if best < 0:
                break
            row.append(self._take(best))
            room -= best_len
        return row

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "delivered": list(self.delivered), "buffer": pack_samples(self.buffer),
                "feeds": [f.state_dict() for f in self.feeds]}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.delivered = list(state["delivered"])
        self.buffer = unpack_samples(state["buffer"])
        for feed, s in zip(self.feeds, state["feeds"]):
            feed.load_state_dict(s)


def pack_samples(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Buffered samples as four flat tensors (what a checkpoint's weights-only loader accepts).

    Example:
        >>> s = pack_samples([{"input_ids": [5, 6], "labels": [-100, 6], "source": 1, "num_supervised": 1}])
        >>> unpack_samples(s)
        [{'input_ids': [5, 6], 'labels': [-100, 6], 'source': 1, 'num_supervised': 1}]
    """
    def flat(key: str) -> torch.Tensor:
        return torch.tensor([t for s in samples for t in s[key]], dtype=torch.long)

    return {"input_ids": flat("input_ids"), "labels": flat("labels"),
            "meta": torch.tensor([[len(s["input_ids"]), s["source"], s["num_supervised"]] for s in samples],
                                 dtype=torch.long).view(-1, 3)}


def unpack_samples(packed: dict[str, torch.Tensor]) -> list[dict]:
    """The samples ``pack_samples`` flattened."""
    ids, labels, out, at = packed["input_ids"].tolist(), packed["labels"].tolist(), [], 0
    for n, source, supervised in packed["meta"].tolist():
        out.append({"input_ids": ids[at:at + n], "labels": labels[at:at + n], "source": source,
                    "num_supervised": supervised})
        at += n
    return out


class StreamedBatches:
    """This rank's collated micro-batches, step after step, from a ``StreamMix``.

    Steps come in order; asking again for the step just produced returns the same batches (start-up peeks
    at the first one). ``state_dict()`` after step ``s`` resumes at step ``s + 1``.
    """

    def __init__(self, mix: StreamMix, *, rows_per_rank: int, micro_batch_size: int, pad_id: int, packed: bool):
        self.mix, self.rows, self.micro, self.pad_id, self.packed = mix, rows_per_rank, micro_batch_size, pad_id, packed
        self.next_step = 0
        self._last: Optional[tuple[int, list]] = None
        self.epoch_len: Optional[int] = None  # a stream's length is not known ahead (build_batches: its preview's)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        if self._last and self._last[0] == step:
            return self._last[1]
        if step != self.next_step:
            raise RuntimeError(f"streamed batches come in order: step {step} asked, {self.next_step} next")
        rows = [self.mix.next_row() for _ in range(self.rows)]
        batches = [collate_packed(rows[i:i + self.micro], self.pad_id) if self.packed else
                   collate([r[0] for r in rows[i:i + self.micro]], self.pad_id) for i in range(0, self.rows, self.micro)]
        self.next_step, self._last = step + 1, (step, batches)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.next_step, "mix": self.mix.state_dict()}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if state is None:
            raise ConfigError("this checkpoint holds no stream positions: a run that did not stream wrote it; "
                              "resume it with the same data config, or start a new run")
        self.next_step, self._last = state["step"], None
        self.mix.load_state_dict(state["mix"])

    def statuses(self) -> dict[str, dict[str, int]]:
        """Per streaming source, this rank's records by status so far."""
        return {f.source.name: dict(f.statuses) for f in self.mix.feeds if isinstance(f, StreamFeed)}


def build_stream(data, cfg: DataConfig, tokenizer, *, seed: int, max_length: int, part: int, parts: int) -> StreamMix:
    """The ``StreamMix`` of rank ``part`` of ``parts`` over every source of ``data`` (a ``TrainData`` whose
    streaming sources carry their config in ``stream``)."""
    feeds: list = []
    for i, (src, source) in enumerate(zip(data.sources, cfg.sources)):
        if source.streaming:
            encode = dict(fmt=source.format, columns=dict(source.columns), train_on=cfg.train_on,
                          max_length=max_length, truncation=cfg.truncation, tokenizer=tokenizer,
                          min_reply_tokens=cfg.min_reply_tokens, drop_cut_replies=cfg.drop_cut_replies,
                          source_key=f"data.sources.{i}", split_turns=cfg.split_turns)
            feeds.append(StreamFeed(i, source, RecordReader(source, seed=seed, part=part, parts=parts), encode,
                                    cfg.on_bad_record))
        else:
            feeds.append(CachedFeed(i, src.train, seed=seed, part=part, parts=parts, name=source.name))
    return StreamMix(feeds, [s.weight for s in cfg.sources], mix_by=cfg.mix_by, packing=cfg.packing,
                     max_length=max_length, buffer_size=cfg.stream_buffer, seed=seed, part=part)


def preview_report(mix: StreamMix, names: list[str], *, samples: int = 1000) -> list[dict]:
    """``build.mix_report``'s rows for a streamed mix, from the first ``samples`` samples (or 256 rows) that a
    fresh ``mix`` gives: the realised shares the run will see, without reading the whole stream. Consumes
    ``mix``: pass a second one built like the run's."""
    drawn, tokens, supervised, rows = [0] * len(names), [0] * len(names), [0] * len(names), 0
    while sum(drawn) < samples and rows < 256:
        for s in mix.next_row():
            drawn[s["source"]] += 1
            tokens[s["source"]] += len(s["input_ids"])
            supervised[s["source"]] += s["num_supervised"]
        rows += 1
    report = []
    for i, name in enumerate(names):
        feed = mix.feeds[i]
        statuses = dict(feed.statuses) if isinstance(feed, StreamFeed) else {"ok": drawn[i]}
        report.append({"source": name, "records": sum(statuses.values()),
                       "kept": sum(v for k, v in statuses.items() if k in OK_STATUSES), "statuses": statuses,
                       "samples_per_epoch": drawn[i], "sample_share": drawn[i] / max(sum(drawn), 1),
                       "supervised_token_share": supervised[i] / max(sum(supervised), 1),
                       "tokens_per_epoch": tokens[i], "supervised_tokens_per_epoch": supervised[i],
                       "audited": 0, "split": {"conversations": 0, "samples": 0}, "streaming": True,
                       "preview_rows": rows})
    return report


def audit_stream(source: DataSource, tokenizer, *, train_on: str, samples: int, seed: int, split_turns: str) -> int:
    """``audit.audit_source`` for a streaming source: the same draw, from the first ``samples * 20`` records of
    the stream (every rank's share), read once; the whole stream is never read ahead.

    Raises:
        DataError: naming the source, record and tokenizer of the first record whose masks are wrong.
    """
    if not (size := audit_pool_size(source, samples)):
        return 0
    pool, reader = [], RecordReader(source, seed=seed, part=0, parts=1)
    for where, row in reader:
        if not isinstance(row, DataError):
            pool.append((where, row))
        if len(pool) >= size or reader.position["epoch"] > 0:
            break
    return audit_source(source, tokenizer, train_on=train_on, samples=samples, seed=seed, split_turns=split_turns,
                        pool=pool)


STREAM_SAMPLE_RECORDS = 1000  # what the data tools read of a streaming source


def bounded_streams(cfg: DataConfig, records: int = STREAM_SAMPLE_RECORDS) -> list[str]:
    """For the data tools (``sftdist data prepare|inspect|quality``, ``sftdist plan``): each streaming source
    of ``cfg`` becomes its first ``records`` records, read and cached like any source (a stream is never read
    whole ahead). Returns one note per source changed.

    Example:
        >>> cfg = DataConfig(sources=[DataSource(name="web", path="shards/*.jsonl", streaming=True)])
        >>> bounded_streams(cfg, 500), cfg.sources[0].streaming, cfg.sources[0].max_samples
        (["data source 'web' streams: read as its first 500 records"], False, 500)
    """
    notes = []
    for i, s in enumerate(cfg.sources):
        if s.streaming:
            cfg.sources[i] = dataclasses.replace(s, streaming=False, max_samples=min(s.max_samples or records, records))
            notes.append(f"data source {s.name!r} streams: read as its first {cfg.sources[i].max_samples} records")
    return notes
