"""Compiled decoder blocks (``train.compile``, sftdist/engine/compiled.py) against eager, on CPU.

    python bench/compile_blocks.py                                # micro + small; rewrites its RESULTS.md section
    python bench/compile_blocks.py --presets micro --repeats 1 --no-results   # ~3 min

One forward + backward per step (no optimizer) of a seeded random-init Llama preset of ``train_vs_trl.py``
(vocabulary 32,000), fp32, ``torch.set_num_threads(2)``, through ``sftdist.engine.forward.supervised_losses``
with attention by document (``attention.use_for``), as sftdist trains. The batches are packed micro-batches
as ``collate_packed`` makes them: ``--batches`` of ``--rows`` rows, each batch its own width T in
``--widths`` (the widest row; the others up to 64 tokens shorter, padded), each row 2-6 documents whose
first ~10% of tokens are unsupervised. The batches are gone through ``--passes`` times.

Each case (eager / compiled, activation checkpointing off / on) runs in a fresh subprocess with an empty
inductor cache, so its first step pays the whole compile (a later run with a warm cache pays less). Steady =
the median step after the first. graphs = what dynamo compiled in the first step; recompiles = graphs it
compiled after it (0 = no batch width, row count or document layout made it compile again). Cases are
interleaved per repeat; the table shows medians over repeats.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from train_vs_trl import model_config
from zero_memory import machine, write_results

BEGIN, END = "<!-- compile_blocks:begin -->", "<!-- compile_blocks:end -->"
CASES = {"eager": (False, False), "compiled": (True, False),
         "eager, checkpointing": (False, True), "compiled, checkpointing": (True, True)}
VOCAB = 32000


def packed_batches(count: int, rows: int, widths: tuple[int, int], seed: int) -> list[dict]:
    """``count`` collate_packed micro-batches of random documents, each of its own width."""
    from sftdist.data.collate import collate_packed
    from sftdist.data.tokenize import IGNORE_INDEX

    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        width = rng.randint(*widths)
        packed = []
        for row in range(rows):
            length = width if row == 0 else rng.randint(max(8, width - 64), width)
            cuts = sorted(rng.sample(range(4, length - 4), rng.randint(1, 5)))
            docs = []
            for start, end in zip([0, *cuts], [*cuts, length]):
                ids = [rng.randrange(1, VOCAB) for _ in range(end - start)]
                prompt = max(1, len(ids) // 10)
                docs.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
            packed.append(docs)
        batches.append(collate_packed(packed, 0))
    return batches


def worker(args) -> None:
    """One case: time every step and count what dynamo compiled; prints one JSON line."""
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftdist.engine import attention
    from sftdist.engine.compiled import compile_blocks
    from sftdist.engine.forward import supervised_losses

    compiled, checkpointing = CASES[args.worker_case]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config(args.worker_preset, VOCAB)),
                                             attn_implementation="sdpa", dtype=torch.float32)
    attention.use_for(model, "sdpa", max(args.widths))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    note = compile_blocks(model) if compiled else "eager"
    batches = packed_batches(args.batches, args.rows, tuple(args.widths), args.seed)
    times, graphs, losses = [], [], []
    for batch in batches * args.passes:
        start = time.perf_counter()
        loss = supervised_losses(model, batch)[0].sum()
        loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    tokens = [int((b["targets"] != -100).sum()) for b in batches] * args.passes
    print(json.dumps({"times": times, "graphs": graphs, "losses": losses, "supervised": tokens, "note": note}))


def run_case(preset: str, case: str, args) -> dict:
    with tempfile.TemporaryDirectory() as cache:  # an empty inductor cache: the first step compiles everything
        argv = [sys.executable, __file__, "--worker-preset", preset, "--worker-case", case, "--rows", str(args.rows),
                "--batches", str(args.batches), "--passes", str(args.passes), "--seed", str(args.seed),
                "--widths", *map(str, args.widths)]
        done = subprocess.run(argv, check=False, capture_output=True, text=True,
                              env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "2"})
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    steady = result["times"][1:]
    return {"first": result["times"][0], "steady": statistics.median(steady),
            "tok_s": sum(result["supervised"][1:]) / sum(steady), "graphs": result["graphs"][0],
            "recompiles": result["graphs"][-1] - result["graphs"][0], "loss": result["losses"][0],
            "note": result["note"]}


def table(runs: dict[tuple[str, str], list[dict]]) -> str:
    lines = [("| preset | case | first step s | steady step s | speedup | supervised tok/s | graphs | recompiles "
              "| step-1 loss vs eager |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    medians = {}
    for (preset, case), results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            lines.append(f"| {preset} | {case} | failed: {results[-1]['error'][:120]} |||||||")
            continue
        m = {k: statistics.median(r[k] for r in ok) for k in ("first", "steady", "tok_s", "graphs", "recompiles")}
        m["loss"] = ok[0]["loss"]
        medians[preset, case] = m
        baseline = medians.get((preset, case.replace("compiled", "eager")), m)
        lines.append(f"| {preset} | {case} | {m['first']:.2f} | {m['steady']:.3f} | "
                     f"{baseline['steady'] / m['steady']:.2f}x | {m['tok_s']:,.0f} | {m['graphs']:.0f} | "
                     f"{m['recompiles']:.0f} | {abs(m['loss'] - baseline['loss']) / baseline['loss']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["micro", "small"], choices=["micro", "small"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rows", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--widths", type=int, nargs=2, default=[400, 512], help="range of the batches' widths T")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-results", action="store_true", help="print the table only; leave RESULTS.md alone")
    ap.add_argument("--worker-preset", help=argparse.SUPPRESS)
    ap.add_argument("--worker-case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_case:
        worker(args)
        return
    about, load, start = machine(), os.getloadavg()[0], time.perf_counter()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runs: dict[tuple[str, str], list[dict]] = {}
    for preset in args.presets:
        for repeat in range(args.repeats):
            for case in args.cases:
                result = run_case(preset, case, args)
                print(f"{preset} / {case} / repeat {repeat + 1}: {result}", file=sys.stderr)
                runs.setdefault((preset, case), []).append(result)
    command = " ".join(["python bench/compile_blocks.py", *sys.argv[1:]])
    section = (f"## Compiled decoder blocks vs eager, CPU (bench/compile_blocks.py)\n\nRun {when}: `{command}` "
               f"(total wall time {time.perf_counter() - start:.0f} s; load average {load:.2f} at the start, "
               f"{os.getloadavg()[0]:.2f} at the end).\n\n{about}\n"
               f"- Work: forward + backward (no optimizer) through `supervised_losses`, attention by document, "
               f"fp32, 2 threads; {args.batches} packed micro-batches of {args.rows} rows, widths "
               f"{args.widths[0]}..{args.widths[1]}, 2-6 documents per row, {args.passes} passes; medians of "
               f"{args.repeats} interleaved repeats. Every case starts with an empty inductor cache.\n"
               f"- speedup = the eager case's steady step / this case's; graphs = compiled in step 1; "
               f"recompiles = graphs compiled after step 1.\n\n{table(runs)}\n")
    print(section)
    if args.no_results:
        return
    write_results(section, begin=BEGIN, end=END)
    print("updated the compile_blocks section at the end of bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
