"""``sftdist-plan [options] [overrides]``: per-rank memory, data size and run time of a config, before
training it, without loading any weights (the arithmetic is in ``sftdist.engine.memory_plan``)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from sftdist.config import ConfigError, SFTConfig, compose_config
from sftdist.config.checks import one_line
from sftdist.engine.activation_memory import (
    activation_bytes,
    exchange_bytes,
    local_length,
    logits_bytes,
    retained_bytes,
)
from sftdist.engine.memory_plan import (
    GIB,
    ModelShape,
    Setup,
    bucket_bytes,
    deepspeed_model_states,
    hf_config,
    largest_fitting,
    model_shape,
    model_states,
    runtime_bytes,
)

SEARCH_LIMIT = 4096  # micro-batch sizes tried
LENGTH_LIMIT = 2**24  # max_length tried in the sequence-parallel table
SP_SIZES = (1, 2, 4, 8)  # the sequence-parallel table's rows: up to one 8-GPU node
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "sftdist_sdpa_by_document")


def memory_rows(shape: ModelShape, setup: Setup, cfg: SFTConfig, micro_batch: int,
                max_length: int | None = None) -> dict[str, tuple[float, float]]:
    """Every per-rank line of the table at ``micro_batch``, as ``(device, cpu)`` bytes, with the total last
    (its activations those of ``parallelism.activation_checkpointing``). ``setup.device`` decides the device
    terms: on CPU the buckets' written pages only, the freed memory glibc keeps and the process's runtime;
    on a GPU whole buckets and the CUDA context. Under ``setup.sequence_parallel`` a rank's activations and
    logits are those of its share of each row, plus the all-to-all buffers.

    Args:
        shape, setup: The model and how it is trained.
        cfg: The run config (train lengths, attention, tiled MLP, ZeRO buckets).
        micro_batch: Sequences per micro-batch (the search varies it).
        max_length: Tokens per row instead of ``train.max_length`` (the length search varies it).

    Returns:
        Row name -> ``(device bytes, cpu bytes)``.
    """
    from sftdist.engine import tiling

    t, p, sp = cfg.train, cfg.parallelism, setup.sequence_parallel
    seq = max_length or t.max_length
    labels = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer states"}
    rows = {labels[k]: v for k, v in model_states(shape, setup).items()}
    rows["model states"] = tuple(map(sum, zip(*rows.values())))
    # sequence parallelism runs sdpa, whatever model.attn_implementation says (training refuses anything else)
    kw = {"micro_batch": micro_batch, "seq": seq, "precision": setup.precision, "device": setup.device,
          "fused_attention": sp > 1 or cfg.model.attn_implementation in FUSED_ATTENTION,
          "frozen_base": setup.peft != "none", "sp": sp,
          "tiled_mlp": tiling.wanted(p.tiled_mlp, local_length(seq, sp))}
    rows["activations"] = (activation_bytes(shape, checkpointing=False, **kw), 0.0)
    rows["activations, checkpointed"] = (activation_bytes(shape, checkpointing=True, **kw), 0.0)
    rows["logits + loss"] = (logits_bytes(shape, micro_batch=micro_batch, seq=local_length(seq, sp),
                                          precision=setup.precision, lm_head=t.lm_head,
                                          chunk_tokens=t.loss_chunk_tokens,
                                          partitioned_head=setup.zero_stage == 3), 0.0)
    if sp > 1:
        rows["all-to-all buffers"] = (exchange_bytes(shape, micro_batch=micro_batch, seq=seq,
                                                     precision=setup.precision, sp=sp), 0.0)
    # bf16 ZeRO-1 with fp32 accumulation runs DeepSpeed's BF16_Optimizer, which has no reduction bucket
    bf16_optimizer = (p.zero_stage == 1 and setup.precision == "bf16" and setup.grad_accum_fp32
                      and not setup.offload_optimizer)
    rows["comm. buckets"] = (0.0 if bf16_optimizer else bucket_bytes(
        zero_stage=p.zero_stage, precision=setup.precision, reduce_bucket=p.reduce_bucket_size,
        overlap_comm=p.overlap_comm, contiguous_gradients=p.contiguous_gradients,
        trainable=shape.trainable, device=setup.device), 0.0)
    act = rows["activations, checkpointed" if p.activation_checkpointing else "activations"]
    rows["freed, still resident"] = (retained_bytes(act[0], setup.device), 0.0)
    rows["runtime"] = (runtime_bytes(setup.device), 0.0)
    parts = [rows["model states"], act, rows["logits + loss"], rows.get("all-to-all buffers", (0.0, 0.0)),
             rows["comm. buckets"], rows["freed, still resident"], rows["runtime"]]
    rows["total"] = tuple(map(sum, zip(*parts)))
    return rows


def sequence_parallel_table(shape: ModelShape, setup: Setup, cfg: SFTConfig, *, budget_gib: float | None,
                            problems: dict[int, str | None]) -> list[dict]:
    """What each of ``SP_SIZES`` would give this config, per rank: activations (as
    ``parallelism.activation_checkpointing`` has them), logits, all-to-all buffers and the total at the
    config's micro-batch and max_length, and the longest max_length that fits ``budget_gib`` at micro-batch 1.

    Each size is planned on ``setup.world`` ranks where it divides them, else on the next multiple of it (an
    8-GPU node for SP 8 when the plan is for fewer): ZeRO shards the model states over all of them.

    Args:
        shape, setup, cfg: As for ``memory_rows`` (``setup.sequence_parallel`` is replaced).
        budget_gib: GiB per device, or None (no length search).
        problems: Size -> why this model cannot train with it (``sequence_parallel.model_problem``), or None.

    Returns:
        One dict per size, JSON-ready; ``longest_max_length`` only with a budget.
    """
    t = cfg.train
    used = "activations, checkpointed" if cfg.parallelism.activation_checkpointing else "activations"
    table = []
    for sp in SP_SIZES:
        ranks = setup.world if setup.world % sp == 0 else -(-setup.world // sp) * sp
        at = replace(setup, sequence_parallel=sp, world=ranks)
        rows = memory_rows(shape, at, cfg, t.micro_batch_size)
        row = {"sequence_parallel": sp, "ranks": ranks, "tokens_per_rank": local_length(t.max_length, sp),
               "activations": rows[used][0], "logits": rows["logits + loss"][0],
               "all_to_all": rows.get("all-to-all buffers", (0.0,))[0], "total": rows["total"][0],
               "problem": problems.get(sp)}
        if budget_gib:
            row["longest_max_length"] = largest_fitting(
                lambda n, at=at: memory_rows(shape, at, cfg, 1, max_length=n)["total"][0] <= budget_gib * GIB,
                limit=LENGTH_LIMIT)
        table.append(row)
    return table


def data_summary(cfg: SFTConfig) -> dict:
    """Tokens and optimizer steps per epoch, and the run's steps, from the data stage (may tokenise).

    Args:
        cfg: The run config; the data stage runs as ``sftdist-prepare`` runs it, reusing its cache.

    Returns:
        Counts per epoch and for the run (``train.max_steps``, or ``train.epochs`` of the schedule).
    """
    from sftdist.data.build import build_for_run, mix_report
    from sftdist.engine.model import load_tokenizer

    from sftdist.data.streaming import bounded_streams

    bounded_streams(cfg.data)  # (a stream's per-epoch counts are those of its first records' mix)
    data, schedule, _ = build_for_run(cfg, load_tokenizer(cfg.model))
    report = mix_report(data, schedule)
    t = cfg.train
    steps_per_epoch = schedule.epoch_len / t.global_batch_size
    run_steps = t.max_steps if t.max_steps > 0 else schedule.steps_for_epochs(t.epochs)
    tokens = sum(r["tokens_per_epoch"] for r in report)
    return {"tokens_per_epoch": tokens,
            "supervised_tokens_per_epoch": sum(r["supervised_tokens_per_epoch"] for r in report),
            "sequences_per_epoch": schedule.epoch_len, "steps_per_epoch": steps_per_epoch,
            "run_steps": run_steps, "run_tokens": round(tokens * run_steps / steps_per_epoch)}


def measured_tokens_per_sec(path: Path) -> float:
    """The median ``tokens_per_sec`` (else ``tokens / step_time_s``) of a run's metrics.jsonl step rows.

    Args:
        path: A run's ``metrics.jsonl``.

    Returns:
        All ranks' tokens per second, the median over the step rows.

    Raises:
        ConfigError: no such file, a line that is not JSON, or no step rows.
    """
    if not path.is_file():
        raise ConfigError(f"--metrics {path}: no such file (give a run's metrics.jsonl)")
    rates = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--metrics {path}: line {number} is not JSON ({e})") from None
        if row.get("tokens_per_sec"):
            rates.append(float(row["tokens_per_sec"]))
        elif row.get("tokens") and row.get("step_time_s"):
            rates.append(row["tokens"] / row["step_time_s"])
    if not rates:
        raise ConfigError(f"--metrics {path}: no step rows with tokens_per_sec or tokens and step_time_s")
    return statistics.median(rates)


def _size(b: float) -> str:
    return "-" if not b else f"{b / GIB:,.2f} GiB" if b >= GIB else f"{b / 2**20:,.1f} MiB"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def render_sequence_parallel(plan: dict) -> list[str]:
    """The lines of the sequence-parallel table (``build_plan``'s ``sequence_parallel_table``)."""
    table, configured = plan["sequence_parallel_table"], plan["setup"]["sequence_parallel"]
    lines = [(f"sequence parallelism, per rank at micro-batch {plan['micro_batch']} x {plan['max_length']} "
              f"tokens (* = this config's parallelism.sequence_parallel_size); longest max_length at micro-batch 1:"),
             (f"{'SP':<5}{'ranks':>6}{'tokens/rank':>13}{'activations':>13}{'logits + loss':>15}"
              f"{'all-to-all':>12}{'total':>12}{'longest max_length':>20}")]
    for r in table:
        name = f"{r['sequence_parallel']}{' *' if r['sequence_parallel'] == configured else ''}"
        head = f"{name:<5}{r['ranks']:>6}{r['tokens_per_rank']:>13,}"
        if r["problem"]:
            lines.append(f"{head}   not for this model: {r['problem']}")
            continue
        longest = r.get("longest_max_length")
        shown = "-" if longest is None else f"{longest:,}{'+' if longest == LENGTH_LIMIT else ''}"
        lines.append(f"{head}{_size(r['activations']):>13}{_size(r['logits']):>15}{_size(r['all_to_all']):>12}"
                     f"{_size(r['total']):>12}{shown:>20}")
    notes = []
    if any(r["ranks"] != plan["setup"]["world"] for r in table):
        notes.append(f"ranks: the planned {plan['setup']['world']} where SP divides them, else the next multiple "
                     f"of SP")
    if plan["model"]["attention"] != "sdpa" and any(r["sequence_parallel"] > 1 and not r["problem"] for r in table):
        notes.append("SP > 1 runs sdpa attention: set model.attn_implementation=sdpa")
    if not plan.get("gpu_mem_gib"):
        notes.append("longest max_length: give --gpu-mem GiB (or run where the GPU is visible)")
    return lines + [f"({'; '.join(notes)})"] if notes else lines


def render(plan: dict) -> str:
    """The console table of a plan (``build_plan``'s dict)."""
    s, m = plan["setup"], plan["model"]
    sp = s["sequence_parallel"]
    groups = f" ({s['world'] // sp} data-parallel x {sp} sequence-parallel)" if sp > 1 else ""
    share = f" ({-(-plan['max_length'] // sp):,} per rank)" if sp > 1 else ""
    lines = [(f"model: {m['source']} ({m['params'] / 1e6:,.2f}M parameters, {m['trainable'] / 1e6:,.3f}M "
              f"trainable, {s['peft']}); ZeRO-{s['zero_stage']} x {s['world']} ranks{groups} on {s['device']}, "
              f"{s['precision']}, micro-batch {plan['micro_batch']} x {plan['max_length']} tokens{share}, "
              f"attention {m['attention']}"),
             f"{'per rank':<28}{'device':>12}{'cpu':>12}{'DeepSpeed est. device':>24}{'cpu':>12}"]
    ds = plan["deepspeed_model_states"]
    for name, (dev, cpu) in plan["rows"].items():
        extra = f"{_size(ds[0]):>24}{_size(ds[1]):>12}" if name == "model states" and ds else ""
        mark = " *" if name == plan["activations_used"] else ""
        lines.append(f"{name + mark:<28}{_size(dev):>12}{_size(cpu):>12}{extra}")
    lines.append(f"(* counted in the total: parallelism.activation_checkpointing={plan['checkpointing']})")
    if ds:
        lines.append("(DeepSpeed's estimator assumes 16-bit mixed precision, estimates ZeRO-1 as ZeRO-2 and "
                     "leaves out ZeRO-3's 16-bit parameter partition; its cpu figure is for the whole node, "
                     "with a 1.5 buffer factor: see sftdist/engine/memory_plan.py)")
    budget = plan["gpu_mem_gib"]
    if budget:
        most, usable = plan["largest_micro_batch"], plan["largest_usable_micro_batch"]
        lines.append(f"fits {budget:g} GiB per device: {'yes' if plan['fits'] else 'NO'}; largest "
                     f"micro-batch that fits: {most}{'+ (the search limit)' if most == SEARCH_LIMIT else ''}"
                     + (f"; that divides global_batch_size / {'data-parallel groups' if sp > 1 else 'ranks'}: "
                        f"{usable}" if usable != most else ""))
    lines += render_sequence_parallel(plan)
    d = plan.get("data")
    if d:
        lines.append(f"data: {d['tokens_per_epoch']:,} tokens ({d['supervised_tokens_per_epoch']:,} "
                     f"supervised) in {d['sequences_per_epoch']:,} sequences per epoch; "
                     f"{d['steps_per_epoch']:.1f} optimizer steps per epoch; "
                     f"this run: {d['run_steps']:,} steps, {d['run_tokens']:,} tokens")
    if plan.get("eta_s") is not None:
        lines.append(f"ETA at {plan['tokens_per_sec']:,.0f} tokens/s: {_duration(plan['eta_s'])} of training "
                     f"steps (eval and checkpoints not included)")
    elif plan.get("tokens_per_sec"):
        lines.append("no ETA: it needs the data stage's token count (drop --no-data)")
    return "\n".join(lines)


def build_plan(cfg: SFTConfig, args) -> dict:
    """Everything sftdist-plan prints, as a JSON-ready dict.

    Args:
        cfg: The composed run config.
        args: The parsed command-line options (``main``).

    Returns:
        The plan: setup, model counts, rows, DeepSpeed's estimate, fit and search, data and ETA.
    """
    import torch

    from sftdist.cluster.launch import default_nproc
    from sftdist.engine.deepspeed_wrap import grad_accum_dtype, resolve_precision
    from sftdist.engine.sequence_parallel import model_problem

    p, t = cfg.parallelism, cfg.train
    # read first: a bad metrics file should fail before the model and data stages run
    rate = args.tokens_per_sec or (measured_tokens_per_sec(Path(args.metrics)) if args.metrics else None)
    world = args.world_size or (cfg.launch.nproc_per_node or default_nproc()) * cfg.launch.nnodes
    sp = p.sequence_parallel_size
    if world % sp:
        raise ConfigError(f"parallelism.sequence_parallel_size={sp} must divide the {world} ranks this plan is for "
                          f"(--world-size, else the launch config's processes): each group of {sp} ranks splits "
                          f"a sequence, and data parallelism runs across the groups")
    gpu = torch.cuda.is_available()
    precision = resolve_precision(args.precision or p.precision, gpu=gpu)
    source_type = (cfg.model.from_config or {}).get("model_type")
    setup = Setup(zero_stage=p.zero_stage, world=world, precision=precision, peft=cfg.peft.method,
                  offload_optimizer=p.offload_optimizer, offload_params=p.offload_params,
                  grad_accum_fp32=grad_accum_dtype(p, precision) == "fp32",
                  device=args.device or ("gpu" if gpu or args.gpu_mem else "cpu"), sequence_parallel=sp)
    config = hf_config(cfg.model)
    shape = model_shape(config, cfg.peft)
    # the table's sizes run sdpa by document; the configured size must also fit the configured attention
    problems = {n: model_problem(config.get_text_config(), n, "sdpa", t.max_length) for n in SP_SIZES}
    problem = model_problem(config.get_text_config(), sp, cfg.model.attn_implementation, t.max_length)
    if problem:
        raise ConfigError(f"parallelism.sequence_parallel_size={sp} does not fit this model: {problem}")
    budget = args.gpu_mem or (torch.cuda.get_device_properties(0).total_memory / GIB if gpu else None)
    rows = memory_rows(shape, setup, cfg, t.micro_batch_size)
    plan = {"setup": vars(setup), "micro_batch": t.micro_batch_size, "max_length": t.max_length,
            "model": {"source": cfg.model.name_or_path or f"model.from_config ({source_type})",
                      "attention": cfg.model.attn_implementation, **vars(shape)},
            "rows": rows, "checkpointing": p.activation_checkpointing,
            "activations_used": "activations, checkpointed" if p.activation_checkpointing else "activations",
            "deepspeed_model_states": deepspeed_model_states(shape, setup) if setup.peft == "none" else None,
            "gpu_mem_gib": budget}
    if budget:
        plan["fits"] = rows["total"][0] <= budget * GIB
        most = largest_fitting(lambda mb: memory_rows(shape, setup, cfg, mb)["total"][0] <= budget * GIB,
                               limit=SEARCH_LIMIT)
        dp = world // sp
        per_group = t.global_batch_size // dp if t.global_batch_size % dp == 0 else 0
        # training also needs global_batch_size % (micro_batch_size * data-parallel groups) == 0
        plan["largest_micro_batch"] = most
        plan["largest_usable_micro_batch"] = max(
            [m for m in range(1, min(most, per_group) + 1) if per_group % m == 0], default=0)
    plan["sequence_parallel_table"] = sequence_parallel_table(shape, setup, cfg, budget_gib=budget,
                                                              problems=problems)
    if not args.no_data:
        plan["data"] = data_summary(cfg)
    if rate:
        plan["tokens_per_sec"] = rate
    if rate and plan.get("data"):
        plan["eta_s"] = plan["data"]["run_tokens"] / rate
    return plan


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sftdist.data.messages import DataError

    parser = argparse.ArgumentParser(prog="sftdist-plan", description=__doc__)
    parser.add_argument("--world-size", type=int,
                        help="ranks (processes) of the run, data-parallel groups times "
                             "parallelism.sequence_parallel_size (default: the launch config's processes)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="override parallelism.precision")
    parser.add_argument("--gpu-mem", type=float, help="GiB per device (default: the visible GPU's, if any)")
    parser.add_argument("--device", choices=("gpu", "cpu"),
                        help="what the run trains on (default: gpu where one is visible or --gpu-mem is given, "
                             "else cpu); cpu plans each rank's resident memory")
    parser.add_argument("--no-data", action="store_true", help="skip the data stage (tokens, steps, ETA)")
    parser.add_argument("--tokens-per-sec", type=float, help="measured training throughput, for the ETA")
    parser.add_argument("--metrics", help="a run's metrics.jsonl: its median tokens_per_sec, for the ETA")
    parser.add_argument("--json", help="also write the plan to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for training")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan = build_plan(compose_config(args.overrides), args)
    except (ConfigError, DataError, HydraException, OmegaConfBaseException, OSError) as e:
        sys.exit(f"sftdist-plan: error: {one_line(e)}")
    print(render(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=2) + "\n")
