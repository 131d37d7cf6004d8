"""The training entry point (``python -m sftdist.train`` / ``sftdist-train``) and the one training loop.

``main()`` is the only place that sees Hydra's ``DictConfig``; it converts it to the typed ``SFTConfig``
and hands typed groups to the builders. ``train_loop()`` is shared by full fine-tuning and LoRA.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sftdist import attention
from sftdist.advice import peft_chosen, recipes_chosen, startup_advice
from sftdist.build_locks import clear_stale_build_locks
from sftdist.checkpoint import (CheckpointError, checkpoint_step, latest_checkpoint, load_checkpoint, needs_universal,
                                save_checkpoint, save_final, saved_state, saved_world_size, universal_checkpoint)
from sftdist.config import ConfigError, SFTConfig, grad_accum_steps, register_configs, validate
from sftdist.config_overrides import check_override_keys, prefer_named_model
from sftdist.data import DataError, TrainData, build_datasets, build_schedule, make_batch, prepare_all
from sftdist.data.loader import SampleSchedule
from sftdist.evaluation import EvalPlan, EvalTracker, per_source_metrics
from sftdist.logging import MetricsLogger, log
from sftdist.forward import LossHead
from sftdist.loss import backward_scale, per_source_sums
from sftdist.model import build_model, load_tokenizer
from sftdist.nonfinite import NonFiniteError, NonFiniteGuard, hold_stage0_update, stop_message
from sftdist.optim import lr_multiplier, param_groups, warmup_steps
from sftdist.parallel import (all_reduce_sum, barrier, broadcast_from_main, build_ds_config, device, has_gpu,
                              init_distributed, is_main, local_main_first, main_only, rank, report_lost_peer,
                              resolve_precision, shutdown, stage0_grad_norm, world_size, wrap_with_deepspeed,
                              zero3_init_context)
from sftdist.progress import Progress
from sftdist.preemption import exit_code, install_stop_handlers, received, record_stop, requeue_after
from sftdist.peft import apply_peft, merge_adapter, trainable_summary
from sftdist.resume_check import data_summary, run_settings
from sftdist.rundir import check_writable, clean_partial_saves, prepare_run_dir, resolve_resume, retire_newer_checkpoints
from sftdist.samples import sample_prompts
from sftdist.startup import check_same_run, choose_head, log_data_report, log_summary
from sftdist.step_metrics import StepMeter, batch_counts
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
    early_stopped: Optional[str] = None  # why early stopping ended the run (then it is finished)


@dataclass
class Saving:
    """Where and how often the loop checkpoints, and the run settings each checkpoint records."""

    run_dir: Path
    every: int
    keep_last: int
    run_settings: dict
    best: bool = False  # also checkpoint each eval step that improves the early-stopping metric

    def save(self, engine, step: int, tracker: EvalTracker) -> Path:
        return save_checkpoint(engine, self.run_dir, step, keep_last=self.keep_last, run_settings=self.run_settings,
                               eval_state=tracker.state(), protect_step=tracker.best_step if self.best else None)


def train_loop(engine, data: TrainData, schedule: SampleSchedule, *, start_step: int, max_steps: int,
               micro_batch_size: int, pad_id: int, packed: bool, head: LossHead, metrics: MetricsLogger,
               meter: StepMeter, progress: Progress, evals: EvalPlan, saving: Saving, stop: StopRule,
               guard: NonFiniteGuard) -> LoopResult:
    """Run optimizer steps ``start_step`` .. ``max_steps - 1``, or stop early with a checkpoint by ``stop``.

    Each step: fetch this rank's micro-batches, count the supervised tokens of the whole step over all
    ranks (one all-reduce), then forward / token losses / backward per micro-batch, scaled so the gradient
    is that of the mean over every supervised token in the step.

    Raises:
        NonFiniteError: at a NaN/inf loss or grad norm that ``guard`` does not skip, before that step is
            evaluated or saved.
    """
    rank_, world, dev = rank(), world_size(), device()
    grad_accum = engine.gradient_accumulation_steps()
    num_sources = len(data.sources)
    stage0, grad_norm = engine.zero_optimization_stage() == 0, None
    losses: list[float] = []
    total_tokens, start = 0, time.time()
    step_seconds = save_seconds = 0.0
    if start_step == 0 and evals.due(0, last=False):  # the baseline that eval_loss_delta/<source> is measured from
        baseline, _, _ = evals.run(engine, data, head, step=0, metrics=metrics)
        if baseline:
            metrics.write({"step": 0, "elapsed_s": time.time() - start, **baseline})
            log(f"step 0 (before training)  eval_loss {baseline['eval_loss']:.4f}")
    step = start_step - 1
    for step in range(start_step, max_steps):
        step_start = time.time()
        # 1. This step's micro-batches, and the step's global supervised-token count (needed before backward).
        micro_batches = [make_batch(data, mb, pad_id, packed=packed)
                         for mb in schedule.micro_batches(step, rank_, world, micro_batch_size)]
        global_supervised, global_tokens, global_slots, global_attention = all_reduce_sum(batch_counts(micro_batches))
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
                # ZeRO 1-3 drop a non-finite update themselves; ZeRO-0 is told to (nonfinite.py)
                hold_stage0_update(engine, guard.skips and not math.isfinite(grad_norm))
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
        row = {"step": step + 1, "loss": loss, "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "tokens": int(global_tokens), "supervised_tokens": int(global_supervised),
               **meter.metrics(supervised=int(global_supervised), tokens=int(global_tokens), slots=int(global_slots),
                               attention=int(global_attention), seconds=time.time() - step_start),
               "elapsed_s": time.time() - start, **per_source_metrics("loss", data.names, totals)}
        # A NaN/inf loss or grad norm (the same on every rank): skip the update DeepSpeed dropped, or stop
        # before this state is evaluated or saved (nonfinite.py).
        verdict = guard.check(step=step + 1, loss=loss, grad_norm=row["grad_norm"],
                              source_losses={n: row[f"loss/{n}"] for n in data.names},
                              update_applied=engine.was_step_applied())
        if verdict == "skipped":
            row["skipped_nonfinite"] = 1
            log(f"step {step + 1}: non-finite loss or grad_norm, update skipped (train.on_nonfinite=skip)")
        elif verdict:
            metrics.write(row)
            raise NonFiniteError(stop_message(verdict, latest_checkpoint(saving.run_dir)))
        last, improved, early_stop = step + 1 == max_steps, False, None
        if evals.due(step + 1, last):
            entries, improved, early_stop = evals.run(engine, data, head, step=step + 1, metrics=metrics)
            row |= entries
        metrics.write(row)
        progress.update(row)
        # 7. checkpoint every save_every steps, at a new best eval (early stopping keeps it for final/), and
        # before stopping early; the run ends at max_steps.
        step_seconds = max(step_seconds, time.time() - step_start)
        why = None if last else early_stop or (f"{stop_signal} received" if stop_signal else None) or stop.reason(
            step=step + 1, steps_run=len(losses), step_seconds=step_seconds, save_seconds=save_seconds)
        if (saving.every and (step + 1) % saving.every == 0 and not last) or (why and not early_stop) or \
                (improved and saving.best):
            save_start = time.time()
            path = saving.save(engine, step + 1, evals.tracker)
            save_seconds = time.time() - save_start
            log(f"checkpoint saved: {path}" + ("  (best eval so far)" if improved and saving.best else ""))
        if why:
            log(f"stopping early ({why})")
            break
    return LoopResult(len(losses), step + 1, losses[0] if losses else float("nan"),
                      losses[-1] if losses else float("nan"), total_tokens, time.time() - start,
                      stop_signal if why and not early_stop else None, early_stop if why else None)


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
    attention.use_for(model, cfg.model.attn_implementation, t.max_length)
    model = apply_peft(model, cfg.peft)
    warmup = warmup_steps(t, max_steps)
    engine = wrap_with_deepspeed(
        model, param_groups(model, t.weight_decay), ds_config,
        lambda s: lr_multiplier(s, max_steps=max_steps, warmup=warmup, schedule=t.schedule,
                                min_lr_ratio=t.min_lr_ratio))
    return engine, model


def run(cfg: SFTConfig, *, peft_was_chosen: bool = False) -> Path:
    """Build every component from the typed config, train, export ``final/``; return the run directory.
    ``peft_was_chosen``: the command line picked a peft option (no full fine-tuning advice, ``advice.py``)."""
    started = time.time()
    t = cfg.train
    clear_stale_build_locks(cfg.parallelism.build_lock_stale_s)  # before DeepSpeed builds or loads any op
    init_distributed(timeout_s=cfg.parallelism.collective_timeout_s)
    gpu, world = has_gpu(), world_size()
    validate(cfg, dp_world=world, has_gpu=gpu)
    run_dir = Path(broadcast_from_main(str(Path(cfg.output_dir).absolute())))  # one directory for all ranks
    check_writable(run_dir)
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
    mix = log_data_report(data, schedule)
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
    engine, model = build_engine(cfg, tokenizer, ds_config, precision=precision, max_steps=max_steps)
    for line in startup_advice(cfg, model.config, peft_was_chosen=peft_was_chosen, world=world, precision=precision,
                               grad_accum_fp32=ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32"):
        log(line)
    # Only now, with the model loaded and its adapter applied, is the run sure to start: a failure before
    # this point leaves an existing output_dir as it was.
    cfg.output_dir = str(run_dir)
    prepare_run_dir(run_dir, overwrite=t.overwrite, resume_step=resume_step,
                    config_yaml=OmegaConf.to_yaml(cfg), ds_config=ds_config)
    if resume_step is not None and (aside := retire_newer_checkpoints(run_dir, resume_step)):
        log(f"resuming from step {resume_step}: moved this run's later checkpoints aside to {aside} "
            f"(no longer resumed or counted by keep_last; delete them when not needed)")
    start_step = load_checkpoint(engine, resume_from) if resume_from else 0
    if resume_from:
        log(f"resumed from {resume_from} after step {start_step}")
    log_summary(model_name=cfg.model.name_or_path or f"{cfg.model.from_config['model_type']} from config (random init)",
                trainable=trainable_summary(model), mix=mix, global_batch_size=t.global_batch_size,
                epoch_len=schedule.epoch_len, max_steps=max_steps, world=world, zero_stage=cfg.parallelism.zero_stage,
                precision=precision, grad_accum=grad_accum_steps(t, world), packing=cfg.data.packing,
                max_length=t.max_length, run_dir=str(run_dir))

    head = choose_head(engine, data, schedule, mode=t.lm_head, chunk_tokens=t.loss_chunk_tokens,
                       step=start_step, micro_batch_size=t.micro_batch_size, pad_id=tokenizer.pad_token_id,
                       packed=cfg.data.packing) if start_step < max_steps else LossHead(t.lm_head)
    meter, peak_note = StepMeter.build(model, precision=precision, peak_override=cfg.logging.peak_flops,
                                       head_everywhere=head.mode == "full")
    log(peak_note)
    tracker = EvalTracker.from_state(t.early_stopping, saved_state(resume_from).get("eval") if resume_from else None)
    if not (prompts := sample_prompts(data, tokenizer, cfg.logging)) and cfg.logging.samples:
        log("warning: logging.samples is set but no source has an eval split: no sample generations "
            "(give a source eval_fraction or eval_path, or set logging.sample_prompts)")
    evals = EvalPlan(t.eval_every, t.eval_at_start, tracker, data.has_eval(), t.micro_batch_size,
                     tokenizer.pad_token_id, prompts, tokenizer,
                     cfg.logging.sample_max_new_tokens, synced=cfg.parallelism.zero_stage == 3 and world > 1)
    install_stop_handlers()  # from here on a stop signal means: finish the step, checkpoint, exit
    metrics = MetricsLogger(run_dir, cfg.logging, cfg.run_name or run_dir.name,
                            OmegaConf.to_container(OmegaConf.structured(cfg)))
    progress = Progress(start_step=start_step, max_steps=max_steps, log_every=cfg.logging.log_every,
                        mode=cfg.logging.progress)
    saving = Saving(run_dir, t.save_every, t.keep_last, {**settings, **kept},
                    best=tracker.enabled and t.early_stopping.save == "best")
    try:
        result = train_loop(engine, data, schedule, start_step=start_step, max_steps=max_steps,
                            micro_batch_size=t.micro_batch_size, pad_id=tokenizer.pad_token_id,
                            packed=cfg.data.packing, head=head, metrics=metrics, meter=meter, progress=progress,
                            evals=evals, saving=saving, stop=StopRule.from_config(t, started),
                            guard=NonFiniteGuard(t.on_nonfinite, t.max_consecutive_nonfinite))
    except RuntimeError as e:
        report_lost_peer(e, timeout_s=cfg.parallelism.collective_timeout_s)
        raise
    finally:
        progress.close()
    log(f"ran {result.steps} steps in {result.seconds:.1f}s, loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}, {result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s")
    log(f"run directory: {run_dir}")
    if result.last_step == max_steps or result.early_stopped:
        if saving.best:
            restore_best(engine, run_dir, tracker, last_step=result.last_step)
        log(f"final model:   {save_final(engine, tokenizer, run_dir)}")
        if cfg.peft.method != "none" and cfg.peft.merge_on_save:
            if is_main():
                log(f"merged model:  {merge_adapter(run_dir)}")
            barrier()
    else:
        log(f"stopped after step {result.last_step} of {max_steps}; the same command resumes from the checkpoint")
        if result.stop_signal:  # every rank stopped after the same step, so every rank gets here
            requeued, note = broadcast_from_main(requeue_after(result.stop_signal) if is_main() else None)
            if note:
                log(note)
            log(f"exit status {record_stop(requeued=requeued)}: "
                + ("requeued" if requeued else f"stopped by {result.stop_signal}, resumable (preemption.py)"))
    metrics.close()
    return run_dir


def restore_best(engine, run_dir: Path, tracker: EvalTracker, *, last_step: int) -> None:
    """Load the best eval step's checkpoint into the engine for ``final/`` (early stopping, save=best); keep
    the last step's weights, and say so, when that is the best or its checkpoint cannot load here."""
    metric, best = tracker.early.metric, tracker.best_step
    path = run_dir / "checkpoints" / f"step-{best}"
    if best is None or best == last_step:
        log(f"final/ holds the last step {last_step}" + (f", the best {metric} ({tracker.best_value:.4f})"
                                                          if best is not None else " (no eval improved)"))
    elif not (path / "trainer_state.json").exists() or needs_universal(path, world_size()):
        log(f"warning: final/ holds the last step {last_step}, not the best {metric} step {best}: its "
            f"checkpoint {path} is missing or was written on another number of ranks")
    else:
        load_checkpoint(engine, path)
        log(f"final/ holds step {best}, the best {metric} ({tracker.best_value:.4f}); training went on to "
            f"step {last_step}")


