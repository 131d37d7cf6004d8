"""sftdist-plan's per-rank memory against the peak resident memory of real CPU runs of a 135M-parameter model.

The shape is SmolLM2-135M-Instruct's (Llama: hidden 576, intermediate 1536, 30 layers, 9 heads / 3 KV heads,
tied embeddings), built with random weights through ``model.from_config``; the vocabulary is the GPT-2
tokenizer's (50,257, SmolLM2 has 49,152: +0.8% parameters), with a ChatML template. Three cases, fp32,
micro-batch 2 x 512 tokens (packed demo data, so every row is ~512 tokens), 3 optimizer steps:

- full fine-tuning, ZeRO-2, 1 process (gradient accumulation 2);
- LoRA r=16 on every linear layer, ZeRO-2, 1 process (gradient accumulation 2);
- full fine-tuning, ZeRO-3, 2 ranks (``torchrun --standalone --nproc_per_node 2``, gradient accumulation 1).

Each case runs ``sftdist.train.run`` (what ``python -m sftdist.train`` runs) in a worker (this file with
``--worker``) that adds probes:

- the RSS when the data stage starts (``runtime``: Python, torch, DeepSpeed, transformers, datasets, the
  process group and the tokenizer) and what the data stage adds;
- the peak RSS (``VmHWM``, the counter behind ``ru_maxrss``, reset through ``/proc/self/clear_refs``) of
  building the model, ``deepspeed.initialize``, the training loop (eval included) and the export;
- per micro-step, around the engine's forward, backward and step: the RSS before the forward and when
  backward starts, the bytes autograd saves for backward in the forward and loss (``saved_tensors_hooks``,
  each storage once, parameters excluded), and the peak RSS of forward + loss, backward and step.

The plan is ``sftdist.tools.plan.build_plan`` on the same overrides (``--device cpu``: the planner's CPU
terms). ``--before DIR`` also plans with another checkout's ``sftdist`` (e.g. ``git worktree``/``git archive``
of an earlier commit) for a before/after table.

Usage (repository root, project venv; ~6 min on 2 idle cores)::

    python bench/plan_rss.py                  # updates its section of bench/RESULTS.md
    python bench/plan_rss.py --no-results --cases lora
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zero_memory import _proc_status_kib, _reset_peak_rss, machine, write_results

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared"
BEGIN, END = "<!-- plan_rss:begin -->", "<!-- plan_rss:end -->"
GIB, MIB = 2**30, 2**20

SMOLLM2_SHAPE = ["model.from_config.hidden_size=576", "model.from_config.intermediate_size=1536",
                 "model.from_config.num_hidden_layers=30", "model.from_config.num_attention_heads=9",
                 "model.from_config.num_key_value_heads=3", "model.from_config.max_position_embeddings=8192",
                 f"model.tokenizer={SHARED / 'tokenizers' / 'gpt2'}",
                 f"model.chat_template={SHARED / 'chat_templates' / 'chatml.jinja'}"]
COMMON = ["train.max_length=512", "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=3",
          "train.warmup_steps=0", "train.lr=1e-4", "logging.log_every=1", "data.packing=true",
          "data.sources.0.max_samples=300", "data.sources.1.max_samples=60",
          "data.require_end_of_turn=false"]  # ChatML on GPT-2 has no end-of-turn token; memory is the point
CASES = {"full": (1, ["parallelism=zero2"]),
         "lora": (1, ["parallelism=zero2", "peft=lora", "peft.r=16", "peft.target_modules=[all-linear]"]),
         "zero3": (2, ["parallelism=zero3"])}
LABELS = {"full": "full, ZeRO-2, 1 process", "lora": "LoRA r=16, ZeRO-2, 1 process",
          "zero3": "full, ZeRO-3, 2 ranks"}
PHASES = {"build": ("sftdist.engine.model", "build_model"),
          "engine": ("sftdist.engine.deepspeed_wrap", "wrap_with_deepspeed"),
          "train": ("sftdist.train", "train_loop"), "export": ("sftdist.lifecycle.checkpoint", "save_final")}


# ----------------------------------------------------------------------------------------------- worker side

def _kib(field: str) -> int:
    return _proc_status_kib(field)


class Peaks:
    """Peak RSS per phase, kept across the resets of ``VmHWM`` that the per-micro-step probes make."""

    def __init__(self) -> None:
        self.phase, self.kib = "startup", {}

    def fold(self) -> int:
        """The peak since the last reset, also counted in the current phase's; returns it (KiB)."""
        hwm = _kib("VmHWM")
        self.kib[self.phase] = max(self.kib.get(self.phase, 0), hwm)
        return hwm

    def reset(self) -> None:
        self.fold()
        _reset_peak_rss()

    def enter(self, phase: str) -> None:
        self.reset()
        self.phase = phase


