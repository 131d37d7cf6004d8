#!/usr/bin/env python
"""Benchmark sftdist's data stage against TRL's SFTTrainer dataset preparation.

Both frameworks get the same records (real multi-turn chats from ``llamafactory_kto_en_demo.json``, ``label``
dropped, replicated to a few thousand conversations and written once as a JSONL file) and the same tokenizer
(``shared/tokenizers/qwen2``). What is timed:

* ``sftdist``: ``prepare_source(source, cfg, tokenizer, max_length=..., seed=0)`` with a fresh
  ``DataConfig.cache_dir`` (cold: stream the file's lines into a raw Arrow file, then in ``num_proc`` forked
  workers render each conversation, check which turns ``data.split_turns=auto`` must split, tokenise a batch
  of rendered texts with offsets in one call, mask every assistant turn, filter, and write the Arrow shards of
  the cache entry) and then the same call again (warm: it only finds the cache entry).
* ``trl``: ``datasets.load_dataset("json", ...)`` of the same file into a fresh datasets cache, plus
  ``SFTTrainer._prepare_dataset`` as the ``SFTTrainer`` constructor runs it (tokenise with
  ``apply_chat_template``, build labels, truncate, drop fully masked rows). Warm = the same again with the
  same datasets cache, where ``Dataset.map`` may find its cached results.

TRL runs twice per ``num_proc``: without masks (``assistant_only_loss=False``, the stock template: every token
is trained, i.e. less work than sftdist) and with masks (``assistant_only_loss=True``), for which the qwen2
template gets ``{% generation %}`` markers around ``content + '<|im_end|>'``: TRL cannot patch this template
itself, and the marked copy renders byte-identical text (checked on every record before timing).

Each case runs in a fresh subprocess (this file with ``--worker``); the parent prints a markdown table and
updates the data-prep section of ``bench/RESULTS.md``. Run it with the TRL venv's interpreter (see
``bench/README.md``)::

    bench/.venv-trl/bin/python bench/data_prep.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
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
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "datasets" / "llamafactory_kto_en_demo.json"
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "qwen2"
RESULTS = BENCH / "RESULTS.md"
BEGIN, END = "<!-- data_prep:begin -->", "<!-- data_prep:end -->"
MIN_SPAN = 1.0  # seconds; shorter spans get no contention figure
CONTENDED = 0.2  # share of the CPUs used by other processes above which a row is flagged

# The qwen2 fixture's assistant branch, and the same with TRL's assistant-mask markers (same rendered text).
ASSISTANT_PIECE = "{{ content + '<|im_end|>' + '\n' }}"
ASSISTANT_MARKED = "{% generation %}{{ content + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "TRANSFORMERS_VERBOSITY": "error"}


# ------------------------------------------------------------------------------------------------------------
# shared helpers


def load_tokenizer(path: str, *, marked: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if marked:
        tpl = tok.chat_template
        if ASSISTANT_PIECE not in tpl:
            raise SystemExit(f"{path}: chat template has no {ASSISTANT_PIECE!r}; "
                             "cannot add {% generation %} markers")
        tok.chat_template = tpl.replace(ASSISTANT_PIECE, ASSISTANT_MARKED)
    return tok


def read_conversations(path: Path) -> list[list[dict]]:
    """``messages`` of every record of a LLaMA-Factory messages file (other columns, e.g. ``label``,
    dropped)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [[{"role": m["role"], "content": m["content"]} for m in row["messages"]] for row in data]


