"""Per-rank memory of a 2-rank CPU training run under ZeRO-0, ZeRO-2 and ZeRO-3.

For each model and stage, the script launches ``python -m torch.distributed.run --standalone
--nproc_per_node 2`` on a worker (this file with ``--worker``) that runs ``sftdist.train.run`` in-process,
i.e. what ``python -m sftdist.train <overrides>`` runs, with probes around the phases that ``run`` calls by
name (``build_model``, ``wrap_with_deepspeed``, ``train_loop``, ``save_final``, swapped in the modules
``run`` looks them up in):

- at the start of each phase it resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and at its
  end reads it (``VmHWM``), giving each rank's peak resident memory per phase;
- at every call of the torch optimizer that DeepSpeed steps in the last step (when master weights, optimizer
  states and this rank's gradients all exist), it adds up the bytes of the tensors this rank holds, each
  address counted once (views of one flat buffer are not double counted): parameters, optimizer state (fp32
  master copies and Adam moments), gradients (every other live floating-point tensor), and DeepSpeed's
  communication buckets apart.

The data cache is filled once before the measured runs (``sftdist-prepare``), so no measured run tokenises.

Usage (from the repository root, in the project venv)::

    python bench/zero_memory.py                 # ~1.5 min on 2 cores; appends/updates its RESULTS.md section
    python bench/zero_memory.py --no-results    # print the table only
    python bench/zero_memory.py --models tiny --stages 0 3 --steps 2 --no-results   # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
BEGIN, END = "<!-- zero_memory:begin -->", "<!-- zero_memory:end -->"
HEADING = "## ZeRO per-rank memory (bench/zero_memory.py)"
MIB = 2**20

# The tests' FAST data slice and batch; the step count comes from --steps.
COMMON = ["train.micro_batch_size=2", "train.global_batch_size=8", "train.max_length=96",
          "train.warmup_steps=0", "logging.log_every=1", "data.sources.0.max_samples=64",
          "data.sources.1.max_samples=16"]
MODELS = {
    "tiny": [],  # conf/model/tiny.yaml: hidden 128, 4 layers, vocabulary 1024
    "llama-h512-l8": ["model.from_config.hidden_size=512", "model.from_config.intermediate_size=1408",
                      "model.from_config.num_hidden_layers=8", "model.from_config.num_attention_heads=8",
                      "model.from_config.num_key_value_heads=4"],
}
# Phase name -> (module, function) that sftdist.train.run calls for it, looked up in that module's namespace.
PHASE_FUNCTIONS = {"build": ("sftdist.engine.model", "build_model"),
                   "engine": ("sftdist.engine.deepspeed_wrap", "wrap_with_deepspeed"),
                   "train": ("sftdist.train", "train_loop"), "export": ("sftdist.lifecycle.checkpoint", "save_final")}
STATE = ("params", "grads", "optimizer")


# ----------------------------------------------------------------------------------------------- worker side

def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM (and so ru_maxrss) to the current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _ranges(tensors) -> list[tuple[int, int]]:
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
            for t in tensors if t is not None and t.numel() > 0]


def _union_bytes(ranges: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for lo, hi in sorted(ranges):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def model_state_bytes(engine, optimizer, bucket_numels: set[int]) -> dict[str, int]:
    """Bytes of this rank's parameters, optimizer state and gradients (each address counted once).

    ``optimizer`` is the torch optimizer that DeepSpeed steps; under ZeRO-1/2/3 its parameters are this
    rank's fp32 master partitions, and its ``state`` is keyed by them. ZeRO keeps gradient partitions in
    flat buffers that no ``.grad`` points to, so gradients are all other live floating-point tensors (the
    backward pass is over: no activations are left), except the module's buffers and DeepSpeed's
    communication buckets (tensors of exactly a configured bucket size), which are returned apart.
    """
    import gc

    import torch

    live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    module_params = list(engine.module.parameters())
    params = _ranges([p.data for p in module_params] + [getattr(p, "ds_tensor", None) for p in module_params])
    opt_params = [p for g in optimizer.param_groups for p in g["params"]] + list(optimizer.state.keys())
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    optim = _ranges(opt_params + moments)
    buffers = _ranges(list(engine.module.buffers()))
    buckets = _ranges([t for t in live if t.numel() in bucket_numels])
    grads = _ranges([p.grad for p in module_params + opt_params]
                    + [t for t in live if t.is_floating_point() and t.numel() not in bucket_numels])
    p, po = _union_bytes(params), _union_bytes(params + optim)
    pob = _union_bytes(params + optim + buffers + buckets)
    grads_bytes = _union_bytes(params + optim + buffers + buckets + grads) - pob
    return {"params": p, "optimizer": po - p, "grads": grads_bytes, "buckets": _union_bytes(buckets)}


def worker(out: Path, overrides: list[str]) -> None:
    """Run ``sftdist.train.run`` with probes around its phases; write this rank's numbers to ``out``."""
    import resource

    import torch.distributed as dist

    import sftdist.train as train
    from sftdist.config import compose_config
    from sftdist.engine.distributed import rank

    cfg = compose_config(overrides)
    last_step = cfg.train.max_steps - 1
    probe: dict = {"censuses": [], "peak_kib": {"other": 0}, "peak_reset": True}
    import importlib

    originals = {name: getattr(importlib.import_module(m), fn) for name, (m, fn) in PHASE_FUNCTIONS.items()}

    def start_phase() -> None:
        # Whatever ran since the last phase ended (PEFT, param groups, logger setup) is folded into "other".
        probe["peak_kib"]["other"] = max(probe["peak_kib"]["other"], _proc_status_kib("VmHWM"))
        probe["peak_reset"] &= _reset_peak_rss()

    def timed(name: str, fn):
        def wrapped(*args, **kwargs):
            start_phase()
            try:
                return fn(*args, **kwargs)
            finally:
                probe["peak_kib"][name] = _proc_status_kib("VmHWM")
        return wrapped

    def build_model(*args, **kwargs):
        probe["rss_before_model_kib"] = _proc_status_kib("VmRSS")
        probe["peak_kib"]["data"] = _proc_status_kib("VmHWM")  # start-up and the data stage
        _reset_peak_rss()
        model = timed("build", originals["build"])(*args, **kwargs)
        probe["params_full"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        return model

    def wrap_with_deepspeed(model, param_groups, ds_config, lr_lambda):
        engine = timed("engine", originals["engine"])(model, param_groups, ds_config, lr_lambda)
        optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
        probe["optimizer"] = f"{type(engine.optimizer).__name__} / {type(optimizer).__name__}"
        zero = ds_config["zero_optimization"]
        buckets = {int(zero[k]) for k in ("reduce_bucket_size", "allgather_bucket_size",
                                          "stage3_prefetch_bucket_size") if k in zero}

        def census(opt, _args, _kwargs):
            if engine.global_steps == last_step:  # optimizer states exist from the first step on
                probe["censuses"].append(model_state_bytes(engine, opt, buckets))

        optimizer.register_step_pre_hook(census)
        return engine

    probed = {"build": build_model, "engine": wrap_with_deepspeed,
              "train": timed("train", originals["train"]), "export": timed("export", originals["export"])}
    for name, (module, fn) in PHASE_FUNCTIONS.items():
        setattr(importlib.import_module(module), fn, probed[name])
    start = time.time()
    train.run(cfg)
    start_phase()
    censuses = probe.pop("censuses")
    probe.update(
        seconds=time.time() - start,
        # The largest of the optimizer's calls in the last step (ZeRO steps it once per parameter group).
        model_state=max(censuses, key=lambda c: sum(c[k] for k in STATE)),
        ru_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    (out / f"rank{rank()}.json").write_text(json.dumps(probe))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- driver side

def prepare_data(tmp: Path) -> None:
    """Fill the tokenised-data cache once, so that no measured run tokenises."""
    prepare = "from sftdist.tools.data_cli import prepare_main; prepare_main()"  # the sftdist-prepare entry point
    subprocess.run([sys.executable, "-c", prepare, *COMMON, f"data.cache_dir={tmp / 'data_cache'}"],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def run_case(model: str, stage: int, *, steps: int, tmp: Path) -> list[dict]:
    """Train ``model`` under ZeRO-``stage`` on 2 ranks; the two ranks' probe reports."""
    out = tmp / f"{model}-zero{stage}"
    out.mkdir()
    overrides = [*COMMON, *MODELS[model], f"train.max_steps={steps}", f"parallelism=zero{stage}",
                 f"data.cache_dir={tmp / 'data_cache'}", f"output_dir={out / 'run'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", str(out), "--", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for attempt in range(2):
        shutil.rmtree(out / "run", ignore_errors=True)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            break
        # A rank has been seen to abort at interpreter exit ("terminate called without an active
        # exception") after everything was written; one retry keeps such a run out of the table.
        print(f"{model} zero{stage} failed ({proc.returncode}), attempt {attempt + 1}:\n"
              f"{proc.stderr[-3000:]}", file=sys.stderr)
    else:
        sys.exit(f"{model} zero{stage} failed twice")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    last_row = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for r in ranks:
        r["final_loss"] = last_row["loss"]
    return ranks


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:,.1f}"


def peak_bytes(r: dict) -> int:
    return max(r["ru_maxrss_kib"], *r["peak_kib"].values()) * 1024


def table(rows: list[tuple[str, int, list[dict]]]) -> str:
    lines = ["| model | params | ZeRO | params MiB | grads MiB | optimizer MiB | params+grads+optimizer MiB "
             "| comm. buckets MiB | RSS before model MiB | peak RSS MiB: build | engine init | train + eval "
             "| export | whole run | final loss | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, stage, ranks in rows:
        def per_rank(fn):  # one value where both ranks agree, else "rank 0 / rank 1"
            values = [fn(r) for r in ranks]
            return values[0] if len(set(values)) == 1 else " / ".join(values)

        def state(*keys):
            return per_rank(lambda r: mib(sum(r["model_state"][k] for k in keys)))

        def peak(name):
            return per_rank(lambda r: mib(r["peak_kib"][name] * 1024) if r["peak_reset"] else "n/a")

        lines.append(
            f"| {model} | {ranks[0]['params_full']:,} | {stage} | {state('params')} | {state('grads')} "
            f"| {state('optimizer')} | **{state(*STATE)}** | {state('buckets')} "
            f"| {per_rank(lambda r: mib(r['rss_before_model_kib'] * 1024))} | {peak('build')} "
            f"| {peak('engine')} | {peak('train')} | {peak('export')} "
            f"| **{per_rank(lambda r: mib(peak_bytes(r)))}** "
            f"| {ranks[0]['final_loss']:.4f} | {max(r['seconds'] for r in ranks):.0f} |")
    return "\n".join(lines)


def reading(rows: list[tuple[str, int, list[dict]]]) -> str:
    """One line per model and ZeRO stage: the change against ZeRO-0 in model state and in peak RSS."""
    def state(ranks):
        return max(sum(r["model_state"][k] for k in STATE) for r in ranks)

    def peak(ranks):
        return max(peak_bytes(r) for r in ranks)

    base = {model: ranks for model, stage, ranks in rows if stage == 0}
    lines = []
    for model, stage, ranks in rows:
        if stage and model in base:
            ds, dp = state(ranks) - state(base[model]), peak(ranks) - peak(base[model])
            lines.append(f"- {model}, ZeRO-{stage} vs ZeRO-0 (larger rank of each): params+grads+optimizer "
                         f"{ds / state(base[model]):+.0%} ({mib(ds)} MiB), whole-run peak RSS "
                         f"{dp / peak(base[model]):+.0%} ({mib(dp)} MiB).")
    return "\n".join(lines)


def machine() -> str:
    import deepspeed
    import torch
    import transformers

    def first(path: str, key: str) -> str:
        return next(line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                    if line.startswith(key))

    mem = int(first("/proc/meminfo", "MemTotal").split()[0]) / 2**20
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "sftdist", "conf"], capture_output=True,
                           text=True).stdout.strip()
    cpu = first("/proc/cpuinfo", "model name")
    return (f"- Machine: {os.cpu_count()} CPUs (`nproc`), {cpu}, {mem:.1f} GiB "
            f"RAM, {platform.platform()}; no GPU (DeepSpeed's CPU accelerator, gloo).\n"
            f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, deepspeed "
            f"{deepspeed.__version__}, transformers {transformers.__version__}; sftdist at {commit}"
            f"{' with uncommitted changes in sftdist/ or conf/' if dirty else ''}.")


def write_results(section: str, *, begin: str = BEGIN, end: str = END) -> None:
    """Append a script's section to RESULTS.md, or replace it where an earlier run left one (``begin``/``end``:
    its markers; this script's by default, ``plan_rss.py`` passes its own).

    Other scripts write their own sections of the same file: it is read right before writing, and only the
    text between the script's markers changes."""
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if begin in text and end in text:
        RESULTS.write_text(re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", lambda _: block, text,
                                  flags=re.S))
    else:
        with RESULTS.open("a") as f:
            f.write(("\n" if text and not text.endswith("\n\n") else "") + block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 2, 3], choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    ap.add_argument("--no-results", action="store_true", help="print the table only; leave RESULTS.md alone")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.worker:
        worker(args.worker, [o for o in overrides if o != "--"])
        return

    started, t0, load_start = dt.datetime.now(dt.timezone.utc), time.time(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="zero_memory-") as tmp:
        prepare_data(Path(tmp))
        for model in args.models:
            for stage in args.stages:
                ranks = run_case(model, stage, steps=args.steps, tmp=Path(tmp))
                rows.append((model, stage, ranks))
                print(f"{model} zero{stage}: {ranks[0]['optimizer']}, {ranks[0]['seconds']:.0f}s",
                      file=sys.stderr)
    result = table(rows)
    print(result)
    print(reading(rows))
    if args.no_results:
        return
    optimizer = rows[0][2][0]["optimizer"].split(" / ")[-1]
    section = f"""{HEADING}

Run {started:%Y-%m-%d %H:%M} UTC: `python bench/zero_memory.py` (total wall time {time.time() - t0:.0f} s;
load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end).

{machine()}
- Each row is one `torchrun --standalone --nproc_per_node 2` run of `sftdist.train.run` (what
  `python -m sftdist.train` runs, here in a worker that adds the probes): fp32, DeepSpeed's AdamW
  (`{optimizer}`), {args.steps} optimizer steps of global batch 8 (micro-batch 2, gradient accumulation 2,
  at most 96 tokens), then eval and the export of `final/`. `tiny` = `conf/model/tiny.yaml`; `llama-h512-l8` =
  the same with `model.from_config` hidden 512, intermediate 1408, 8 layers, 8 heads / 4 KV heads (vocabulary
  1024, the demo tokenizer's).
- params / grads / optimizer: bytes of the tensors the rank holds, measured at the torch optimizer's step in
  the last step (the largest of its calls: ZeRO steps it once per parameter group), each address counted once.
  params: the module's parameters (ZeRO-3: its partitions, plus any parameter it keeps gathered); optimizer:
  the fp32 master copies (ZeRO-1/2/3 keep one of the rank's partition even in an fp32 run) and Adam's two
  moments; grads: every other live floating-point tensor then (gradient partitions, and the flattened fp32
  copy that DeepSpeed makes of the group being stepped). comm. buckets: tensors of exactly a configured
  bucket size (`reduce_bucket_size` etc., 2e8 elements), allocated but, on CPU, resident only where written.
- Both models are built from a config. At the measured commit sftdist builds such a model whole on every
  rank and `deepspeed.initialize` partitions it (only `from_pretrained` loads straight into ZeRO-3
  partitions), so the build phase is the same for every stage.
- peak RSS: the rank's peak resident set (`VmHWM`, the counter behind `ru_maxrss`), reset through
  `/proc/self/clear_refs` at the start of each phase: building the model, `deepspeed.initialize`, the training
  loop with eval, the export of `final/`. RSS before model = after start-up and the data stage (Python, torch,
  DeepSpeed, transformers, datasets). One value where both ranks agree, else `rank 0 / rank 1`.

{result}

{reading(rows)}
"""
    write_results(section)
    print(f"updated {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
