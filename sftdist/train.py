"""The training entry point (``python -m sftdist.train`` / ``sftdist-train``) and the one training loop.

``main()`` is the only place that sees Hydra's ``DictConfig``; it converts it to the typed ``SFTConfig``
and hands typed groups to the builders. ``train_loop()`` is shared by full fine-tuning and LoRA.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sftdist import attention
from sftdist.build_locks import clear_stale_build_locks
from sftdist.checkpoint import (checkpoint_step, load_checkpoint, needs_universal, save_checkpoint, save_final,
                                saved_state, saved_world_size, universal_checkpoint)
from sftdist.config import ConfigError, SFTConfig, grad_accum_steps, register_configs, validate
from sftdist.data import (IGNORE_INDEX, DataError, TrainData, build_datasets, build_schedule, mix_report,
                          prepare_all)
from sftdist.data.collate import collate, collate_packed
from sftdist.data.loader import SampleSchedule
from sftdist.logging import MetricsLogger, log
from sftdist.forward import LossHead, check_supervised_head
from sftdist.loss import backward_scale, per_source_sums
from sftdist.model import build_model, load_tokenizer
from sftdist.optim import lr_multiplier, param_groups, warmup_steps
from sftdist.parallel import (all_reduce_sum, barrier, broadcast_from_main, build_ds_config, device, has_gpu,
                              init_distributed, is_main, local_main_first, main_only, rank, resolve_precision,
                              shutdown, stage0_grad_norm, world_size, wrap_with_deepspeed, zero3_init_context)
from sftdist.preemption import install_stop_handlers, received, requeue_after
from sftdist.peft import apply_peft, merge_adapter, trainable_summary
from sftdist.resume_check import check_unchanged, data_summary, run_settings
from sftdist.rundir import clean_partial_saves, prepare_run_dir, resolve_resume, retire_newer_checkpoints
from sftdist.stop_rule import StopRule
from sftdist.sweep import in_multirun, place_sweep_point

register_configs()


@dataclass
class LoopResult:
    steps: int  # optimizer steps run in this process (fewer than max_steps after a resume)
    last_step: int
    first_loss: float
    last_loss: float
    tokens: int
    seconds: float
    stop_signal: Optional[str] = None  # SIGUSR1 / SIGTERM when one stopped the run early


def make_batch(data: TrainData, sequences: list[list[tuple[int, int]]], pad_id: int, *, packed: bool,
               split: str = "train") -> dict[str, torch.Tensor]:
    """Collate sequences of ``(source, record)`` samples: one sample per row, or packed rows."""
    rows = [[data.get(s, i, split) for s, i in seq] for seq in sequences]
    return collate_packed(rows, pad_id) if packed else collate([r[0] for r in rows], pad_id)


def per_source_metrics(prefix: str, names: list[str], sums: list[float]) -> dict[str, float]:
    """``{loss/<name>: ..., supervised_tokens/<name>: ...}`` (``eval_`` versions for prefix ``eval_loss``)
    from a ``per_source_sums`` vector summed over ranks."""
    out = {}
    for i, name in enumerate(names):
        count = sums[len(names) + i]
        out[f"{prefix}/{name}"] = sums[i] / count if count else None
        out[f"{prefix.removesuffix('loss')}supervised_tokens/{name}"] = int(count)
    return out


def evaluate(engine, data: TrainData, *, micro_batch_size: int, pad_id: int, head: LossHead) -> dict[str, float]:
    """Token-weighted loss on every source's eval split, overall and per source.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively), padding
    its share with a masked-out repeat of a record when the split does not divide evenly.
    """
    rank_, world, dev = rank(), world_size(), device()
    names, num = data.names, len(data.sources)
    sums = torch.zeros(2 * num, dtype=torch.float64, device=dev)
    samples = [(s, i) for s, src in enumerate(data.sources) if src.eval is not None for i in range(len(src.eval))]
    per_rank = -(-len(samples) // world)
    mine = samples[rank_ * per_rank:(rank_ + 1) * per_rank]
    mine += [None] * (per_rank - len(mine))  # placeholders keep forward counts equal across ranks
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, micro_batch_size):
            chunk = mine[start:start + micro_batch_size]
            batch = make_batch(data, [[c or samples[0]] for c in chunk], pad_id, packed=False, split="eval")
            batch["targets"][[i for i, c in enumerate(chunk) if c is None]] = IGNORE_INDEX
            batch = {k: v.to(dev) for k, v in batch.items()}
            losses, mask = head.losses(engine, batch)
            sums += per_source_sums(losses, batch["token_source"][mask], num)
    engine.train()
    totals = all_reduce_sum(sums.tolist())
    loss = sum(totals[:num]) / max(sum(totals[num:]), 1)
    return {"eval_loss": loss, **per_source_metrics("eval_loss", names, totals)}


@dataclass
class Saving:
    """Where and how often the loop checkpoints, and the run settings each checkpoint records."""

    run_dir: Path
    every: int
    keep_last: int
    run_settings: dict


def train_loop(engine, data: TrainData, schedule: SampleSchedule, *, start_step: int, max_steps: int,
               micro_batch_size: int, pad_id: int, packed: bool, head: LossHead, metrics: MetricsLogger,
               log_every: int, eval_every: int, saving: Saving, stop: StopRule) -> LoopResult:
    """Run optimizer steps ``start_step`` .. ``max_steps - 1``, or stop early with a checkpoint by ``stop``.

    Each step: fetch this rank's micro-batches, count the supervised tokens of the whole step over all
    ranks (one all-reduce), then forward / token losses / backward per micro-batch, scaled so the gradient
    is that of the mean over every supervised token in the step.
    """
    rank_, world, dev = rank(), world_size(), device()
    grad_accum = engine.gradient_accumulation_steps()
    num_sources = len(data.sources)
    stage0, grad_norm = engine.zero_optimization_stage() == 0, None
    has_eval = any(s.eval is not None and len(s.eval) for s in data.sources)
    losses: list[float] = []
    total_tokens, start = 0, time.time()
    step_seconds = save_seconds = 0.0
    step = start_step - 1
    for step in range(start_step, max_steps):
        step_start = time.time()
        # 1. This step's micro-batches, and the step's global supervised-token count (needed before backward).
        micro_batches = [make_batch(data, mb, pad_id, packed=packed)
                         for mb in schedule.micro_batches(step, rank_, world, micro_batch_size)]
        local_supervised = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro_batches)
        local_tokens = sum(int((b["token_source"] >= 0).sum()) for b in micro_batches)
        local_slots = sum(b["input_ids"].numel() for b in micro_batches)  # tokens + padding
        global_supervised, global_tokens, global_slots = all_reduce_sum(
            [local_supervised, local_tokens, local_slots])
        scale = backward_scale(int(global_supervised), grad_accum, world)
        lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler advances inside step()

        sums = torch.zeros(2 * num_sources, dtype=torch.float64, device=dev)
        for batch in micro_batches:
            batch = {k: v.to(dev) for k, v in batch.items()}
            # 2. forward; 3. per-token losses of the supervised positions
            token_losses, mask = head.losses(engine, batch)
            # 4. backward, scaled to a per-supervised-token mean over the whole step
            engine.backward(token_losses.sum() * scale)
            if stage0 and engine.is_gradient_accumulation_boundary():
                grad_norm = stage0_grad_norm(engine)
            # 5. DeepSpeed counts micro-steps inside step() and updates only at the accumulation boundary.
            engine.step()
            sums += per_source_sums(token_losses, batch["token_source"][mask], num_sources)

        # 6. log: the step's loss is its summed token loss over all ranks divided by its supervised tokens.
        # The same collective tells every rank whether any rank got a stop signal (preemption.py).
        signalled = received()
        totals = all_reduce_sum([*sums.tolist(), float(signalled == "SIGUSR1"), float(signalled == "SIGTERM")])
        got_term, got_usr1 = totals.pop() > 0, totals.pop() > 0
        stop_signal = "SIGTERM" if got_term else "SIGUSR1" if got_usr1 else None  # a cancel is never requeued
        loss = sum(totals[:num_sources]) / max(global_supervised, 1)
        grad_norm = grad_norm if stage0 else engine.get_global_grad_norm()
        total_tokens += int(global_tokens)
        losses.append(loss)
        elapsed = time.time() - start
        row = {"step": step + 1, "loss": loss, "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "tokens": int(global_tokens), "supervised_tokens": int(global_supervised),
               "tokens_per_sec": global_tokens / max(time.time() - step_start, 1e-9), "elapsed_s": elapsed,
               "padding_fraction": 1 - global_tokens / max(global_slots, 1),
               **per_source_metrics("loss", data.names, totals)}
        last = step + 1 == max_steps
        if has_eval and ((eval_every and (step + 1) % eval_every == 0) or last):
            row |= evaluate(engine, data, micro_batch_size=micro_batch_size, pad_id=pad_id, head=head)
        metrics.write(row)
        if (step + 1) % log_every == 0 or last:
            log(f"step {step + 1}/{max_steps}  loss {loss:.4f}  lr {lr:.2e}  grad_norm {float(grad_norm):.3f}"
                f"  tok/s {total_tokens / elapsed:,.0f}" + (f"  eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""))
        # 7. checkpoint every save_every steps, and before stopping early; the run ends at max_steps.
        step_seconds = max(step_seconds, time.time() - step_start)
        why = None if last else (f"{stop_signal} received" if stop_signal else None) or stop.reason(
            step=step + 1, steps_run=len(losses), step_seconds=step_seconds, save_seconds=save_seconds)
        if (saving.every and (step + 1) % saving.every == 0 and not last) or why:
            save_start = time.time()
            path = save_checkpoint(engine, saving.run_dir, step + 1, keep_last=saving.keep_last,
                                   run_settings=saving.run_settings)
            save_seconds = time.time() - save_start
            log(f"checkpoint saved: {path}")
        if why:
            log(f"stopping early ({why})")
            break
    return LoopResult(len(losses), step + 1, losses[0] if losses else float("nan"),
                      losses[-1] if losses else float("nan"), total_tokens, time.time() - start,
                      stop_signal if why else None)


def log_data_report(data: TrainData, schedule: SampleSchedule) -> None:
    for warning in data.warnings:
        log(f"warning: {warning}")
    for r in mix_report(data, schedule):
        skipped = {k: v for k, v in r["statuses"].items() if k != "ok"}
        log(f"data {r['source']}: {r['kept']}/{r['records']} records kept{f' {skipped}' if skipped else ''}; per epoch "
            f"{r['samples_per_epoch']} samples = {r['sample_share']:.1%} of samples, "
            f"{r['supervised_token_share']:.1%} of supervised tokens; {r['audited']} masks audited")


def build_engine(cfg: SFTConfig, tokenizer, ds_config: dict, *, precision: str, max_steps: int):
    """The model (with its adapter) inside a DeepSpeed engine with AdamW and the lr schedule."""
    t = cfg.train
    # Pretrained weights load straight into ZeRO-3 partitions. A random-init model (model.from_config) is
    # built whole and partitioned by deepspeed.initialize, since zero.Init draws other initial weights and
    # the model would then depend on the ZeRO stage.
    zero3_ctx = zero3_init_context(ds_config) if cfg.model.name_or_path else None  # noqa: F841  (keep alive)
    model = build_model(cfg.model, tokenizer, precision=precision, seed=t.seed,
                        activation_checkpointing=cfg.parallelism.activation_checkpointing,
                        quantize_4bit=cfg.peft.method == "qlora")
    if cfg.model.attn_implementation == "sdpa" and attention.fits(model.config, t.max_length):
        attention.register()  # packed documents attend within themselves without a dense mask
        model.set_attn_implementation(attention.NAME)
    model = apply_peft(model, cfg.peft)
    warmup = warmup_steps(t, max_steps)
    engine = wrap_with_deepspeed(
        model, param_groups(model, t.weight_decay), ds_config,
        lambda s: lr_multiplier(s, max_steps=max_steps, warmup=warmup, schedule=t.schedule,
                                min_lr_ratio=t.min_lr_ratio))
    return engine, model


def choose_head(engine, data: TrainData, schedule: SampleSchedule, *, mode: str, chunk_tokens: int,
                step: int, micro_batch_size: int, pad_id: int, packed: bool) -> LossHead:
    """``train.lm_head``, unless the supervised head disagrees with the model's own logits on this rank's
    first micro-batch on any rank: then ``full``, with a warning saying why.

    The check runs in eval mode on a forked RNG, so dropout masks (and exact resume) are untouched.
    """
    if mode != "supervised":
        return LossHead(mode, chunk_tokens)
    first = schedule.micro_batches(step, rank(), world_size(), micro_batch_size)[0]
    batch = {k: v.to(device()) for k, v in make_batch(data, first, pad_id, packed=packed).items()}
    engine.eval()
    with torch.random.fork_rng(devices=[]):
        problem = check_supervised_head(engine, batch)
    engine.train()
    if all_reduce_sum([float(problem is not None)])[0] == 0:
        return LossHead(mode, chunk_tokens)
    log(f"warning: train.lm_head=supervised does not fit this model ({problem or 'on another rank'}); "
        f"computing all logits (train.lm_head=full)")
    return LossHead("full", chunk_tokens)


def check_same_run(checkpoint: Path, now: dict, *, allow: bool) -> None:
    """Stop (ConfigError) if the checkpoint was written by a run whose steps saw other samples than ``now``'s
    settings give; with ``allow``, log each difference and go on."""
    saved = saved_state(checkpoint).get("run")
    if saved is None:
        log(f"warning: {checkpoint} records no run settings (an older sftdist wrote it): resuming unchecked")
        return
    for change in check_unchanged(saved, now, checkpoint=str(checkpoint), allow=allow):
        log(f"warning: resuming despite a change (train.resume_allow_changes=true): {change}")


def run(cfg: SFTConfig) -> Path:
    """Build every component from the typed config, train, export ``final/``; return the run directory."""
    started = time.time()
    t = cfg.train
    clear_stale_build_locks(cfg.parallelism.build_lock_stale_s)  # before DeepSpeed builds or loads any op
    init_distributed()
    gpu, world = has_gpu(), world_size()
    validate(cfg, dp_world=world, has_gpu=gpu)
    run_dir = Path(broadcast_from_main(str(Path(cfg.output_dir).absolute())))  # one directory for all ranks
    for path in clean_partial_saves(run_dir):
        log(f"removed {path}, left by a save that crashed")
    resume_from = resolve_resume(run_dir, resume=t.resume, overwrite=t.overwrite)
    resume_step = checkpoint_step(resume_from) if resume_from else None
    if resume_step is not None and t.stop_at_step is not None and resume_step >= t.stop_at_step:
        log(f"{resume_from} is at step {resume_step}, already at train.stop_at_step={t.stop_at_step}: nothing "
            f"to run (raise it, or use train.stop_after_steps / stop_after_minutes to stop relative to this run)")
        return run_dir

    tokenizer = load_tokenizer(cfg.model)
    settings = run_settings(cfg, tokenizer)
    if resume_from:
        check_same_run(resume_from, settings, allow=t.resume_allow_changes)  # before the data stage's work
    dirs = local_main_first(lambda: prepare_all(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed))
    data = build_datasets(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed, dirs=dirs)
    kept = data_summary({s.name: s.stats for s in data.sources})
    if resume_from:
        check_same_run(resume_from, kept, allow=t.resume_allow_changes)
    schedule = build_schedule(data, cfg.data, seed=t.seed, global_batch_size=t.global_batch_size,
                              max_length=t.max_length)
    log_data_report(data, schedule)
    max_steps = t.max_steps if t.max_steps > 0 else schedule.steps_for_epochs(t.epochs)

    precision = resolve_precision(cfg.parallelism.precision, gpu=gpu)
    ds_config = build_ds_config(cfg.parallelism, t, dp_world=world, precision=precision, gpu=gpu)
    if precision == "bf16" and ds_config.get("data_types", {}).get("grad_accum_dtype") != "fp32" \
            and grad_accum_steps(t, world) > 1:
        log(f"warning: {grad_accum_steps(t, world)} micro-batch gradients are summed in bf16 (ZeRO-0, or "
            f"parallelism.grad_accum_dtype=bf16), which drops their low-order bits; ZeRO 1-3 sum in fp32")
    if resume_from and needs_universal(resume_from, world):
        # ZeRO 1-3 shard optimizer state by rank: another world size loads DeepSpeed's universal format,
        # converted once for the whole job (on shared storage every node sees the same directory).
        written_by = saved_world_size(resume_from)
        resume_from = main_only(lambda: universal_checkpoint(resume_from))
        ds_config["checkpoint"] = {"load_universal": True}
        log(f"checkpoint written by {written_by} rank(s), resuming on {world}: converted to {resume_from}")
    cfg.output_dir = str(run_dir)
    prepare_run_dir(run_dir, overwrite=t.overwrite, resume_step=resume_step,
                    config_yaml=OmegaConf.to_yaml(cfg), ds_config=ds_config)
    if resume_step is not None and (aside := retire_newer_checkpoints(run_dir, resume_step)):
        log(f"resuming from step {resume_step}: moved this run's later checkpoints aside to {aside} "
            f"(no longer resumed or counted by keep_last; delete them when not needed)")

    engine, model = build_engine(cfg, tokenizer, ds_config, precision=precision, max_steps=max_steps)
    start_step = load_checkpoint(engine, resume_from) if resume_from else 0
    if resume_from:
        log(f"resumed from {resume_from} after step {start_step}")
    log(f"{world} process(es), ZeRO-{cfg.parallelism.zero_stage}, {precision}, "
        f"grad accumulation {grad_accum_steps(t, world)}, {max_steps} steps; {trainable_summary(model)}")

    head = choose_head(engine, data, schedule, mode=t.lm_head, chunk_tokens=t.loss_chunk_tokens,
                       step=start_step, micro_batch_size=t.micro_batch_size, pad_id=tokenizer.pad_token_id,
                       packed=cfg.data.packing) if start_step < max_steps else LossHead(t.lm_head)
    install_stop_handlers()  # from here on a stop signal means: finish the step, checkpoint, exit
    metrics = MetricsLogger(run_dir, cfg.logging, cfg.run_name or run_dir.name,
                            OmegaConf.to_container(OmegaConf.structured(cfg)))
    result = train_loop(engine, data, schedule, start_step=start_step, max_steps=max_steps,
                        micro_batch_size=t.micro_batch_size, pad_id=tokenizer.pad_token_id, packed=cfg.data.packing,
                        head=head, metrics=metrics, log_every=cfg.logging.log_every, eval_every=t.eval_every,
                        saving=Saving(run_dir, t.save_every, t.keep_last, {**settings, **kept}),
                        stop=StopRule.from_config(t, started))
    log(f"ran {result.steps} steps in {result.seconds:.1f}s, loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}, {result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s")
    log(f"run directory: {run_dir}")
    if result.last_step == max_steps:
        log(f"final model:   {save_final(engine, tokenizer, run_dir)}")
        if cfg.peft.method != "none" and cfg.peft.merge_on_save:
            if is_main():
                log(f"merged model:  {merge_adapter(run_dir)}")
            barrier()
    else:
        log(f"stopped after step {result.last_step} of {max_steps}; the same command resumes from the checkpoint")
        if result.stop_signal and is_main() and (requeued := requeue_after(result.stop_signal)):
            log(requeued)
    metrics.close()
    return run_dir


@hydra.main(version_base=None, config_path="pkg://sftdist.conf", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    try:
        place_sweep_point(raw)  # a multirun point gets its own output_dir, W&B group and run name
        cfg: SFTConfig = OmegaConf.to_object(raw)  # the DictConfig stops here: typed dataclasses from now on
        run(cfg)
    except (ConfigError, DataError) as e:
        # A user mistake, not a crash: one clear line (from rank 0; every rank fails the same way).
        sys.exit(f"sftdist: error: {e}" if is_main() else 2)
    distributed = world_size() > 1
    if distributed or not in_multirun():
        # (The points of a local sweep run one after another in this process and share its one-process
        # group: DeepSpeed keeps references to it that a new group would not satisfy.)
        shutdown()
    if distributed and "SUBMITIT_FOLDER" not in os.environ:  # a submitit task still has its result to write
        # Every file is written and closed. Skip interpreter teardown: in multi-process CPU runs a native
        # thread left by the gloo/DeepSpeed stack occasionally aborts the process at exit ("terminate called
        # without an active exception"), which would turn a finished run into a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main() -> None:
    """Console entry point. Drops ``--local_rank=N``, which the ``deepspeed`` launcher appends (the same
    value is in the LOCAL_RANK variable) and which Hydra would reject as an override."""
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    _hydra_main()


if __name__ == "__main__":
    main()
