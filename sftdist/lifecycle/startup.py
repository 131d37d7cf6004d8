"""What a run checks and reports before its first step: that a checkpoint belongs to this run, which LM
head fits the model, the data report and the summary a user reads before walking away."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional

import torch

from sftdist.config import ConfigError
from sftdist.data.build import TrainData, split_note
from sftdist.data.messages import DataError
from sftdist.engine import attention, sequence_parallel
from sftdist.engine.distributed import all_gather_text, all_reduce_sum, device, log, world_size
from sftdist.engine.forward import LossHead, check_supervised_head
from sftdist.engine.memory_plan import hf_config
from sftdist.lifecycle.checkpoint import saved_state
from sftdist.lifecycle.resume_check import check_unchanged
from sftdist.observe.progress import start_summary


def check_same_run(checkpoint: Path, now: dict, *, allow: bool) -> None:
    """Stop (ConfigError) if the checkpoint was written by a run whose steps saw other samples than ``now``'s
    settings give; with ``allow``, log each difference and go on."""
    saved = saved_state(checkpoint).get("run")
    if saved is None:
        log(f"warning: {checkpoint} records no run settings (an older sftdist wrote it): resuming unchecked")
        return
    for change in check_unchanged(saved, now, checkpoint=str(checkpoint), allow=allow):
        log(f"warning: resuming despite a change (train.resume_allow_changes=true): {change}")


# ZeRO stages whose checkpoints load into each other: DeepSpeed's optimizer state is stage-specific, except
# that stages 1 and 2 write the same partitioned format.
SAME_CHECKPOINT_FORMAT = ({0}, {1, 2}, {3})


def check_zero_stage(checkpoint: Path, zero_stage: int, sequence_parallel_size: int = 1) -> None:
    """Stop (ConfigError), before any work, when the checkpoint was written under a ZeRO stage whose format
    ``zero_stage`` cannot load (DeepSpeed's loader fails with a bare assertion, after the model is built), or
    under another ``parallelism.sequence_parallel_size``: DeepSpeed writes the model states of each
    sequence-parallel rank as a model-parallel shard, which only the same layout loads.

    Example:
        >>> import json, tempfile
        >>> ckpt = Path(tempfile.mkdtemp())
        >>> _ = (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "zero_stage": 2}))
        >>> check_zero_stage(ckpt, 1)
        >>> check_zero_stage(ckpt, 3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sftdist.config.checks.ConfigError: parallelism.zero_stage: 2 -> 3: ...
    """
    state = saved_state(checkpoint)
    saved_sp = state.get("sequence_parallel_size", 1)
    if saved_sp != sequence_parallel_size or (saved_sp > 1 and state.get("world_size") != world_size()):
        raise ConfigError(
            f"parallelism.sequence_parallel_size: {saved_sp} -> {sequence_parallel_size}: {checkpoint} was "
            f"written with sequence_parallel_size={saved_sp} on {state.get('world_size')} process(es); a "
            f"sequence-parallel checkpoint resumes only with the same size on as many processes (resume with "
            f"parallelism.sequence_parallel_size={saved_sp} on {state.get('world_size')}, or start a new run "
            f"from its final/ weights)")
    saved = state.get("zero_stage")
    if saved is None or any({saved, zero_stage} <= same for same in SAME_CHECKPOINT_FORMAT):
        return
    raise ConfigError(f"parallelism.zero_stage: {saved} -> {zero_stage}: {checkpoint} was written under ZeRO-"
                      f"{saved}, whose checkpoint another stage cannot load; resume with "
                      f"parallelism.zero_stage={saved} (stages 1 and 2 load each other's), or start a new run")


def check_resume_layout(checkpoint: Optional[Path], cfg) -> None:
    """``check_zero_stage`` and ``check_stream_resume`` for resuming ``cfg`` (an ``SFTConfig``) from
    ``checkpoint`` (nothing to check without one)."""
    if checkpoint is None:
        return
    check_zero_stage(checkpoint, cfg.parallelism.zero_stage, cfg.parallelism.sequence_parallel_size)
    check_stream_resume(checkpoint, streaming=any(s.streaming for s in cfg.data.sources))


def check_stream_resume(checkpoint: Path, *, streaming: bool) -> None:
    """Stop (ConfigError), before any work, when a streamed run would resume on another number of processes
    than wrote the checkpoint: each rank's stream position is its own share of the records.

    Example:
        >>> import json, tempfile
        >>> ckpt = Path(tempfile.mkdtemp())
        >>> _ = (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 2}))
        >>> check_stream_resume(ckpt, streaming=False)
        >>> check_stream_resume(ckpt, streaming=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sftdist.config.checks.ConfigError: ... written by 2 process(es) ...
    """
    saved = saved_state(checkpoint).get("world_size")
    if streaming and saved != world_size():
        raise ConfigError(f"{checkpoint} was written by {saved} process(es) and this run has {world_size()}: a run "
                          f"with a streaming source resumes only on as many processes, since each rank's stream "
                          f"position is its own share of the records (resume on {saved}, or start a new run from "
                          f"its final/ weights)")


def check_sequence_parallel(cfg, world: int) -> int:
    """``parallelism.sequence_parallel_size`` checked against the processes and the model's config, before any
    work (one ConfigError naming the key); returns it."""
    sp = cfg.parallelism.sequence_parallel_size
    if sp == 1:
        return sp
    if world % sp:
        raise ConfigError(f"parallelism.sequence_parallel_size={sp} must divide the {world} process(es) of this "
                          f"job (each group of {sp} ranks splits a sequence; data parallelism runs across groups)")
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF  # noqa: F401
    except ImportError as e:
        import deepspeed

        raise ConfigError(f"parallelism.sequence_parallel_size={sp} needs DeepSpeed's Ulysses attention "
                          f"(deepspeed.runtime.sequence_parallel, DeepSpeed >= 0.17.2; tested with 0.19), which "
                          f"DeepSpeed {deepspeed.__version__} lacks: pip install -U deepspeed") from e
    problem = sequence_parallel.model_problem(hf_config(cfg.model).get_text_config(), sp,
                                              cfg.model.attn_implementation, cfg.train.max_length)
    if problem:
        raise ConfigError(f"parallelism.sequence_parallel_size={sp} does not fit this model: {problem}")
    return sp


def check_attention(model, sp: int) -> None:
    """The loaded model runs the attention sequence parallelism needs (``check_sequence_parallel`` saw only
    its config)."""
    if sp > 1 and model.config._attn_implementation != attention.NAME:
        raise ConfigError(f"parallelism.sequence_parallel_size={sp} needs sdpa attention run by document; "
                          f"this model runs {model.config._attn_implementation}")


def log_data_report(data: TrainData, report: list[dict]) -> None:
    """Log each source's kept records and realised mix (``mix_report``, or a stream's preview of it)."""
    for warning in data.warnings:
        log(f"warning: {warning}")
    for r, source in zip(report, data.sources):
        skipped = {k: v for k, v in r["statuses"].items() if k != "ok"}
        where = (f"streamed ({r['kept']}/{r['records']} records kept by the preview)" if source.stream else
                 f"{r['kept']}/{r['records']} records kept")
        window = "in the first rows streamed" if r.get("streaming") else "per epoch"
        log(f"data {r['source']}: {where}{f' {skipped}' if skipped else ''}{split_note(r['split'])}; {window} "
            f"{r['samples_per_epoch']} samples = {r['sample_share']:.1%} of samples, "
            f"{r['supervised_token_share']:.1%} of supervised tokens; {r['audited']} masks audited"
            + ("; generic: its eval_loss_delta is the forgetting curve" if source.generic and source.eval else ""))


def log_summary(**kwargs) -> None:
    """Log ``progress.start_summary`` as one block."""
    log("run summary\n  " + "\n  ".join(start_summary(**kwargs)))


def choose_head(engine, batches, *, mode: str, chunk_tokens: int, step: int) -> LossHead:
    """``train.lm_head``, unless the supervised head disagrees with the model's own logits on this rank's
    first micro-batch on any rank: then ``full``, with a warning saying why.

    The check runs in eval mode on a forked RNG, so dropout masks (and exact resume) are untouched.
    """
    if mode != "supervised":
        return LossHead(mode, chunk_tokens)
    first, bad_record = rank_batches(batches, step)  # (a stream keeps them: the loop gets these same ones)
    if all_reduce_sum([float(bad_record is not None)])[0]:
        raise_bad_record(bad_record)
    return head_for_batch(engine, first[0], mode=mode, chunk_tokens=chunk_tokens)


def rank_batches(batches, step: int) -> tuple[list[dict], Optional[DataError]]:
    """This rank's micro-batches of ``step``, or none and the bad record that its stream met (which every
    rank must hear of, in a collective the caller holds anyway, before it stops: the others are about to wait
    for this one)."""
    try:
        return batches.micro_batches(step), None
    except DataError as e:
        return [], e


def raise_bad_record(bad_record: Optional[DataError]) -> NoReturn:
    """Once every rank knows some rank met a bad record: raise the first such rank's error on every rank
    (rank 0 prints it; the others exit quietly)."""
    raise DataError(next(m for m in all_gather_text(str(bad_record or "")) if m),
                    bad_record.reason if bad_record else "bad_record")


def head_for_batch(engine, batch: dict, *, mode: str, chunk_tokens: int) -> LossHead:
    """``choose_head``'s verdict on a given collated batch (on CPU; every rank calls it)."""
    if mode != "supervised":
        return LossHead(mode, chunk_tokens)
    batch = {k: v.to(device()) for k, v in batch.items()}
    engine.eval()
    with torch.random.fork_rng(devices=[]):
        problem = check_supervised_head(engine, batch)
    engine.train()
    if all_reduce_sum([float(problem is not None)])[0] == 0:
        return LossHead(mode, chunk_tokens)
    log(f"warning: train.lm_head=supervised does not fit this model ({problem or 'on another rank'}); "
        f"computing all logits (train.lm_head=full)")
    return LossHead("full", chunk_tokens)
