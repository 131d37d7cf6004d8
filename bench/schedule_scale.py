#!/usr/bin/env python
"""Time the sample schedule at scale: what every rank computes before its first step.

For each sample count, a child process builds a synthetic two-source mix (only the ``num_tokens`` and
``num_supervised`` columns the schedule reads), written with ``save_to_disk`` and read back with
``load_from_disk`` as ``build_datasets`` does, so the columns are memory-mapped in 1,000-row chunks like a
real cache entry. It then times:

* ``build_schedule``: ``build_schedule(data, DataConfig(packing=True), ...)``, i.e. the mixed and packed
  first epoch;
* ``mix_report``: ``mix_report(data, schedule)`` over that epoch;
* ``resume``: what a run resumed in epoch ``--resume-epoch`` does: a fresh ``build_schedule`` and
  ``global_batch(step)`` for a step in that epoch, which packs every earlier epoch to learn its length.

Each sample count gets ``--budget`` seconds; phases still running then are reported as ``> N s``. The order
hash (of epoch 0 and of the resumed step's batch) shows whether two versions of sftdist give the same sample
order. Run from the repository root with the project venv::

    .venv/bin/python bench/schedule_scale.py                       # updates bench/RESULTS.md
    .venv/bin/python bench/schedule_scale.py --no-results          # print the table only
    # time another checkout's sftdist (its sftdist/ first on the path):
    cd /tmp/other && PYTHONPATH=$PWD /work/main/.venv/bin/python /work/main/bench/schedule_scale.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
BEGIN, END = "<!-- schedule_scale:begin -->", "<!-- schedule_scale:end -->"
PHASES = ("build_schedule", "mix_report", "resume")
SHARES = {"chat": 0.7, "text": 0.3}  # of the samples; weights 1:1, so the smaller source is repeated


def synthetic_data(root: Path, samples: int, max_length: int):
    """Two sources whose length columns look like chat and pretraining-style text, as ``TrainData``."""
    import datasets
    import numpy as np
    import pyarrow as pa

    from sftdist.data.build import SourceData, TrainData

    rng = np.random.default_rng(0)
    sources = []
    for name, share in SHARES.items():
        n = round(samples * share)
        if name == "chat":
            tokens = np.clip(rng.lognormal(np.log(300), 0.8, n).astype(np.int64), 8, max_length)
            supervised = np.maximum(1, (tokens * rng.uniform(0.2, 0.8, n)).astype(np.int64))
        else:
            tokens = rng.integers(64, max_length + 1, n)
            supervised = tokens
        datasets.Dataset(pa.table({"num_tokens": tokens, "num_supervised": supervised})).save_to_disk(
            str(root / name))
        stats = {"records": n, "kept": n, "statuses": {"ok": n}, "supervised_tokens": int(supervised.sum())}
        train = datasets.load_from_disk(str(root / name))
        sources.append(SourceData(name, 1.0, "messages", train, None, stats))
    return TrainData(sources)


def order_hash(sequences) -> str:
    return hashlib.sha256(repr(sequences).encode()).hexdigest()[:12]


def worker(samples: int, max_length: int, global_batch: int, resume_epoch: int) -> None:
    """Print one JSON line per finished phase (the parent may kill this process at its budget)."""
    import datasets

    from sftdist.config import DataConfig
    from sftdist.data.build import build_schedule, mix_report

    datasets.disable_progress_bars()
    cfg = DataConfig(packing=True)
    kw = dict(seed=0, global_batch_size=global_batch, max_length=max_length)

    def emit(phase: str, start: float, **extra) -> None:
        print(json.dumps({"phase": phase, "seconds": time.perf_counter() - start, **extra}), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp), samples, max_length)
        start = time.perf_counter()
        schedule = build_schedule(data, cfg, **kw)
        emit("build_schedule", start, rows=schedule.epoch_len, order=order_hash(schedule.epoch(0)))
        start = time.perf_counter()
        report = mix_report(data, schedule)
        emit("mix_report", start, drawn=sum(r["samples_per_epoch"] for r in report))
        step = schedule.steps_for_epochs(resume_epoch + 0.5)
        start = time.perf_counter()
        batch = build_schedule(data, cfg, **kw).global_batch(step)
        emit("resume", start, step=step, order=order_hash(batch))


def run_case(samples: int, args) -> dict:
    """One child per sample count, so each starts cold and a slow one can be stopped at the budget."""
    cmd = [sys.executable, __file__, "--worker", str(samples), "--max-length", str(args.max_length),
           "--global-batch", str(args.global_batch), "--resume-epoch", str(args.resume_epoch)]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=args.budget)
        stopped = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        stopped = True
    phases = {p["phase"]: p for p in map(json.loads, out.splitlines()) if p}
    if stopped:  # the phase that was running when the budget ran out
        running = next(p for p in PHASES if p not in phases)
        phases[running] = {"phase": running, "over": args.budget - sum(p["seconds"] for p in phases.values())}
    elif proc.returncode:
        raise SystemExit(f"worker for {samples} samples failed ({proc.returncode})")
    return {"samples": samples, "wall": time.perf_counter() - start, "phases": phases}


def seconds(phase: dict | None) -> str:
    if phase is None:
        return "not reached"
    return f"> {phase['over']:.0f}" if "over" in phase else f"{phase['seconds']:.2f}"


def table(cases: list[dict]) -> str:
    lines = ["| samples | build_schedule s | mix_report s | resume s | packed rows (epoch 0) | resume step "
             "| order hash: epoch 0 / resume step |", "|---:|---:|---:|---:|---:|---:|---|"]
    for c in cases:
        p = c["phases"]
        build, resume = p.get("build_schedule", {}), p.get("resume", {})
        rows = f"{build['rows']:,}" if "rows" in build else "–"
        times = " | ".join(seconds(p.get(phase)) for phase in PHASES)
        lines.append(f"| {c['samples']:,} | {times} | {rows} | {resume.get('step', '–')} "
                     f"| {build.get('order', '–')} / {resume.get('order', '–')} |")
    return "\n".join(lines)


def machine() -> str:
    import datasets
    import numpy
    import pyarrow

    import sftdist

    code = Path(sftdist.__file__).resolve().parents[1]
    git = ["git", "-C", str(code)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "sftdist"], capture_output=True,
                           text=True).stdout.strip()
    def first(path: str, key: str) -> str:
        return next(line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                    if line.startswith(key))

    cpu = first("/proc/cpuinfo", "model name")
    ram = int(first("/proc/meminfo", "MemTotal").split()[0]) / 2**20
    return (f"- Machine: {os.cpu_count()} CPUs (`nproc`), {cpu}, {ram:.1f} GiB RAM, {platform.platform()}; "
            f"load average {os.getloadavg()[0]:.2f} at start (the schedule is single-threaded Python).\n"
            f"- Versions: Python {platform.python_version()}, datasets {datasets.__version__}, pyarrow "
            f"{pyarrow.__version__}, numpy {numpy.__version__}; sftdist from `{code}` at {commit}"
            f"{' with uncommitted changes in sftdist/' if dirty else ''}.")


def section(cases: list[dict], args, about: str, when: str, wall: float) -> str:
    command = " ".join(["python bench/schedule_scale.py", *sys.argv[1:]])
    chat, text = (f"{share:.0%}" for share in SHARES.values())
    return (f"## Sample schedule at scale (bench/schedule_scale.py)\n\n"
            f"Run {when}: `{command}` (total wall time {wall:.0f} s).\n\n{about}\n"
            f"- Data: two sources loaded with `load_from_disk` ({chat} chat-like lengths, lognormal around "
            f"300 tokens; {text} uniform 64..{args.max_length}), weights 1:1 by samples; packing into rows "
            f"of {args.max_length} tokens, global batch {args.global_batch} rows.\n"
            f"- resume = a fresh `build_schedule` + `global_batch(step)` for a step in epoch "
            f"{args.resume_epoch} (0-based), as a resumed run computes it. `> N` = still running when the "
            f"{args.budget:.0f} s budget per sample count ran out.\n\n{table(cases)}\n")


def write_results(text: str) -> None:
    """Replace this script's section of RESULTS.md (other scripts own the rest), or append it."""
    old = RESULTS.read_text() if RESULTS.exists() else ""
    head, found, rest = old.partition(BEGIN)
    tail = rest.partition(END)[2] if found else ""
    RESULTS.write_text(f"{head.rstrip()}\n\n{BEGIN}\n{text.rstrip()}\n{END}\n{tail.lstrip(chr(10))}".lstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--resume-epoch", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1200, help="seconds per sample count")
    ap.add_argument("--no-results", action="store_true", help="print the table only; leave RESULTS.md alone")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.max_length, args.global_batch, args.resume_epoch)
        return
    about, start = machine(), time.perf_counter()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cases = [run_case(n, args) for n in args.samples]
    text = section(cases, args, about, when, time.perf_counter() - start)
    print(text)
    if not args.no_results:
        write_results(text)
        print(f"updated {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