@hydra.main(version_base=None, config_path="pkg://sftdist.conf", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    try:
        place_sweep_point(raw)  # a multirun point gets its own output_dir, W&B group and run name
        task = list(HydraConfig.get().overrides.task)
        if note := prefer_named_model(raw, task):
            log(note)
        if recipes := recipes_chosen(task):
            log(f"recipe: {', '.join(recipes)} (conf/recipe/; command-line keys override it)")
        cfg: SFTConfig = OmegaConf.to_object(raw)  # the DictConfig stops here: typed dataclasses from now on
        run(cfg, peft_was_chosen=peft_chosen(task))
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
        # A user mistake or a full disk, not a crash: one clear line (from rank 0; every rank fails alike).
        sys.exit(f"sftdist: error: {e}" if is_main() else 2)
    distributed = world_size() > 1
    if distributed or not in_multirun():
        # (The points of a local sweep run one after another in this process and share its one-process
        # group: DeepSpeed keeps references to it that a new group would not satisfy.)
        shutdown()
    if distributed and "SUBMITIT_FOLDER" not in os.environ:  # a submitit task still has its result to write
        # Every file is written and closed. Skip interpreter teardown: in multi-process CPU runs a native
        # thread left by the gloo/DeepSpeed stack occasionally aborts the process at exit ("terminate called
        # without an active exception"), which would turn a finished run into a failed job. Likely cause (not
        # reproduced in 27 tries): gloo threads of process groups that DeepSpeed still references after
        # shutdown() (deepspeed.utils.groups) run on during interpreter teardown. Errors never get here:
        # they raise above and exit non-zero (tests/dist/test_dead_rank.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code())
    if exit_code():  # preemption.RESUMABLE_EXIT: stopped by a signal, with a checkpoint
        sys.exit(exit_code())


def main() -> None:
    """Console entry point. Drops ``--local_rank=N``, which the ``deepspeed`` launcher appends (the same
    value is in the LOCAL_RANK variable) and which Hydra would reject as an override."""
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    try:
        check_override_keys(sys.argv[1:])  # Hydra's own message for an unknown key suggests nothing useful
    except ConfigError as e:
        sys.exit(f"sftdist: error: {e}" if is_main() else 2)
    _hydra_main()


if __name__ == "__main__":
    main()