def digest(rows) -> str:
    """Order-sensitive hash of a sequence of int lists."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def summarize(input_ids: list[list[int]], labels: list[list[int]]) -> dict:
    return {"rows": len(input_ids), "tokens": sum(map(len, input_ids)),
            "supervised": sum(sum(t != -100 for t in lab[1:]) for lab in labels),
            "truncated_to_max": None, "ids_digest": digest(input_ids), "labels_digest": digest(labels)}


def quiet():
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def _busy_jiffies() -> float:
    """Busy CPU time of the whole machine, in seconds (``/proc/stat``: everything but idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime  # children: reaped ones (datasets' pool workers)


def measure(fn):
    """Run ``fn``; returns its result, wall seconds, our CPU seconds (incl. reaped workers) and the CPU
    seconds that other processes on the machine used meanwhile (contention)."""
    b0, c0, t0 = _busy_jiffies(), _own_cpu(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, _own_cpu() - c0
    return out, wall, cpu, max(0.0, _busy_jiffies() - b0 - cpu)


def others_busy(seconds: float = 1.0) -> float:
    """Share of the machine's CPUs busy over ``seconds`` (this process sleeps meanwhile)."""
    b0 = _busy_jiffies()
    time.sleep(seconds)
    return (_busy_jiffies() - b0) / (seconds * (os.cpu_count() or 1))


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) until under ``threshold`` of the CPUs are busy; returns the last
    reading."""
    deadline = time.monotonic() + max(max_wait, 0.0)
    busy = others_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = others_busy(2.0)
    return busy


def contention(run: dict, phase: str):
    """Share of the CPUs other processes used during ``phase`` of a run; None where the span is too short."""
    span = run[f"{phase}_span"]
    return None if span < MIN_SPAN else min(run[f"{phase}_others"] / ((os.cpu_count() or 1) * span), 1.0)


def best(runs: list[dict], phase: str) -> dict:
    """The fastest uncontended run of ``phase`` (the fastest of all if every run was contended)."""
    return min(runs, key=lambda r: ((contention(r, phase) or 0.0) > CONTENDED, r[f"{phase}_s"]))


def repeat(a, one) -> list[dict]:
    """``a.repeats`` runs of ``one(index)``; then, while the best cold run was contended, up to ``a.retries``
    more after waiting for a quiet machine, as long as ``a.deadline`` (epoch seconds) allows."""
    runs = [one(r) for r in range(a.repeats)]
    for _ in range(a.retries):
        if (contention(best(runs, "cold"), "cold") or 0.0) <= CONTENDED:
            break
        left = a.deadline - time.time()
        if left < 2 * best(runs, "cold")["cold_span"] + 5:
            break
        wait_for_quiet(min(a.quiet_wait, left / 3))
        runs.append(one(len(runs)))
    return runs


# ------------------------------------------------------------------------------------------------------------
# workers (one subprocess per case)


def worker_sftdist(a) -> dict:
    import datasets

    from sftdist.config import DataConfig, DataSource
    from sftdist.data.prepare import prepare_source

    quiet()
    tok = load_tokenizer(a.tokenizer)
    source = DataSource(name="kto", path=a.records, format="messages")
    last: dict = {}

    def one(r: int) -> dict:
        cfg = DataConfig(sources=[source], train_on="assistant", truncation="truncate", audit_samples=0,
                         num_proc=a.num_proc, cache_dir=str(Path(a.workdir) / f"sftdist-cache-{r}"))

        def prep():
            return prepare_source(source, cfg, tok, max_length=a.max_length, seed=0)

        d, cold, cold_cpu, cold_others = measure(prep)
        d2, warm, warm_cpu, warm_others = measure(prep)
        assert d2 == d, (d, d2)
        ds, load, _, _ = measure(lambda: datasets.load_from_disk(str(d / "train")))
        last.update(d=d, ds=ds)
        return {"cold_s": cold, "cold_span": cold, "cold_cpu": cold_cpu, "cold_others": cold_others,
                "warm_s": warm, "warm_span": warm, "warm_cpu": warm_cpu, "warm_others": warm_others,
                "load_from_disk_s": load}

    runs = repeat(a, one)
    d, ds = last["d"], last["ds"]
    stats = json.loads((d / "stats.json").read_text())
    out = summarize(ds["input_ids"], ds["labels"])
    out["truncated_to_max"] = stats["statuses"].get("truncated", 0)
    return {"runs": runs, "stats": stats, **out}


def _count_cache_files(root: Path) -> int:
    return sum(1 for _ in root.rglob("cache-*.arrow"))


def worker_trl(a) -> dict:
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    quiet()
    masks = a.framework == "trl-masks"
    tok = load_tokenizer(a.tokenizer, marked=masks)
    timings: dict[str, float] = {}

    class TimedSFTTrainer(SFTTrainer):
        def _prepare_dataset(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._prepare_dataset(*args, **kwargs)
            finally:
                timings["prepare"] = time.perf_counter() - t0

    def tiny_model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=a.max_length,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        return LlamaForCausalLM(cfg)

    def one_pass(cache: Path):
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=a.records, split="train", cache_dir=str(cache))
        load = time.perf_counter() - t0
        args = SFTConfig(output_dir=str(Path(a.workdir) / "trl-out"), max_length=a.max_length,
                         dataset_num_proc=a.num_proc, assistant_only_loss=masks, packing=False,
                         bf16=False, use_cpu=True, report_to="none", save_strategy="no",
                         logging_strategy="no")
        model = tiny_model()
        t0 = time.perf_counter()
        trainer = TimedSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        ctor = time.perf_counter() - t0
        parts = {"load_dataset": load, "prepare_dataset": timings["prepare"], "constructor": ctor}
        return parts, trainer.train_dataset

    last: dict = {}

    def one(r: int) -> dict:
        cache = Path(a.workdir) / f"hf-datasets-cache-{r}"
        (parts_c, out_ds), span_c, cold_cpu, cold_others = measure(lambda: one_pass(cache))
        files_cold = _count_cache_files(cache)
        (parts_w, out_w), span_w, warm_cpu, warm_others = measure(lambda: one_pass(cache))
        assert out_w["input_ids"] == out_ds["input_ids"]
        last["ds"] = out_ds
        # seconds = file -> prepared dataset (load_dataset + _prepare_dataset); the CPU and contention figures
        # cover the whole pass (they include building the tiny model and the rest of the constructor)
        return {"cold_s": parts_c["load_dataset"] + parts_c["prepare_dataset"], "cold_cpu": cold_cpu,
                "cold_others": cold_others, "cold_parts": parts_c, "cold_span": span_c,
                "warm_s": parts_w["load_dataset"] + parts_w["prepare_dataset"], "warm_cpu": warm_cpu,
                "warm_others": warm_others, "warm_parts": parts_w, "warm_span": span_w,
                "cache_files_cold": files_cold,
                "cache_files_written_warm": _count_cache_files(cache) - files_cold}

    runs = repeat(a, one)
    out_ds = last["ds"]
    ids, labels = out_ds["input_ids"], out_ds["labels"]
    res = {"runs": runs, **summarize(ids, labels)}
    res["truncated_to_max"] = sum(len(r) == a.max_length for r in ids)
    if a.probe:  # what TRL says when asked for assistant-only loss with the stock (unmarked) template
        stock = load_tokenizer(a.tokenizer)
        small = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Yo"}]}])
        try:
            SFTTrainer(model=tiny_model(), processing_class=stock, train_dataset=small,
                       args=SFTConfig(output_dir=str(Path(a.workdir) / "probe"), assistant_only_loss=True,
                                      bf16=False, use_cpu=True, report_to="none"))
            res["probe_stock_assistant_only"] = "accepted"
        except Exception as e:  # noqa: BLE001 - report whatever TRL raises
            res["probe_stock_assistant_only"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return res


# ------------------------------------------------------------------------------------------------------------
# parent


def check_same_rendering(tokenizer: str, conversations: list[list[dict]]) -> None:
    """The marked template must render exactly the text of the stock one, or the TRL-with-masks row is
    unfair."""
    stock, marked = load_tokenizer(tokenizer), load_tokenizer(tokenizer, marked=True)
    for i, m in enumerate(conversations):
        if stock.apply_chat_template(m, tokenize=False) != marked.apply_chat_template(m, tokenize=False):
            raise SystemExit(f"record {i}: the {{% generation %}}-marked template renders different text")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "datasets", "trl", "accelerate", "sftdist"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20,
                                  check=False).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"

    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), 0)
    model = sh("lscpu | grep 'Model name'").split(":", 1)[-1].strip() or platform.processor()
    head = sh(f"git -C {REPO} rev-parse --short HEAD")
    dirty = sh(f"git -C {REPO} status --porcelain --untracked-files=no -- sftdist")
    return {"nproc": sh("nproc"), "cpu": model, "ram_gib": round(mem_kb / 2**20, 1),
            "os": platform.platform(),
            "sftdist_commit": head + (" (+ uncommitted changes in sftdist/)" if dirty else "")}


def np_label(num_proc) -> str:
    return "None (in-process)" if num_proc is None else str(num_proc)


def run_case(framework: str, num_proc, a, records: Path, tmp: Path, probe: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"{framework}-np{num_proc}-", dir=tmp))
    result = work / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework,
           "--num-proc", "none" if num_proc is None else str(num_proc), "--repeats", str(a.repeats),
           "--retries", str(a.retries), "--deadline", str(a.deadline), "--quiet-wait", str(a.quiet_wait),
           "--records", str(records), "--tokenizer", str(a.tokenizer), "--max-length", str(a.max_length),
           "--workdir", str(work), "--result", str(result)] + (["--probe"] if probe else [])
    env = {**os.environ, **OFFLINE_ENV, "HF_DATASETS_CACHE": str(work / "hf-default-cache"),
           "HF_HOME": str(work / "hf-home")}
    busy_before = wait_for_quiet(a.quiet_wait)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-8000:])
        raise SystemExit(f"{framework} num_proc={num_proc} failed (exit {p.returncode})")
    out = json.loads(result.read_text())
    out["busy_before"] = busy_before
    shutil.rmtree(work, ignore_errors=True)
    return out


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def build_table(cases: list[dict], n: int) -> str:
    head = ("| framework | masks | num_proc | cache | conversations | seconds | conversations/s | tokens/s | "
            "CPU s | others' CPU | notes |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for c in cases:
        res = c["result"]
        for phase in ("cold", "warm"):
            r = best(res["runs"], phase)
            s = r[f"{phase}_s"]
            if c["framework"] == "sftdist":
                fw, masks = "sftdist `prepare_source`", "every assistant turn (render once)"
                note = ("read + render/tokenise (batched)/mask + filter + write shards" if phase == "cold" else
                        f"finds the cache entry (then `load_from_disk`: {r['load_from_disk_s']:.2f} s)")
            else:
                parts = r[f"{phase}_parts"]
                fw = "TRL `load_dataset` + `SFTTrainer._prepare_dataset`"
                masks = ("assistant_only_loss (marked template)" if c["framework"] == "trl-masks"
                         else "none (every token trained)")
                note = (f"load_dataset {parts['load_dataset']:.2f} s + "
                        f"prepare {parts['prepare_dataset']:.2f} s; "
                        f"whole constructor {parts['constructor']:.2f} s")
                if phase == "warm":
                    note += ("; `map` cache hit" if r["cache_files_written_warm"] == 0
                             else f"; {r['cache_files_written_warm']} new cache files (no full cache hit)")
            others = contention(r, phase)
            if others is None:  # /proc/stat counts in 10 ms ticks: too coarse for sub-second spans
                others_txt = "–"
            else:
                others_txt = f"{others:.0%}"
                if others > CONTENDED:
                    note = f"**contended** (others used {others:.0%} of the CPUs); " + note
            if phase == "cold":
                note += f"; best of {len(res['runs'])}"
            lines.append(f"| {fw} | {masks} | {np_label(c['num_proc'])} | {phase} | {n:,} | {s:.2f} | "
                         f"{fmt_rate(n / s)} | {fmt_rate(res['tokens'] / s)} | {r[f'{phase}_cpu']:.2f} | "
                         f"{others_txt} | {note} |")
    return "\n".join(lines)


def check_outputs(cases: list[dict]) -> list[str]:
    ref = next(c["result"] for c in cases if c["framework"] == "sftdist")
    notes = []
    for c in cases:
        r = c["result"]
        same_ids = r["ids_digest"] == ref["ids_digest"]
        same_labels = r["labels_digest"] == ref["labels_digest"]
        expected = " (expected: no masks)" if c["framework"] == "trl-nomask" and not same_labels else ""
        notes.append(f"- {c['framework']} num_proc={np_label(c['num_proc'])}: {r['rows']:,} rows, "
                     f"{r['tokens']:,} tokens, {r['supervised']:,} supervised, "
                     f"{r['truncated_to_max']} truncated to max_length; "
                     f"input_ids {'identical to' if same_ids else 'DIFFER from'} sftdist's, "
                     f"labels {'identical' if same_labels else 'differ'}{expected}")
    return notes


def summary(cases: list[dict]) -> list[str]:
    """sftdist's cold time against TRL's at the same num_proc (and TRL in-process), CPU time and warm
    times."""
    runs = {(c["framework"], c["num_proc"]): c["result"]["runs"] for c in cases}
    cold = {k: best(v, "cold") for k, v in runs.items()}
    lines = []
    for p in [c["num_proc"] for c in cases if c["framework"] == "sftdist"]:
        ref = cold[("sftdist", p)]["cold_s"]
        parts = []
        for fw, label in (("trl-masks", "TRL with the same masks"), ("trl-nomask", "TRL without masks")):
            for q in ([p, None] if fw == "trl-masks" and p == 1 else [p]):
                if (fw, q) in cold:
                    t = cold[(fw, q)]["cold_s"]
                    where = " in-process" if q is None else ""
                    parts.append(f"{label}{where} {t:.2f} s (sftdist/TRL = {ref / t:.2f})")
        if parts:
            lines.append(f"- Cold, num_proc={p}: sftdist {ref:.2f} s vs " + ", ".join(parts) + ".")
    per_fw: dict[str, list[str]] = {}
    for (fw, q), r in cold.items():
        per_fw.setdefault(fw, []).append(f"{r['cold_cpu']:.1f} s ({np_label(q)})")
    cpu = "; ".join(f"{fw} {', '.join(v)}" for fw, v in per_fw.items())
    lines.append(f"- CPU time of the cold runs (all processes): {cpu}.")
    warm = [best(v, "warm")["warm_s"] for v in runs.values()]
    lines.append(f"- Warm (cache found): {min(warm):.2f}-{max(warm):.2f} s on every row.")
    return lines


def write_results(section: str) -> None:
    header = ("# Benchmarks\n\nMeasured numbers from the scripts in `bench/` (see `bench/README.md`). "
              "Each script rewrites its own section, between its markers, with its latest run.\n")
    text = RESULTS.read_text() if RESULTS.exists() else header
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def parse_num_proc(v: str):
    return None if v.lower() == "none" else int(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LLaMA-Factory messages JSON file")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--replicas", type=int, default=15,
                    help="copies of the records (300 x 15 = 4,500 conversations)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--num-proc", type=parse_num_proc, nargs="+", default=[1, 2],
                    help="num_proc values for every framework (sftdist DataConfig.num_proc, "
                    "TRL dataset_num_proc)")
    ap.add_argument("--trl-in-process", action=argparse.BooleanOptionalAction, default=True,
                    help="also run TRL with masks at its default dataset_num_proc=None (no worker pool)")
    ap.add_argument("--frameworks", nargs="+", default=["sftdist", "trl-nomask", "trl-masks"],
                    choices=["sftdist", "trl-nomask", "trl-masks"])
    ap.add_argument("--repeats", type=int, default=2,
                    help="cold+warm repeats per case; the fastest uncontended one is reported")
    ap.add_argument("--retries", type=int, default=2,
                    help="extra repeats of a case whose best cold run was slowed by other processes")
    ap.add_argument("--budget", type=float, default=200.0,
                    help="seconds after which no more retries start (the run itself is not cut short)")
    ap.add_argument("--quiet-wait", type=float, default=15.0,
                    help="before each case, wait up to this many seconds for the machine to go idle")
    ap.add_argument("--no-results", action="store_true", help="print the table only; leave RESULTS.md alone")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["sftdist", "trl-nomask", "trl-masks"], help=argparse.SUPPRESS)
    ap.add_argument("--records", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        a.framework, a.num_proc = a.worker, a.num_proc[0]
        res = worker_sftdist(a) if a.worker == "sftdist" else worker_trl(a)
        Path(a.result).write_text(json.dumps(res))
        return

    os.environ.update(OFFLINE_ENV)
    if "sftdist" not in a.frameworks:
        raise SystemExit("--frameworks must include sftdist (it is the reference for the output check)")
    if None in a.num_proc:
        raise SystemExit("--num-proc none is TRL-only; use --trl-in-process")
    plan = [(fw, p) for fw in a.frameworks for p in a.num_proc]
    if a.trl_in_process and "trl-masks" in a.frameworks:
        plan.insert(plan.index(("trl-masks", a.num_proc[0])), ("trl-masks", None))
    started = time.perf_counter()
    a.deadline = time.time() + a.budget
    load_start = os.getloadavg()
    conversations = read_conversations(a.data) * a.replicas
    n = len(conversations)
    tmp = Path(tempfile.mkdtemp(prefix="sftdist-bench-"))
    try:
        records = tmp / "records.jsonl"
        with records.open("w", encoding="utf-8") as f:
            for m in conversations:
                f.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
        if "trl-masks" in a.frameworks:
            check_same_rendering(a.tokenizer, conversations[: n // a.replicas])
        cases = []
        for fw, p in plan:
            print(f"running {fw} num_proc={np_label(p)} ...", file=sys.stderr, flush=True)
            r = run_case(fw, p, a, records, tmp, probe=(fw == "trl-nomask" and p == a.num_proc[0]))
            cases.append({"framework": fw, "num_proc": p, "result": r})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started
    load_end = os.getloadavg()

    table = build_table(cases, n)
    print(table)
    lines = summary(cases)
    print("\n".join(lines))
    checks = check_outputs(cases)
    print("\n".join(checks))
    probe = next((c["result"].get("probe_stock_assistant_only") for c in cases if "probe_stock_assistant_only"
                  in c["result"]), None)
    if probe:
        print(f"TRL assistant_only_loss=True with the stock qwen2 template: {probe}")
    busy = ", ".join(f"{c['framework']}/{np_label(c['num_proc'])} {c['result']['busy_before']:.0%}"
                     for c in cases)
    print(f"total wall time {total:.0f} s; load average {load_start[0]:.2f} at start, "
          f"{load_end[0]:.2f} at end", file=sys.stderr)
    if a.no_results:
        return

    v, m = versions(), machine()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "bench/.venv-trl/bin/python bench/data_prep.py " + " ".join(sys.argv[1:])
    section = f"""## Data preparation: sftdist vs TRL SFTTrainer ({now})

Command: `{cmd.strip()}` (total wall time {total:.0f} s).

- Machine: {m['nproc']} CPUs (`nproc`), {m['cpu']}, {m['ram_gib']} GiB RAM, {m['os']}; no GPU.
- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']},
  tokenizers {v['tokenizers']}, datasets {v['datasets']}, trl {v['trl']}, accelerate {v['accelerate']};
  sftdist {v['sftdist']} at {m['sftdist_commit']}.
- Records: `{a.data.name}` ({n // a.replicas} multi-turn conversations, `label` dropped) x {a.replicas} =
  {n:,} conversations, one JSONL file read by both. Tokenizer: `{Path(a.tokenizer).name}` (AutoTokenizer,
  offline). max_length {a.max_length}, truncation keeps the start.
- seconds = file on disk -> tokenised dataset, the fastest uncontended of {a.repeats}+ repeats (each with
  fresh caches; a case whose best cold run was contended gets up to {a.retries} more after waiting for quiet).
  tokens/s counts the `input_ids` of the output (after truncation); warm rows divide the same counts by the
  warm time. CPU s = CPU time of the benchmark process and its reaped `datasets` workers over the same span
  (for TRL, the whole `load_dataset` + `SFTTrainer(...)` pass). others' CPU = share of the machine's CPUs used
  by other processes meanwhile (`/proc/stat`; "–" for spans under {MIN_SPAN:.0f} s): the machine is
  shared, and rows where others used more than {CONTENDED:.0%} are marked **contended** (their seconds
  are inflated; CPU s much less so).
- Load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; CPU busy before each case: {busy}.

{table}

{chr(10).join(lines)}
- What each side does and does not do (masks, validation, audit, cache, truncation): `bench/README.md`.

Output check (order-sensitive hash of every row's `input_ids` / `labels`, against sftdist
num_proc={cases[0]['num_proc']}):

{chr(10).join(checks)}
""" + (f"- TRL `assistant_only_loss=True` with the stock qwen2 template (no `{{% generation %}}` "
       f"markers): `{probe}`\n" if probe else "")
    write_results(section)
    print(f"updated {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
