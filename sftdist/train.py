"""The training entry point (``python -m sftdist.train`` / ``sftdist train``): the phases of a run around
the one training loop (``sftdist.loop``).

``main()`` is the only place that sees Hydra's ``DictConfig``; it converts it to the typed ``SFTConfig``
and hands typed groups to the builders. ``run()`` reads top to bottom: start the processes, choose the run
directory, build the data, build the engine, open the run directory, train, finish.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sftdist.config import ConfigError, SFTConfig, grad_accum_steps, register_configs, validate
from sftdist.config import overrides, sweep
from sftdist.data import batches as data_batches, build as data_build
from sftdist.data.messages import DataError
from sftdist.engine import adapter, attention, build_locks, deepspeed_wrap, distributed, model as models, optim
from sftdist.engine import compiled, kernels, sequence_parallel, tiling
from sftdist.engine.distributed import is_main, log
from sftdist.engine.forward import LossHead
from sftdist.lifecycle import checkpoint, export, hangs, nonfinite, resume_check, rundir, startup, stopping
from sftdist.loop import LoopParts, LoopResult, Saving, agreed_stop_signal, train_loop
from sftdist.observe import advice, evaluation, forgetting, metrics_log, progress, samples, step_metrics

register_configs()


@dataclass
class RunData:
    """The data stage's result for this run."""

    data: data_build.TrainData
    batches: object  # this rank's micro-batches per step: data.batches.ScheduledBatches or streaming.StreamedBatches
    kept: dict  # what was kept of each source (resume_check.data_summary)
    mix: list  # the realised mix, as logged
    max_steps: int
    probe: Optional[forgetting.ForgettingProbe] = None  # data.forgetting_probe's prompts, checked with the data


