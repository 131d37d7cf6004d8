"""The training entry point (``python -m sftdist.train`` / ``sftdist-train``) and the one training loop.

``main()`` is the only place that sees Hydra's ``DictConfig``; it converts it to the typed ``SFTConfig``
and hands typed groups to the builders. ``train_loop()`` is shared by full fine-tuning and LoRA.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sftdist.checkpoint import check_run_dir, prepare_run_dir, save_final
from sftdist.config import ConfigError, SFTConfig, grad_accum_steps, register_configs, validate
from sftdist.data import DataError, TrainData, build_datasets
from sftdist.data.collate import collate
from sftdist.data.loader import SampleSchedule
from sftdist.logging import MetricsLogger, log
from sftdist.loss import backward_scale, token_loss_sum
from sftdist.model import build_model, load_tokenizer
from sftdist.optim import lr_multiplier, param_groups, warmup_steps
from sftdist.parallel import (all_reduce_sum, broadcast_from_main, build_ds_config, device, has_gpu,
                              init_distributed, is_main, rank, resolve_precision, world_size, wrap_with_deepspeed,
                              zero3_init_context)
from sftdist.peft import apply_peft, trainable_summary

register_configs()


@dataclass
class LoopResult:
    steps: int
    first_loss: float
    last_loss: float
    tokens: int
    seconds: float


def train_loop(engine, data: TrainData, schedule: SampleSchedule, *, max_steps: int, micro_batch_size: int,
               pad_id: int, metrics: MetricsLogger, log_every: int) -> LoopResult:
    """Run ``max_steps`` optimizer steps.

    Each step: fetch this rank's micro-batches, count the supervised tokens of the whole step over all
    ranks (one all-reduce), then forward / token-summed loss / backward per micro-batch, scaled so the
    gradient is that of the mean over every supervised token in the step.
    """
    rank_, world = rank(), world_size()
    grad_accum = engine.gradient_accumulation_steps()
    dev = device()
    losses: list[float] = []
    total_tokens, start = 0, time.time()
    for step in range(max_steps):
        step_start = time.time()
        # 1. This step's micro-batches, and the step's global supervised-token count (needed before backward).
        micro_batches = [collate([data.get(s, i) for s, i in mb], pad_id)
                         for mb in schedule.micro_batches(step, rank_, world, micro_batch_size)]
        local_supervised = sum(int((b["targets"] != -100).sum()) for b in micro_batches)
        local_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        global_supervised, global_tokens = all_reduce_sum([local_supervised, local_tokens])
        scale = backward_scale(int(global_supervised), grad_accum, world)
        lr = engine.get_lr()[0]  # the rate this step's update uses; the scheduler advances inside step()

        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for batch in micro_batches:
            batch = {k: v.to(dev) for k, v in batch.items()}
            # 2. forward; 3. token-summed loss
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            micro_loss_sum, _ = token_loss_sum(logits, batch["targets"])
            # 4. backward, scaled to a per-supervised-token mean over the whole step
            engine.backward(micro_loss_sum * scale)
            # 5. DeepSpeed counts micro-steps inside step() and updates only at the accumulation boundary.
            engine.step()
            loss_sum += micro_loss_sum.detach().double()

        # 6. log: the step's loss is its summed token loss over all ranks divided by its supervised tokens.
        (global_loss_sum,) = all_reduce_sum([loss_sum.item()])
        loss = global_loss_sum / max(global_supervised, 1)
        grad_norm = engine.get_global_grad_norm()
        total_tokens += int(global_tokens)
        losses.append(loss)
        elapsed = time.time() - start
        metrics.write({
            "step": step + 1, "loss": loss, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens": int(global_tokens), "supervised_tokens": int(global_supervised),
            "tokens_per_sec": global_tokens / max(time.time() - step_start, 1e-9), "elapsed_s": elapsed,
        })
        if (step + 1) % log_every == 0 or step + 1 == max_steps:
            log(f"step {step + 1}/{max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"grad_norm {float(grad_norm or 0):.3f}  tok/s {total_tokens / elapsed:,.0f}")
        # 7. stop checks: the run length is max_steps (derived from train.epochs when max_steps=-1).
    return LoopResult(max_steps, losses[0], losses[-1], total_tokens, time.time() - start)


def run(cfg: SFTConfig) -> Path:
    """Build every component from the typed config, train, export ``final/``; return the run directory."""
    init_distributed()
    gpu, world = has_gpu(), world_size()
    validate(cfg, dp_world=world, has_gpu=gpu)
    run_dir = Path(broadcast_from_main(str(Path(cfg.output_dir).absolute())))  # one directory for all ranks
    check_run_dir(run_dir, overwrite=cfg.train.overwrite)

    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer, max_length=cfg.train.max_length)
    for s in data.stats:
        log(f"data {s['source']}: {s['records']} records, {s['tokens']:,} tokens, "
            f"{s['supervised_tokens']:,} supervised, {s['truncated']} truncated, "
            f"{s['dropped_no_target']} dropped")
    schedule = SampleSchedule([len(e) for e in data.examples], data.weights, cfg.train.seed,
                              cfg.train.global_batch_size)
    max_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else schedule.steps_for_epochs(cfg.train.epochs)

    precision = resolve_precision(cfg.parallelism.precision, gpu=gpu)
    ds_config = build_ds_config(cfg.parallelism, cfg.train, dp_world=world, precision=precision, gpu=gpu)
    cfg.output_dir = str(run_dir)
    prepare_run_dir(run_dir, overwrite=cfg.train.overwrite, config_yaml=OmegaConf.to_yaml(cfg),
                    ds_config=ds_config)

    zero3_ctx = zero3_init_context(ds_config)  # noqa: F841  (must outlive model construction)
    model = build_model(cfg.model, tokenizer, precision=precision,
                        activation_checkpointing=cfg.parallelism.activation_checkpointing, seed=cfg.train.seed)
    model = apply_peft(model, cfg.peft)
    warmup = warmup_steps(cfg.train, max_steps)
    engine = wrap_with_deepspeed(
        model, param_groups(model, cfg.train.weight_decay), ds_config,
        lambda s: lr_multiplier(s, max_steps=max_steps, warmup=warmup, schedule=cfg.train.schedule,
                                min_lr_ratio=cfg.train.min_lr_ratio))
    log(f"{world} process(es), ZeRO-{cfg.parallelism.zero_stage}, {precision}, "
        f"grad accumulation {grad_accum_steps(cfg.train, world)}, {max_steps} steps; {trainable_summary(model)}")

    metrics = MetricsLogger(run_dir, cfg.logging, cfg.run_name or run_dir.name,
                            OmegaConf.to_container(OmegaConf.structured(cfg)))
    result = train_loop(engine, data, schedule, max_steps=max_steps, micro_batch_size=cfg.train.micro_batch_size,
                        pad_id=tokenizer.pad_token_id, metrics=metrics, log_every=cfg.logging.log_every)
    final = save_final(engine, tokenizer, run_dir)
    metrics.close()
    log(f"done: {result.steps} steps in {result.seconds:.1f}s, loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}, {result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s")
    log(f"run directory: {run_dir}")
    log(f"final model:   {final}")
    return run_dir


@hydra.main(version_base=None, config_path="pkg://sftdist.conf", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    try:
        cfg: SFTConfig = OmegaConf.to_object(raw)  # the DictConfig stops here: typed dataclasses from now on
        run(cfg)
    except (ConfigError, DataError) as e:
        # A user mistake, not a crash: one clear line (from rank 0; every rank fails the same way).
        sys.exit(f"sftdist: error: {e}" if is_main() else 2)


def main() -> None:
    """Console entry point. Drops ``--local_rank=N``, which the ``deepspeed`` launcher appends (the same
    value is in the LOCAL_RANK variable) and which Hydra would reject as an override."""
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    _hydra_main()


if __name__ == "__main__":
    main()
