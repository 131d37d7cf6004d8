"""This rank's collated micro-batches of each optimizer step, from the precomputed sample schedule; the same
interface as ``streaming.StreamedBatches``, so the loop does not care which one it has."""

from __future__ import annotations

from typing import Optional

import torch

from sftdist.config import DataConfig
from sftdist.data.build import TrainData, build_schedule, make_batch, mix_report
from sftdist.data.loader import SampleSchedule
from sftdist.data.streaming import StreamedBatches, build_stream, preview_report


class ScheduledBatches:
    """``micro_batches(step)``: rank ``dp_rank``'s micro-batches of ``step``, addressed by step (any order),
    since the schedule is a pure function of it; nothing to checkpoint."""

    def __init__(self, data: TrainData, schedule: SampleSchedule, *, dp_rank: int, dp_world: int,
                 micro_batch_size: int, pad_id: int, packed: bool):
        self.data, self.schedule, self.dp_rank, self.dp_world = data, schedule, dp_rank, dp_world
        self.micro, self.pad_id, self.packed = micro_batch_size, pad_id, packed

    @property
    def epoch_len(self) -> int:
        """Sequences (rows) in the first epoch."""
        return self.schedule.epoch_len

    def steps_for_epochs(self, epochs: float) -> int:
        return self.schedule.steps_for_epochs(epochs)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        return [make_batch(self.data, mb, self.pad_id, packed=self.packed)
                for mb in self.schedule.micro_batches(step, self.dp_rank, self.dp_world, self.micro)]

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass


def build_batches(data: TrainData, cfg: DataConfig, tokenizer, *, seed: int, global_batch_size: int,
                  max_length: int, micro_batch_size: int, dp_rank: int, dp_world: int,
                  preview: bool = True) -> tuple[object, list[dict]]:
    """This rank's batches for the run, and the mix report that the start-up logs: from the sample schedule,
    or, when a source streams, from this rank's ``StreamMix``; the report then comes from a preview of rank
    0's stream, which costs its first ~1,000 samples' tokenisation (``preview=False``: no report)."""
    pad_id = tokenizer.pad_token_id
    if not any(s.streaming for s in cfg.sources):
        schedule = build_schedule(data, cfg, seed=seed, global_batch_size=global_batch_size, max_length=max_length)
        return ScheduledBatches(data, schedule, dp_rank=dp_rank, dp_world=dp_world, micro_batch_size=micro_batch_size,
                                pad_id=pad_id, packed=cfg.packing), mix_report(data, schedule)
    stream = dict(seed=seed, max_length=max_length, parts=dp_world)
    report = preview_report(build_stream(data, cfg, tokenizer, part=0, **stream), data.names) if preview else []
    for row, src in zip(report, data.sources):
        row["audited"] = src.stats.get("audited", 0)
    batches = StreamedBatches(build_stream(data, cfg, tokenizer, part=dp_rank, **stream),
                              rows_per_rank=global_batch_size // dp_world, micro_batch_size=micro_batch_size,
                              pad_id=pad_id, packed=cfg.packing)
    batches.epoch_len = report[0]["preview_rows"] if report else None  # (the report's tokens are per these rows)
    return batches, report