def run(cfg: SFTConfig, *, peft_was_chosen: bool = False) -> Path:
    """Build every component from the typed config, train, export ``final/``; return the run directory.
    ``peft_was_chosen``: the command line picked a peft option (no full fine-tuning advice, ``advice.py``)."""
    started = time.time()
    world, gpu = start_processes(cfg)
    run_dir, resume_from = choose_run_dir(cfg)
    if resume_from and already_at_stop(cfg.train, resume_from):
        return run_dir
    startup.check_resume_layout(resume_from, cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    settings = resume_check.run_settings(cfg, tokenizer)
    prepared = build_data(cfg, tokenizer, resume_from, settings)
    resume_step = checkpoint.checkpoint_step(resume_from) if resume_from else None
    origin = rundir.resume_origin(cfg.train.resume, resume_from)
    precision = deepspeed_wrap.resolve_precision(cfg.parallelism.precision, gpu=gpu)
    ds_config = build_ds_config(cfg, world=sequence_parallel.dp_world(), gpu=gpu, precision=precision)
    if resume_from and checkpoint.needs_universal(resume_from, world):
        resume_from = to_universal(resume_from, ds_config, world)
    engine, model = build_engine(cfg, tokenizer, ds_config, precision=precision, max_steps=prepared.max_steps)
    for line in advice.startup_advice(cfg, model.config, peft_was_chosen=peft_was_chosen, world=world,
                                      precision=precision, grad_accum_fp32=fp32_grad_accum(ds_config)):
        log(line)
    start_step = open_run_dir(cfg, run_dir, engine, resume_from, resume_step, ds_config, prepared.batches)
    startup.log_summary(
        model_name=cfg.model.name_or_path or f"{cfg.model.from_config['model_type']} from config (random init)",
        trainable=adapter.trainable_summary(model), mix=prepared.mix, global_batch_size=cfg.train.global_batch_size,
        epoch_len=prepared.batches.epoch_len, max_steps=prepared.max_steps, world=world,
        zero_stage=cfg.parallelism.zero_stage, precision=precision, packing=cfg.data.packing,
        grad_accum=grad_accum_steps(cfg.train, sequence_parallel.dp_world()), max_length=cfg.train.max_length,
        run_dir=str(run_dir), sequence_parallel=sequence_parallel.size())
    parts = loop_parts(cfg, engine, model, tokenizer, prepared, run_dir, resume_from, settings,
                       start_step=start_step, precision=precision, started=started, origin=origin)
    result = train(cfg, parts, start_step=start_step, max_steps=prepared.max_steps)
    finish(cfg, parts, result, tokenizer, max_steps=prepared.max_steps)
    return run_dir


def start_processes(cfg: SFTConfig) -> tuple[int, bool]:
    """Join the process group and check the config against it; return the world size and whether a GPU is here."""
    build_locks.clear_stale_build_locks(cfg.parallelism.build_lock_stale_s)  # before DeepSpeed builds any op
    distributed.init_distributed(timeout_s=cfg.parallelism.collective_timeout_s)
    distributed.start_heartbeat()  # so that the ranks left can tell a silent rank from a slow one
    # From here a stop signal is kept, not fatal: during start-up (a long tokenisation, a 70B load) it is
    # acted on before the first step (no step runs; requeued or exit 75), later after the current step.
    stopping.install_stop_handlers()
    gpu, world = distributed.has_gpu(), distributed.world_size()
    sp = startup.check_sequence_parallel(cfg, world)  # (before any work: the model's heads, attention, world)
    validate(cfg, dp_world=world // sp, has_gpu=gpu)
    sequence_parallel.setup(sp, rank=distributed.rank(), world=world)
    return world, gpu


def choose_run_dir(cfg: SFTConfig) -> tuple[Path, Optional[Path]]:
    """The run directory (one for all ranks), cleared of crashed saves, and the checkpoint to resume from."""
    run_dir = Path(distributed.broadcast_from_main(str(Path(cfg.output_dir).absolute())))
    rundir.check_writable(run_dir)
    for path in rundir.clean_partial_saves(run_dir):
        log(f"removed {path}, left by a save that crashed")
    # Rank 0 decides and every rank follows: on a shared filesystem with attribute caching, nodes can see
    # another `latest` for a moment.
    decision = distributed.agreed(
        lambda: rundir.resolve_resume(run_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite))
    return run_dir, decision


def already_at_stop(t, resume_from: Path) -> bool:
    """The checkpoint is at or past ``train.stop_at_step``: nothing to run (said why)."""
    resume_step = checkpoint.checkpoint_step(resume_from)
    if t.stop_at_step is None or resume_step < t.stop_at_step:
        return False
    log(f"{resume_from} is at step {resume_step}, already at train.stop_at_step={t.stop_at_step}: nothing "
        f"to run (raise it, or use train.stop_after_steps / stop_after_minutes to stop relative to this run)")
    return True


def build_data(cfg: SFTConfig, tokenizer, resume_from: Optional[Path], settings: dict) -> RunData:
    """The data stage (rank 0 of each node first, so the cache is built once), checked against the
    checkpoint's run before and after its work, and the mixed sample schedule."""
    t = cfg.train
    if resume_from:
        startup.check_same_run(resume_from, settings, allow=t.resume_allow_changes)  # before the data's work
    dirs = distributed.local_main_first(
        lambda: data_build.prepare_all(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed))
    data = data_build.build_datasets(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed, dirs=dirs)
    kept = resume_check.data_summary({s.name: s.stats for s in data.sources})
    if resume_from:
        startup.check_same_run(resume_from, kept, allow=t.resume_allow_changes)
    batches, mix = data_batches.build_batches(
        data, cfg.data, tokenizer, seed=t.seed, global_batch_size=t.global_batch_size, max_length=t.max_length,
        micro_batch_size=t.micro_batch_size, dp_rank=sequence_parallel.dp_rank(), dp_world=sequence_parallel.dp_world(),
        preview=is_main())
    startup.log_data_report(data, mix)
    max_steps = t.max_steps if t.max_steps > 0 else batches.steps_for_epochs(t.epochs)  # (a stream sets max_steps)
    probe = forgetting.build_probe(cfg.data, pretrained=bool(cfg.model.name_or_path), tokenizer=tokenizer,
                                   synced=cfg.parallelism.zero_stage == 3 and distributed.world_size() > 1)
    return RunData(data, batches, kept, mix, max_steps, probe)


def fp32_grad_accum(ds_config: dict) -> bool:
    return ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32"


def build_ds_config(cfg: SFTConfig, *, world: int, gpu: bool, precision: str) -> dict:
    """DeepSpeed's config for this run; a warning when bf16 would sum micro-batch gradients in bf16."""
    t = cfg.train
    ds_config = deepspeed_wrap.build_ds_config(cfg.parallelism, t, dp_world=world, precision=precision, gpu=gpu)
    if precision == "bf16" and not fp32_grad_accum(ds_config) and grad_accum_steps(t, world) > 1:
        log(f"warning: {grad_accum_steps(t, world)} micro-batch gradients are summed in bf16 (ZeRO-0, or "
            f"parallelism.grad_accum_dtype=bf16), which drops their low-order bits; ZeRO 1-3 sum in fp32")
    return ds_config


def to_universal(resume_from: Path, ds_config: dict, world: int) -> Path:
    """ZeRO 1-3 shard optimizer state by rank: another world size loads DeepSpeed's universal format,
    converted once for the whole job (on shared storage every node sees the same directory)."""
    written_by = checkpoint.saved_world_size(resume_from)
    universal = distributed.main_only(lambda: checkpoint.universal_checkpoint(resume_from))
    ds_config["checkpoint"] = {"load_universal": True}
    log(f"checkpoint written by {written_by} rank(s), resuming on {world}: converted to {universal}")
    return universal


def build_engine(cfg: SFTConfig, tokenizer, ds_config: dict, *, precision: str, max_steps: int):
    """The model (with its adapter) inside a DeepSpeed engine with AdamW and the lr schedule."""
    t = cfg.train
    # Pretrained weights load straight into ZeRO-3 partitions. A random-init model (model.from_config) is
    # built whole and partitioned by deepspeed.initialize, since zero.Init draws other initial weights and
    # the model would then depend on the ZeRO stage.
    zero3_ctx = deepspeed_wrap.zero3_init_context(ds_config) if cfg.model.name_or_path else None  # noqa: F841
    model = models.build_model(cfg.model, tokenizer, precision=precision, seed=t.seed,
                               activation_checkpointing=cfg.parallelism.activation_checkpointing,
                               offload_checkpoints=cfg.parallelism.activation_checkpointing_offload,
                               quantize_4bit=cfg.peft.method == "qlora")
    attention.use_for(model, cfg.model.attn_implementation, t.max_length)
    startup.check_attention(model, cfg.parallelism.sequence_parallel_size)
    if line := kernels.apply(model, t.kernels):
        log(line)
    model = adapter.apply_peft(model, cfg.peft)
    if tiling.wanted(cfg.parallelism.tiled_mlp, -(-t.max_length // cfg.parallelism.sequence_parallel_size)):
        log(f"tiled MLP (parallelism.tiled_mlp={cfg.parallelism.tiled_mlp}): {tiling.tile_mlps(model)} layers")
    if t.compile:
        log(compiled.compile_blocks(model))
    warmup = optim.warmup_steps(t, max_steps)
    engine = deepspeed_wrap.wrap_with_deepspeed(
        model, optim.param_groups(model, t.weight_decay), ds_config,
        lambda s: optim.lr_multiplier(s, max_steps=max_steps, warmup=warmup, schedule=t.schedule,
                                      min_lr_ratio=t.min_lr_ratio), mpu=sequence_parallel.mpu())
    return engine, model


def open_run_dir(cfg: SFTConfig, run_dir: Path, engine, resume_from: Optional[Path], resume_step: Optional[int],
                 ds_config: dict, batches) -> int:
    """Write config.yaml and ds_config.json and load the checkpoint (and a stream's positions into
    ``batches``); return the step training starts at.

    Only now, with the model loaded and its adapter applied, is the run sure to start: a failure before
    this point leaves an existing output_dir as it was."""
    cfg.output_dir = str(run_dir)
    rundir.prepare_run_dir(run_dir, overwrite=cfg.train.overwrite, resume_step=resume_step,
                           config_yaml=OmegaConf.to_yaml(cfg), ds_config=ds_config)
    if resume_step is not None and (aside := rundir.retire_newer_checkpoints(run_dir, resume_step)):
        log(f"resuming from step {resume_step}: moved this run's later checkpoints aside to {aside} "
            f"(no longer resumed or counted by keep_last; delete them when not needed)")
    if not resume_from:
        return 0
    start_step = checkpoint.load_checkpoint(engine, resume_from)
    batches.load_state_dict(checkpoint.load_data_state(resume_from))  # a stream's positions (a schedule: None)
    log(f"resumed from {resume_from} after step {start_step}")
    return start_step


def loop_parts(cfg: SFTConfig, engine, model, tokenizer, prepared: RunData, run_dir: Path,
               resume_from: Optional[Path], settings: dict, *, start_step: int, precision: str,
               started: float, origin: Optional[str]) -> LoopParts:
    """The loss head, meters, eval plan, checkpointing and stop rules the loop works with."""
    t, data, world = cfg.train, prepared.data, distributed.world_size()
    head = startup.choose_head(engine, prepared.batches, mode=t.lm_head, chunk_tokens=t.loss_chunk_tokens,
                               step=start_step) if start_step < prepared.max_steps else LossHead(t.lm_head)
    # (eval passes report plain cross-entropy; a fused head computes the same per-token losses)
    fused = head.mode == "supervised" and kernels.fused_head_available(adapter.base_model(model), t.kernels)
    head = dataclasses.replace(head, loss=t.loss, normalization=t.loss_normalization, neftune_alpha=t.neftune_alpha,
                               fused=fused)
    if t.kernels == "liger":
        log(f"train.kernels=liger: LM head {'fused' if head.fused else 'plain'} ({head.mode})")
    meter, peak_note = step_metrics.StepMeter.build(model, precision=precision, peak_override=cfg.logging.peak_flops,
                                                    head_everywhere=head.mode == "full")
    log(peak_note)
    saved = checkpoint.saved_state(resume_from) if resume_from else {}
    tracker = evaluation.EvalTracker.from_state(t.early_stopping, saved.get("eval"))
    if not (prompts := samples.sample_prompts(data, tokenizer, cfg.logging)) and cfg.logging.samples:
        log("warning: logging.samples is set but no source has an eval split: no sample generations "
            "(give a source eval_fraction or eval_path, or set logging.sample_prompts)")
    evals = evaluation.EvalPlan(t.eval_every, t.eval_at_start, tracker, data.has_eval(), t.micro_batch_size,
                                tokenizer.pad_token_id, prompts, tokenizer, cfg.logging.sample_max_new_tokens,
                                synced=cfg.parallelism.zero_stage == 3 and world > 1, probe=prepared.probe,
                                lora=cfg.peft.method != "none")
    if prepared.probe is not None:
        prepared.probe.load_state(tracker.probe_base)
    metrics = metrics_log.MetricsLogger(run_dir, cfg.logging, cfg.run_name or run_dir.name,
                                        OmegaConf.to_container(OmegaConf.structured(cfg)),
                                        saved.get("wandb_id") if own_checkpoint(run_dir, resume_from) else None)
    return LoopParts(
        engine=engine, data=data, batches=prepared.batches, pad_id=tokenizer.pad_token_id, head=head,
        metrics=metrics, meter=meter,
        progress=progress.Progress(start_step=start_step, max_steps=prepared.max_steps,
                                   log_every=cfg.logging.log_every, mode=cfg.logging.progress),
        evals=evals, saving=Saving(run_dir, t.save_every, t.keep_last, {**settings, **prepared.kept},
                                   best=tracker.enabled and t.early_stopping.save == "best",
                                   resumed_from=origin, wandb_id=metrics.wandb_id,
                                   data_state=prepared.batches.state_dict),
        stop=stopping.StopRule.from_config(t, started),
        guard=nonfinite.NonFiniteGuard(t.on_nonfinite, t.max_consecutive_nonfinite),
        watch=hangs.StackWatch(run_dir, distributed.rank(), timeout_s=cfg.parallelism.collective_timeout_s))


def own_checkpoint(run_dir: Path, resume_from: Optional[Path]) -> bool:
    """The run resumes from a checkpoint of its own directory (not a warm start from another run's)."""
    return resume_from is not None and run_dir.resolve() in resume_from.resolve().parents


def train(cfg: SFTConfig, parts: LoopParts, *, start_step: int, max_steps: int) -> LoopResult:
    """The loop (none of it after a stop signal during start-up); a lost peer is named, and the progress bar
    closes either way."""
    if start_step < max_steps and (signal := agreed_stop_signal()):
        log(f"{signal} received during start-up: stopping before step {start_step + 1}")
        parts.progress.close()
        return LoopResult(0, start_step, math.nan, math.nan, 0, 0.0, stop_signal=signal)
    try:
        result = train_loop(parts, start_step=start_step, max_steps=max_steps)
    except RuntimeError as e:
        if distributed.report_lost_peer(e, timeout_s=cfg.parallelism.collective_timeout_s):
            print(f"sftdist rank {distributed.rank()}: its stack: {parts.watch.dump_now()}", file=sys.stderr,
                  flush=True)
        parts.metrics.close()
        raise
    except BaseException:
        parts.metrics.close()  # the next point of a local sweep starts its own files and W&B run
        raise
    finally:
        parts.progress.close()
        parts.watch.close()
    # tokens/s of the steps themselves: eval passes and checkpoint saves are in seconds, not in the rate (#20)
    log(f"ran {result.steps} steps in {result.seconds:.1f}s ({result.step_seconds:.1f}s of them optimizer steps), "
        f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}, "
        f"{result.tokens / max(result.step_seconds, 1e-9):,.0f} tokens/s")
    return result


def finish(cfg: SFTConfig, parts: LoopParts, result: LoopResult, tokenizer, *, max_steps: int) -> None:
    """A finished run exports ``final/`` (the best eval step's weights with early stopping's save=best, and
    the merged model with peft.merge_on_save); a stopped one says how it resumes, and requeues after SIGUSR1."""
    run_dir, engine = parts.saving.run_dir, parts.engine
    log(f"run directory: {run_dir}")
    if result.last_step == max_steps and not result.early_stopped and (signal := agreed_stop_signal()):
        # The signal came during the last step's eval: checkpoint the last step, requeue (or exit 75), and
        # the same command then writes final/ without training (#23).
        if result.steps:  # (none: this process resumed from the last step's checkpoint, so it is there)
            log(f"{signal} received after the last step: checkpoint saved: "
                f"{parts.saving.save(engine, max_steps, parts.evals.tracker)}")
        result = dataclasses.replace(result, stop_signal=signal)
        stopped(result, max_steps, reason="final/ is written when the same command runs again")
    elif result.last_step == max_steps or result.early_stopped:
        if parts.saving.best:
            restore_best(engine, run_dir, parts.evals.tracker, last_step=result.last_step)
        log(f"final model:   {checkpoint.save_final(engine, tokenizer, run_dir)}")
        if cfg.peft.method != "none" and cfg.peft.merge_on_save:  # rank 0 merges; the others wait long
            log(f"merged model:  {distributed.main_only(lambda: export.merge_adapter(run_dir))}")
    else:
        stopped(result, max_steps, reason="the same command resumes from the checkpoint")
    parts.metrics.close()


def stopped(result: LoopResult, max_steps: int, *, reason: str) -> None:
    """Say where the run stopped; after a stop signal, requeue the SLURM job (SIGUSR1) or record exit 75."""
    log(f"stopped after step {result.last_step} of {max_steps}; {reason}")
    if result.stop_signal:  # every rank stopped after the same step, so every rank gets here
        requeue = stopping.requeue_after(result.stop_signal) if is_main() else None
        requeued, note = distributed.broadcast_from_main(requeue)
        if note:
            log(note)
        log(f"exit status {stopping.record_stop(requeued=requeued)}: "
            + ("requeued" if requeued else f"stopped by {result.stop_signal}, resumable (stopping.py)"))


def restore_best(engine, run_dir: Path, tracker: evaluation.EvalTracker, *, last_step: int) -> None:
    """Load the best eval step's checkpoint into the engine for ``final/`` (early stopping, save=best); keep
    the last step's weights, and say so, when that is the best or its checkpoint cannot load here."""
    metric, best = tracker.early.metric, tracker.best_step
    path = run_dir / "checkpoints" / f"step-{best}"
    if best is None or best == last_step:
        log(f"final/ holds the last step {last_step}" + (f", the best {metric} ({tracker.best_value:.4f})"
                                                          if best is not None else " (no eval improved)"))
    elif not (path / "trainer_state.json").exists() or checkpoint.needs_universal(path, distributed.world_size()):
        log(f"warning: final/ holds the last step {last_step}, not the best {metric} step {best}: its "
            f"checkpoint {path} is missing or was written on another number of ranks")
    else:
        checkpoint.load_checkpoint(engine, path)
        log(f"final/ holds step {best}, the best {metric} ({tracker.best_value:.4f}); training went on to "
            f"step {last_step}")


FAILED_POINTS: list[str] = []  # the local sweep points that failed in this process, in order


@hydra.main(version_base=None, config_path="pkg://sftdist.conf", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    try:
        sweep.place_sweep_point(raw)  # a multirun point gets its own output_dir, W&B group and run name
        task = list(HydraConfig.get().overrides.task)
        if note := overrides.prefer_named_model(raw, task):
            log(note)
        if recipes := overrides.recipes_chosen(task):
            log(f"recipe: {', '.join(recipes)} (conf/recipe/; command-line keys override it)")
        cfg: SFTConfig = OmegaConf.to_object(raw)  # the DictConfig stops here: typed dataclasses from now on
        run(cfg, peft_was_chosen=overrides.peft_chosen(task))
    except (ConfigError, DataError, checkpoint.CheckpointError, nonfinite.NonFiniteError) as e:
        # A user mistake or a full disk, not a crash: one clear line (from rank 0; every rank fails alike).
        if not (sweep.in_multirun() and "SUBMITIT_FOLDER" not in os.environ):
            sys.exit(f"sftdist: error: {e}" if is_main() else 2)
        # A point of a local sweep (one process runs them all): a diverged point is an expected outcome, so
        # the sweep goes on; main() exits non-zero at its end, naming the failed points.
        print(f"sftdist: error: {e}", file=sys.stderr, flush=True)
        FAILED_POINTS.append(f"{HydraConfig.get().job.num} ({e})")
    several = distributed.world_size() > 1
    if stopping.was_requeued() and stopping.in_submitit_job():
        # No result for submitit: the requeued job writes it (a return here would end the sweep point).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if several or not sweep.in_multirun():
        # (The points of a local sweep run one after another in this process and share its one-process
        # group: DeepSpeed keeps references to it that a new group would not satisfy.)
        distributed.shutdown()
    if several and "SUBMITIT_FOLDER" not in os.environ:  # a submitit task still has its result to write
        # Every file is written and closed. Skip interpreter teardown, where a gloo thread of a group DeepSpeed
        # still references occasionally aborts the process ("terminate called without an active exception")
        # and fails a finished job. Errors never get here: they raise above (tests/dist/test_dead_rank.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stopping.exit_code())
    if stopping.exit_code():  # stopping.RESUMABLE_EXIT: stopped by a signal, with a checkpoint
        sys.exit(stopping.exit_code())


def main() -> None:
    """Console entry point. Drops ``--local_rank=N``, which the ``deepspeed`` launcher appends (the same
    value is in the LOCAL_RANK variable) and which Hydra would reject as an override."""
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    FAILED_POINTS.clear()
    try:
        overrides.check_override_keys(sys.argv[1:])  # Hydra's own message for an unknown key suggests nothing useful
    except ConfigError as e:
        sys.exit(f"sftdist: error: {e}" if is_main() else 2)
    _hydra_main()
    if FAILED_POINTS:
        sys.exit(f"sftdist: {len(FAILED_POINTS)} sweep point(s) failed: " + "; ".join(FAILED_POINTS))


if __name__ == "__main__":
    main()