def probe_engine(engine, probe: dict, peaks: Peaks) -> None:
    """Wrap the engine's forward, backward and step (instance attributes) to record each micro-step."""
    import torch

    forward, backward, step = engine.forward, engine.backward, engine.step
    open_: dict = {}

    def close() -> None:
        if "hooks" in open_:
            open_.pop("hooks").__exit__(None, None, None)

    def probed_forward(*args, **kwargs):
        close()  # an eval or head-check forward has no backward
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        seen: dict[int, int] = {}

        def pack(t):
            base = t._base if t._base is not None else t
            if not isinstance(base, torch.nn.Parameter):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        open_.update(row={"rss_before_kib": _kib("VmRSS")}, seen=seen,
                     hooks=torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        peaks.reset()
        open_["hooks"].__enter__()
        return forward(*args, **kwargs)

    def probed_backward(loss, *args, **kwargs):
        close()
        row = open_.pop("row")
        row.update(saved_bytes=sum(open_.pop("seen").values()), rss_at_backward_kib=_kib("VmRSS"),
                   peak_forward_kib=peaks.fold())
        peaks.reset()
        out = backward(loss, *args, **kwargs)
        row.update(peak_backward_kib=peaks.fold(), rss_after_backward_kib=_kib("VmRSS"))
        probe["micro_steps"].append(row)
        peaks.reset()
        return out

    def probed_step(*args, **kwargs):
        out = step(*args, **kwargs)
        probe["micro_steps"][-1].update(peak_step_kib=peaks.fold(), rss_after_step_kib=_kib("VmRSS"))
        return out

    engine.forward, engine.backward, engine.step = probed_forward, probed_backward, probed_step


def worker(out: Path, overrides: list[str]) -> None:
    """Run ``sftdist.train.run`` with the probes; write this rank's numbers to ``out/rank<r>.json``."""
    import resource

    import torch.distributed as dist

    from sftdist import train
    from sftdist.config import compose_config
    from sftdist.engine.distributed import rank

    cfg = compose_config(overrides)
    peaks = Peaks()
    probe: dict = {"micro_steps": []}
    originals = {name: getattr(importlib.import_module(m), fn) for name, (m, fn) in PHASES.items()}
    build_data = train.build_data

    def probed_build_data(*args, **kwargs):
        probe.update(runtime_rss_kib=_kib("VmRSS"), runtime_peak_kib=_kib("VmHWM"))
        result = build_data(*args, **kwargs)
        probe["after_data_rss_kib"] = _kib("VmRSS")
        return result

    def phase(name: str, fn):
        def wrapped(*args, **kwargs):
            peaks.enter(name)
            try:
                result = fn(*args, **kwargs)
            finally:
                peaks.enter("other")
                probe[f"rss_after_{name}_kib"] = _kib("VmRSS")
            if name == "engine":
                probe_engine(result, probe, peaks)
            return result
        return wrapped

    train.build_data = probed_build_data
    for name, (module, fn) in PHASES.items():
        setattr(importlib.import_module(module), fn, phase(name, originals[name]))
    start = time.time()
    train.run(cfg)
    peaks.fold()
    probe.update(seconds=time.time() - start, peak_kib=peaks.kib,
                 ru_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    (out / f"rank{rank()}.json").write_text(json.dumps(probe))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- driver side

def overrides_for(case: str, tmp: Path) -> list[str]:
    return [*SMOLLM2_SHAPE, *COMMON, *CASES[case][1], f"data.cache_dir={tmp / 'data_cache'}"]


def plan_rows(case: str, tmp: Path, sftdist_root: Path | None = None) -> dict:
    """The planner's per-rank rows for a case, in a subprocess (``sftdist_root``: another checkout's)."""
    world = CASES[case][0]
    code = ("import json, sys; from types import SimpleNamespace; from sftdist.config import compose_config; "
            "from sftdist.tools.plan import build_plan; "
            "a = SimpleNamespace(tokens_per_sec=None, metrics=None, world_size=int(sys.argv[1]), "
            "precision=None, gpu_mem=None, no_data=True, device='cpu'); "
            "print(json.dumps(build_plan(compose_config(sys.argv[2:]), a)['rows']))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(sftdist_root or REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # run from that checkout: `python -c` puts its working directory first on sys.path
    proc = subprocess.run([sys.executable, "-c", code, str(world), *overrides_for(case, tmp)],
                          cwd=sftdist_root or REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_data(tmp: Path) -> None:
    """Fill the tokenised-data cache once, so that no measured run tokenises."""
    prepare = "from sftdist.tools.data_cli import prepare_main; prepare_main()"
    subprocess.run([sys.executable, "-c", prepare, *overrides_for("full", tmp)], cwd=REPO, check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def run_case(case: str, tmp: Path, env: dict[str, str]) -> list[dict]:
    """Train one case (``env``: extra variables); each rank's probe report."""
    world = CASES[case][0]
    out = tmp / case
    out.mkdir()
    args = [__file__, "--worker", str(out), "--", *overrides_for(case, tmp), f"output_dir={out / 'run'}"]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)] * (world > 1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)), **env}
    proc = subprocess.run([sys.executable, *launch, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        sys.exit(f"{case} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def summary(ranks: list[dict]) -> dict:
    """The larger rank's numbers, in bytes."""
    def one(r: dict) -> dict:
        steps = r["micro_steps"]
        peak_train = r["peak_kib"]["train"] * 1024
        return {"peak": max(r["ru_maxrss_kib"], *r["peak_kib"].values()) * 1024, "peak_train": peak_train,
                "runtime": r["runtime_rss_kib"] * 1024,
                "data": (r["after_data_rss_kib"] - r["runtime_rss_kib"]) * 1024,
                "after_engine": r["rss_after_engine_kib"] * 1024,
                "saved": max(s["saved_bytes"] for s in steps),
                "live_at_backward": max(s["rss_at_backward_kib"] - s["rss_before_kib"] for s in steps) * 1024,
                "peak_forward": max(s["peak_forward_kib"] for s in steps) * 1024,
                "peak_backward": max(s["peak_backward_kib"] for s in steps) * 1024,
                "peak_step": max(s.get("peak_step_kib", 0) for s in steps) * 1024,
                "seconds": r["seconds"]}
    return max((one(r) for r in ranks), key=lambda s: s["peak"])


def g(b: float) -> str:
    return f"{b / GIB:.2f}"


def tables(results: dict, plans: dict, before: dict) -> str:
    lines = [("| case | plan before GiB | plan GiB | measured peak RSS GiB (train loop / whole run) | "
              "plan error | before error |"), "|---|---:|---:|---:|---:|---:|"]
    for case, m in results.items():
        total = plans[case]["total"][0]
        old = before.get(case, {}).get("total", [float("nan")])[0]
        error, old_error = 100 * (total - m["peak"]) / m["peak"], 100 * (old - m["peak"]) / m["peak"]
        lines.append(f"| {LABELS[case]} | {g(old)} | **{g(total)}** | {g(m['peak_train'])} / {g(m['peak'])} | "
                     f"**{error:+.0f}%** | {old_error:+.0f}% |")
    names = list(dict.fromkeys(k for p in plans.values() for k in p if k != "total"))
    lines += ["", "| plan row (MiB) | " + " | ".join(LABELS[c] for c in results) + " |",
              "|---|" + "---:|" * len(results)]
    for name in names:
        cells = (f"{plans[c].get(name, [0])[0] / MIB:,.0f}" for c in results)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    measured = [("runtime RSS when the data stage starts", "runtime"), ("+ data stage", "data"),
                ("RSS after deepspeed.initialize", "after_engine"),
                ("saved for backward (forward + loss)", "saved"),
                ("RSS growth, forward start -> backward start", "live_at_backward"),
                ("peak RSS in forward + loss", "peak_forward"), ("peak RSS in backward", "peak_backward"),
                ("peak RSS in the optimizer step", "peak_step"), ("peak RSS, whole run", "peak")]
    lines += ["", "| measured (MiB, larger rank) | " + " | ".join(LABELS[c] for c in results) + " |",
              "|---|" + "---:|" * len(results)]
    for label, key in measured:
        lines.append(f"| {label} | " + " | ".join(f"{results[c][key] / MIB:,.0f}" for c in results) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--before", type=Path, help="another checkout's root: plan with its sftdist too")
    ap.add_argument("--malloc-mmap-threshold", type=int,
                    help="glibc's MALLOC_MMAP_THRESHOLD_ for the runs: a small one (131072) returns every "
                         "freed tensor to the OS at once, so the peak RSS is that of live memory (a diagnosis)")
    ap.add_argument("--save", type=Path, help="also write the ranks' probe reports to this JSON file")
    ap.add_argument("--measured", type=Path, help="a --save file: plan against it instead of training again")
    ap.add_argument("--no-results", action="store_true", help="print the tables only; leave RESULTS.md alone")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.worker:
        worker(args.worker, [o for o in overrides if o != "--"])
        return
    started, t0, load = dt.datetime.now(dt.timezone.utc), time.time(), os.getloadavg()
    raw = json.loads(args.measured.read_text()) if args.measured else {}
    plans, before = {}, {}
    malloc = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else {}
    with tempfile.TemporaryDirectory(prefix="plan_rss-") as tmp:
        if not args.measured:
            prepare_data(Path(tmp))
        for case in args.cases:
            plans[case] = plan_rows(case, Path(tmp))
            if args.before:
                before[case] = plan_rows(case, Path(tmp), args.before)
            if case not in raw:
                raw[case] = run_case(case, Path(tmp), malloc)
                print(f"{case}: {max(r['seconds'] for r in raw[case]):.0f} s", file=sys.stderr)
                if args.save:
                    args.save.write_text(json.dumps(raw))
    results = {case: summary(raw[case]) for case in args.cases}
    text = tables(results, plans, before)
    print(text)
    if args.no_results:
        return
    flags = " ".join(sys.argv[1:])
    write_results(f"""## sftdist-plan against peak RSS, 135M Llama shape (bench/plan_rss.py)

Run {started:%Y-%m-%d %H:%M} UTC, wall time {time.time() - t0:.0f} s (load average {load[0]:.2f} at start,
{os.getloadavg()[0]:.2f} at end: the machine is shared, which slows the runs but does not change their memory):

    python bench/plan_rss.py {flags}

{machine()}
- SmolLM2-135M's shape with random weights (`model.from_config`: hidden 576, intermediate 1536, 30 layers,
  9 / 3 heads, tied embeddings; the GPT-2 tokenizer's 50,257-token vocabulary, ChatML template), fp32,
  packed demo data, micro-batch 2 x 512 tokens, global batch 4, 3 optimizer steps, then eval and `final/`.
- plan: `sftdist plan --device cpu --no-data` on the same overrides, per-rank total; "before": the same
  with the `--before` checkout's `sftdist`.
  measured: the larger rank's peak resident set (`VmHWM`), in the training loop and over the whole run; the
  errors are against the whole run.

{text}
""", begin=BEGIN, end=END)
    print("updated bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
