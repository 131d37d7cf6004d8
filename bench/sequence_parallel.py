"""Sequence parallelism (Ulysses): per-rank peak memory and tokens/s by row length and SP size, the longest
row that trains under a per-rank memory cap, and what the tiled MLP and activation checkpointing add.

Every case is one real run: ``python -m sftdist.train`` (SP=1) or ``torchrun --nproc_per_node SP -m
sftdist.train`` (SP=2.., DP=1) of a random-init model built from a config, packed rows, micro-batch 1 =
global batch 1, on single-document rows: each conversation's reply is a distinct window of real text
(``../shared/datasets``: the LLaMA-Factory wiki demo, then tiny Shakespeare) longer than the row, which
truncation fills with exactly one ``max_length``-token document. One short conversation (~80 tokens) is
packed alone and made the first step (the driver picks ``train.seed`` with sftdist's own schedule): it
allocates Adam's states and warms up, so the timed full rows after it show a steady step's memory.
Numbers come from the run's ``metrics.jsonl`` (rank 0: ``tokens_per_sec``, ``step_time_s``,
``mem/host_peak_rss_gib``, ``mem/device_peak_gib``). A watchdog reads every rank's ``VmHWM`` from
``/proc``, stops a run before it takes the machine's last 1.5 GiB (a shared machine), and with
``--rank-limit-gib`` stops a run once a rank's RSS passes that limit (recorded as OOM).

CPU mode (default): the small bench preset (Llama, hidden 512, 8 layers, 8 / 4 heads, FFN 1376, untied
embeddings, the Llama-2 tokenizer's 32,000 tokens), fp32, ZeRO-2; SP=1 on both cores, SP=2 one per rank.
With the defaults (``tiled_mlp=auto``, no checkpointing) unless said otherwise:

1. ``--lengths`` 2k, 8k, 32k plus ``--cap-lengths`` 4k, 16k, x ``--sp`` 1, 2: per-rank peak, tokens/s, the
   peak each length adds to the one before, and per ``--cap-gib`` the longest doubling length under the
   cap, a straight line to the next one, and (``--bisect``) a run at that interpolated length;
2. what SP divides (``--split-lengths`` 8k, 16k, and 256): tiled MLP on and ``train.loss_chunk_tokens``
   1024 in every run (the LM head's logits stay small), through a worker that also sums the bytes autograd
   saves in the decoder's forward on each rank; 256 and 16k again with ``MALLOC_MMAP_THRESHOLD_=131072``,
   so that glibc returns freed tensors and the resident set follows the live ones;
3. at ``--variant-length`` 16k, SP=2: ``tiled_mlp`` false / true x ``activation_checkpointing`` false / true
   (16k, not 32k: a 32k step takes ~5 min here, attention growing with the square of the length);
4. ``--threshold`` pairs 2k SP=1, 8k SP=2, 32k SP=2 run tiled and untiled: with the variants, 2k, 4k, 8k
   and 16k tokens per rank on both sides of ``tiled_mlp=auto``'s 8,192.

Runs time 2 full-row steps up to 4k and 1 from 8k. ``--save FILE`` keeps every run's numbers (after each
run); ``--save FILE --reuse`` runs only what FILE lacks (``--rerun-contended``: also runs that others
slowed), ``--load FILE`` re-renders the tables (e.g. with other ``--cap-gib``).

GPU mode (``--gpu``, one short device run, < ~5 min): a Qwen2.5-0.5B-shaped model from config (hidden 896,
24 layers, 14 / 2 heads, FFN 4864, tied embeddings; vocabulary = the shared qwen2 tokenizer's 151,646, not
the real model's padded 151,936), bf16, ZeRO-2, ``max_length`` 8k, 32k, 64k, 128k, SP = ``--nproc``
(default: every visible GPU), each with ``--variants`` (default ``auto:off,false:off,true:on`` =
tiled_mlp:activation_checkpointing), 1 timed step each. A variant that runs out of device memory is not
tried at longer lengths; no run starts that would end past ``--budget-min`` (4.5; the last run's time as
the guess). ``--cpu-dry-run`` runs that path on CPU with a tiny qwen2 model at 256-1024 tokens, fp32, to
check the arguments, the OOM handling (with ``--rank-limit-gib``) and the table; it never writes RESULTS.md.

Usage (from the repository root, in the project venv)::

    python bench/sequence_parallel.py --bisect     # ~50 min on 2 idle cores; rewrites its RESULTS.md section
    python bench/sequence_parallel.py --lengths 2048 --no-cap --no-split --no-variants --no-threshold \
        --no-results                               # ~2 min
    python bench/sequence_parallel.py --gpu              # on a GPU host (bench/README.md: on a lent device)
    python bench/sequence_parallel.py --gpu --cpu-dry-run --nproc 2 --rank-limit-gib 1.2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from zero_memory import machine, write_results

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared"  # --shared: a copy elsewhere (a device machine gets only the checkout)
CORPUS = ("datasets/llamafactory_wiki_demo.txt", "datasets/tinyshakespeare_input.txt")  # under SHARED
MARKERS = {"cpu": ("<!-- sequence_parallel:begin -->", "<!-- sequence_parallel:end -->"),
           "gpu": ("<!-- sequence_parallel_gpu:begin -->", "<!-- sequence_parallel_gpu:end -->")}
K = 1024
CONTENDED = 0.2  # share of the CPUs other processes used during a run, above which its speed is suspect
SPLIT_BASE, SPLIT_CHUNK = 256, 1024  # "what SP divides": a row too short to matter, a small loss chunk
# ... and again with every allocation from 128 KiB mmapped, so freed tensors leave the resident set at once
# (glibc keeps freed heap memory resident, and its mmap threshold grows to 32 MiB: a tensor half as large,
# as under SP=2, can stay in the heap where the whole one was returned)
SPLIT_MALLOC = 131072
MEASURED = ("ok", "OOM", "stopped (machine memory)")  # outcomes that --reuse keeps

SMALL = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": False,
         "rms_norm_eps": 1e-5}
QWEN_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6}
TINY = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}


def kib(tokens: int) -> str:
    """``32k`` for 32768 tokens; a length that is no multiple of 1024 as it is."""
    return f"{tokens // K}k" if tokens % K == 0 else f"{tokens:,}"


@dataclass(frozen=True)
class Mode:
    """What a set of runs shares."""

    name: str  # cpu | gpu (also the RESULTS.md section)
    model: dict
    tokenizer: Path
    corpus: tuple
    precision: str

    def timed_steps(self, length: int) -> int:
        return 2 if self.name == "cpu" and length <= 4 * K else 1


@dataclass(frozen=True)
class Case:
    length: int
    sp: int
    tiled: str  # auto | true | false (auto is resolved by sftdist; its log says what it chose)
    ac: bool
    chunk: int = 0  # train.loss_chunk_tokens (0: the default, 8192)
    malloc: int = 0  # MALLOC_MMAP_THRESHOLD_ of the run (0: glibc's own, a threshold that grows to 32 MiB)

    @property
    def per_rank(self) -> int:
        return -(-self.length // self.sp)

    @property
    def default(self) -> bool:
        return self.tiled == "auto" and not self.ac and not self.chunk and not self.malloc

    def label(self) -> str:
        return (f"{kib(self.length)} SP={self.sp} tiled_mlp={self.tiled} ac={str(self.ac).lower()}"
                + (f" loss_chunk_tokens={self.chunk}" if self.chunk else "")
                + (f" MALLOC_MMAP_THRESHOLD_={self.malloc}" if self.malloc else ""))


@dataclass
class Result:
    case: Case
    status: str = "ok"  # ok | OOM | stopped (machine memory) | timeout | failed | interrupted | not run
    note: str = ""
    tiled_on: Optional[bool] = None
    peak_gib: Optional[float] = None  # rank 0's mem/host_peak_rss_gib, last step
    rank_hwm_gib: list = field(default_factory=list)  # every rank's VmHWM, start-up to exit
    saved_gib: list = field(default_factory=list)  # per rank: autograd-saved bytes of a forward (probe runs)
    device_peak_gib: Optional[float] = None
    tokens_per_s: Optional[float] = None
    step_s: Optional[float] = None  # mean over the timed steps
    timed: int = 0
    seconds: float = 0.0  # the whole run
    others_cpu: Optional[float] = None  # share of the CPUs other processes used meanwhile

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------------------------- data

def write_records(path: Path, *, length: int, long_records: int, tokenizer, corpus: tuple) -> None:
    """One short conversation, then ``long_records`` whose replies are distinct windows of the corpus of at
    least ``length`` tokens each (truncation then fills a whole row with one document)."""
    text = "\n\n".join(Path(p).read_text() for p in corpus)
    ring, chars = text + "\n\n" + text, int(length * 4.3)  # windows past the end wrap to the start
    records = [[{"role": "user", "content": "Quote the opening of the article."},
                {"role": "assistant", "content": " ".join(text[:1200].split()[:60])}]]
    for i in range(long_records):
        while True:
            start = (i * chars * 2) % len(text)
            reply = ring[start:start + chars]
            if len(tokenizer(reply, add_special_tokens=False)["input_ids"]) >= length + 64:
                break
            chars = int(chars * 1.25)
        records.append([{"role": "user", "content": f"Continue passage {i + 1} of the corpus."},
                        {"role": "assistant", "content": reply}])
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))


def overrides(mode: Mode, case: Case, *, data: Path, cache: Path, out: Path, seed: int) -> list[str]:
    model = {**mode.model, "max_position_embeddings": max(case.length, 4 * K)}
    config = ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in model.items())
    return [f"model.tokenizer={mode.tokenizer}", "model.from_config={" + config + "}",
            "model.attn_implementation=sdpa", f"data.sources=[{{name:long,path:'{data}',format:messages}}]",
            "data.packing=true", f"data.cache_dir={cache}", "data.audit_samples=0", "data.num_proc=1",
            "data.forgetting_probe=none", f"train.max_steps={1 + mode.timed_steps(case.length)}",
            "train.micro_batch_size=1", "train.global_batch_size=1", f"train.max_length={case.length}",
            "train.lr=1e-4", "train.warmup_steps=0", "train.schedule=constant", "train.eval_every=0",
            "train.eval_at_start=false", f"train.seed={seed}", f"parallelism.precision={mode.precision}",
            f"parallelism.sequence_parallel_size={case.sp}", f"parallelism.tiled_mlp={case.tiled}",
            f"parallelism.activation_checkpointing={str(case.ac).lower()}", f"output_dir={out}",
            "logging.log_every=1", "logging.progress=lines",
            *([f"train.loss_chunk_tokens={case.chunk}"] if case.chunk else [])]


def prepare(mode: Mode, length: int, work: Path) -> tuple[Path, int]:
    """Write the records for ``length``, fill the data cache, and find a seed whose first step is the short
    conversation in sftdist's own schedule. Returns (records file, seed)."""
    from transformers import AutoTokenizer

    from sftdist.config import compose_config
    from sftdist.data import build as data_build
    from sftdist.engine.model import load_tokenizer

    path = work / f"records-{length}.jsonl"
    write_records(path, length=length, long_records=mode.timed_steps(length), corpus=mode.corpus,
                  tokenizer=AutoTokenizer.from_pretrained(str(mode.tokenizer)))
    cfg = compose_config(overrides(mode, Case(length, 1, "false", False), data=path, cache=work / "cache",
                                   out=work / "unused", seed=0))
    tokenizer = load_tokenizer(cfg.model)
    dirs = data_build.prepare_all(cfg.data, tokenizer, max_length=length, seed=0)
    data = data_build.build_datasets(cfg.data, tokenizer, max_length=length, seed=0, dirs=dirs)
    lengths = data_build.column_array(data.sources[0].train, "num_tokens").tolist()
    if min(lengths) >= length or sorted(lengths)[1:] != [length] * (len(lengths) - 1):
        sys.exit(f"records for {length}: expected one short row, then full ones; got lengths {lengths}")
    for seed in range(1000):
        schedule = data_build.build_schedule(data, cfg.data, seed=seed, global_batch_size=1,
                                             max_length=length)
        if sum(lengths[i] for _, i in schedule.global_batch(0)[0]) < length:
            return path, seed
    sys.exit(f"no seed puts the short conversation first at {length}")


# ----------------------------------------------------------------------------------------------- one run

def probe_worker(out: Path, args: list[str]) -> None:
    """``--probe-worker``: ``sftdist.train.run`` with autograd's saved-tensor hooks around each training
    forward of the engine (the decoder; the LM head and loss run outside it), writing this rank's largest
    sum of saved bytes, each storage counted once, to ``out/saved-rank<r>.json``."""
    import torch

    import sftdist.train as train
    from sftdist.config import compose_config
    from sftdist.engine import deepspeed_wrap

    wrap, most = deepspeed_wrap.wrap_with_deepspeed, [0]

    def probed_wrap(*a, **kw):
        engine = wrap(*a, **kw)
        forward = engine.forward

        def probed_forward(*fa, **fkw):
            if not torch.is_grad_enabled():
                return forward(*fa, **fkw)
            seen: dict[int, int] = {}

            def pack(t):
                if not isinstance(t._base if t._base is not None else t, torch.nn.Parameter):
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                result = forward(*fa, **fkw)
            most[0] = max(most[0], sum(seen.values()))
            return result

        engine.forward = probed_forward
        return engine

    deepspeed_wrap.wrap_with_deepspeed = probed_wrap  # where sftdist.train looks it up
    train.run(compose_config(args))
    (out / f"saved-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(most[0]))


def _status_kib(pid: int, name: str) -> int:
    try:
        line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith(name))
        return int(line.split()[1])
    except (OSError, StopIteration):
        return 0


def _rank_of(pid: int) -> Optional[int]:
    """The rank a process of the run is (None: the launcher, or not a training process)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"torch.distributed.run" in cmd or not (b"sftdist.train" in cmd or b"--probe-worker" in cmd):
        return None
    return int(next((e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")), b"0"))


class Watchdog(threading.Thread):
    """Every 0.2 s: each rank's VmHWM; stops the run (launcher and ranks) once a rank's RSS passes
    ``rank_limit_kib`` (an OOM), or once the machine has under ``reserve_kib`` available (the machine is
    shared: the run goes before the kernel's OOM killer picks some other process)."""

    def __init__(self, proc: subprocess.Popen, *, rank_limit_kib: Optional[int], reserve_kib: int):
        super().__init__(daemon=True)
        self.proc, self.rank_limit_kib, self.reserve_kib = proc, rank_limit_kib, reserve_kib
        self.hwm: dict[int, int] = {}
        self.stopped: Optional[tuple[str, str]] = None

    def run(self) -> None:
        import psutil

        while self.proc.poll() is None:
            try:
                root = psutil.Process(self.proc.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in tree:
                if (rank := _rank_of(p.pid)) is not None:
                    self.hwm[rank] = max(self.hwm.get(rank, 0), _status_kib(p.pid, "VmHWM"))
                    if self.rank_limit_kib and _status_kib(p.pid, "VmRSS") > self.rank_limit_kib:
                        limit = self.rank_limit_kib / 2**20
                        self.stop("OOM", f"rank {rank} passed --rank-limit-gib {limit:.2f}")
            available = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                                 if ln.startswith("MemAvailable")).split()[1])
            if available < self.reserve_kib:
                held = sum(_status_kib(p.pid, "VmRSS") for p in tree) / 2**20
                self.stop("stopped (machine memory)", f"the machine had < {self.reserve_kib / 2**20:.1f} GiB "
                                                      f"left; this run held {held:.1f} GiB")
            time.sleep(0.2)

    def stop(self, status: str, note: str) -> None:
        """Kill the launcher and every rank (torchrun starts its workers in sessions of their own)."""
        import psutil

        self.stopped = self.stopped or (status, note)
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for p in [*tree]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _busy_cpu_s() -> float:
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _children_cpu_s() -> float:
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def run_case(mode: Mode, case: Case, *, data: Path, seed: int, work: Path, timeout_s: float,
             rank_limit_gib: Optional[float]) -> Result:
    out = work / f"run-{case.length}-{case.sp}-{case.tiled}-{case.ac}-{case.chunk}-{case.malloc}"
    out.mkdir()
    args = overrides(mode, case, data=data, cache=work / "cache", out=out / "run", seed=seed)
    # the "what SP divides" runs go through the probe worker; the others are plain sftdist runs
    main = [__file__, "--probe-worker", str(out), "--"] if case.chunk == SPLIT_CHUNK else \
        ["-m", "sftdist.train"]
    launch = [] if case.sp == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                      str(case.sp)]
    cmd = [sys.executable, *launch, *main, *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // case.sp)),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"MALLOC_MMAP_THRESHOLD_": str(case.malloc)} if case.malloc else {})}
    r = Result(case)
    busy0, own0, t0 = _busy_cpu_s(), _children_cpu_s(), time.time()
    with (out / "log").open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        watch = Watchdog(proc, rank_limit_kib=int(rank_limit_gib * 2**20) if rank_limit_gib else None,
                         reserve_kib=int(1.5 * 2**20))
        watch.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            watch.stop("timeout", f"over {timeout_s:.0f} s")
            rc = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: leave no rank behind
            watch.stop("interrupted", "")
            raise
        watch.join()
    r.seconds = time.time() - t0
    if not watch.stopped:  # (the CPU time of killed ranks is never reaped here: it would count as others')
        others = _busy_cpu_s() - busy0 - (_children_cpu_s() - own0)
        r.others_cpu = max(0.0, min(1.0, others / ((os.cpu_count() or 1) * r.seconds)))
    r.rank_hwm_gib = [watch.hwm[k] / 2**20 for k in sorted(watch.hwm)]
    r.saved_gib = [json.loads(p.read_text()) / 2**30 for p in sorted(out.glob("saved-rank*.json"))]
    text = (out / "log").read_text(errors="replace")
    r.tiled_on = "tiled MLP (parallelism.tiled_mlp" in text  # sftdist's start-up line when it tiles
    metrics = out / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if rows:
        r.peak_gib = max(row["mem/host_peak_rss_gib"] for row in rows)
        r.device_peak_gib = max((row.get("mem/device_peak_gib") or 0.0) for row in rows) or None
    if watch.stopped:
        r.status, r.note = watch.stopped
    elif rc != 0:
        r.status = "OOM" if any(s in text for s in ("CUDA out of memory", "OutOfMemoryError")) else "failed"
        lines = [ln for ln in text.splitlines() if ln.strip()] or [f"exit status {rc}"]
        r.note = next((ln for ln in reversed(lines) if "rror" in ln), lines[-1])[:200]
    elif len(rows) < 2 or rows[0]["tokens"] >= case.length:
        r.status, r.note = "failed", f"expected a short first step, then full rows; got {len(rows)} rows"
    else:
        timed = rows[1:]
        r.timed, seconds = len(timed), sum(row["step_time_s"] for row in timed)
        r.tokens_per_s, r.step_s = sum(row["tokens"] for row in timed) / seconds, seconds / len(timed)
    return r


# ----------------------------------------------------------------------------------------------- tables

def fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def peak_text(r: Result) -> str:
    """Rank 0's training peak, the other ranks' VmHWM in brackets; a stopped run: the VmHWM it reached."""
    if not r.ok:
        return f"≥ {max(r.rank_hwm_gib):.2f}" if r.rank_hwm_gib else "–"
    others = f" ({' / '.join(f'{g:.2f}' for g in r.rank_hwm_gib[1:])})" if len(r.rank_hwm_gib) > 1 else ""
    return f"{r.peak_gib:.2f}{others}"


def status_text(r: Result) -> str:
    return "ok" if r.ok else f"**{r.status}**" + (f": {r.note}" if r.note else "")


def tiled_text(r: Result) -> str:
    on = "on" if r.tiled_on else "off"
    return f"auto: {on}" if r.case.tiled == "auto" else on


def table(header: list[str], align: str, rows: list[list[str]]) -> str:
    """A Markdown table; ``align`` has one letter per column: l (left) or r (right)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(row) + " |" for row in rows)]
    return "\n".join(lines)


def sp_table(results: list[Result], lengths: list[int]) -> str:
    rows = [[f"{c.length:,}", str(c.sp), f"{c.per_rank:,}", tiled_text(r), peak_text(r),
             fmt(r.tokens_per_s, ",.0f"), fmt(r.step_s, ".1f"), str(r.timed), f"{r.seconds:.0f}",
             fmt(r.others_cpu, ".0%"), status_text(r)]
            for r in results if (c := r.case).length in lengths and c.default]
    return table(["max_length", "SP", "tokens / rank", "tiled MLP", "peak RSS GiB / rank: rank 0 (others)",
                  "tokens/s", "s / timed step", "timed steps", "run s", "others' CPU", "status"],
                 "rrrlrrrrrrl", rows)


def growth_table(results: list[Result], lengths: list[int]) -> str:
    """Per-rank peak added from each length to the next, SP=2 beside SP=1."""
    by = {(r.case.length, r.case.sp): r for r in results if r.case.default and r.ok}
    rows = []
    for a, b in zip(lengths, lengths[1:]):
        if all((n, sp) in by for n in (a, b) for sp in (1, 2)):
            grow = {sp: by[(b, sp)].peak_gib - by[(a, sp)].peak_gib for sp in (1, 2)}
            tiled = {sp: "/".join("on" if by[(n, sp)].tiled_on else "off" for n in (a, b)) for sp in (1, 2)}
            rows.append([f"{kib(a)} -> {kib(b)}", f"{grow[1]:.2f} ({tiled[1]})",
                         f"{grow[2]:.2f} ({tiled[2]})", f"{grow[2] / grow[1]:.2f}"])
    return table(["length", "peak added, SP=1 GiB (tiled MLP)", "peak added per rank, SP=2 GiB (tiled MLP)",
                  "SP=2 / SP=1"], "lrrr", rows) if rows else ""


def cap_points(results: list[Result], lengths: list[int], sp: int, cap: float):
    """Along the doubling ``lengths`` (defaults): the last (length, peak) under ``cap`` before the first one
    over it, that one, and the length that a straight line between them puts at the cap."""
    by = {r.case.length: r for r in results if r.case.default and r.case.sp == sp}
    fits = over = None
    for n in lengths:
        if (r := by.get(n)) is None:
            continue
        if r.ok and r.peak_gib <= cap:
            fits = (n, r.peak_gib)
        else:
            over = (n, r.peak_gib if r.ok else None)
            break
    line = None
    if fits and over and over[1] is not None:
        (n0, p0), (n1, p1) = fits, over
        line = n0 + (cap - p0) / (p1 - p0) * (n1 - n0)
    return fits, over, line


def check_length(fits, over, line) -> Optional[int]:
    """The bisection run: the interpolated length rounded down to a multiple of 512, if strictly between."""
    n = int(line) // 512 * 512 if line else None
    return n if n and fits[0] < n < over[0] else None


def cap_table(results: list[Result], lengths: list[int], sps: list[int], caps: list[float]) -> str:
    by = {(r.case.length, r.case.sp): r for r in results if r.case.default}
    rows = []
    for cap in caps:
        for sp in sps:
            cells = ["–" if (r := by.get((n, sp))) is None else f"{r.peak_gib:.2f}" if r.ok else r.status
                     for n in lengths]
            fits, over, line = cap_points(results, lengths, sp, cap)
            estimate = f"~{line:,.0f}" if line else (f"≥ {fits[0]:,}" if fits and not over else "–")
            check = "–"
            if (n := check_length(fits, over, line)) and (r := by.get((n, sp))):
                verdict = "fits" if r.ok and r.peak_gib <= cap else "over"
                check = f"{n:,}: {r.peak_gib:.2f} GiB, {verdict}" if r.ok else f"{n:,}: {r.status}"
            longest = f"{fits[0]:,}" if fits else f"< {lengths[0]:,}"
            rows.append([str(sp), *cells, f"{cap:g}", longest, estimate, check])
    return table(["SP", *map(kib, lengths), "cap GiB", "longest doubling length under it", "interpolated",
                  "check run at that length"], "r" * (len(lengths) + 4) + "l", rows)


def split_table(results: list[Result], lengths: list[int], sps: list[int]) -> str:
    """Per allocator setting and SP size: peak per rank, that above the base run's, and the bytes autograd
    saved in a forward."""
    by = {(r.case.malloc, r.case.length, r.case.sp): r for r in results
          if r.case.chunk == SPLIT_CHUNK and r.ok}
    rows = []
    for malloc in (0, SPLIT_MALLOC):
        for n in (SPLIT_BASE, *lengths):
            if not any((malloc, n, sp) in by for sp in sps):
                continue
            cells, above, saved = [], {}, {}
            for sp in sps:
                if (r := by.get((malloc, n, sp))) is None:
                    cells += ["–"] * 3
                    continue
                base = by.get((malloc, SPLIT_BASE, sp))
                above[sp] = r.peak_gib - base.peak_gib if base and n != SPLIT_BASE else None
                saved[sp] = max(r.saved_gib) if r.saved_gib else None
                cells += [peak_text(r), "(base)" if n == SPLIT_BASE else fmt(above[sp], ".2f"),
                          fmt(saved[sp], ".3f")]
            for what in (above, saved):
                cells += [f"{what[sp] / what[sps[0]]:.2f}" if what.get(sp) and what.get(sps[0]) else "–"
                          for sp in sps[1:]]
            allocator = f"mmap from {malloc // 1024} KiB" if malloc else "glibc's default"
            rows.append([allocator, f"{n:,}", *cells])
    header = [h for sp in sps
              for h in (f"SP={sp}: peak GiB / rank", "above base", "autograd-saved GiB / rank")]
    ratios = [f"SP={sp} / SP={sps[0]}: {what}" for what in ("above base", "saved") for sp in sps[1:]]
    return table(["allocator", "max_length", *header, *ratios], "l" + "r" * (1 + 3 * len(sps) + len(ratios)),
                 rows)


def variant_table(results: list[Result], length: int, sp: int) -> str:
    runs = {(r.case.tiled, r.case.ac): r for r in results if r.case.length == length and r.case.sp == sp
            and r.case.tiled in ("true", "false") and not r.case.chunk}
    base, rows = runs.get(("false", False)), []
    for key in (("false", False), ("true", False), ("false", True), ("true", True)):
        if (r := runs.get(key)) is None:
            continue
        both = r.ok and base is not None and base.ok
        memory = f"{r.peak_gib - base.peak_gib:+.2f}" if both else "–"
        speed = f"{r.tokens_per_s / base.tokens_per_s - 1:+.0%}" if both else "–"
        rows.append([key[0], str(key[1]).lower(), peak_text(r), memory, fmt(r.tokens_per_s, ",.0f"), speed,
                     fmt(r.step_s, ".1f"), fmt(r.others_cpu, ".0%"), status_text(r)])
    return table(["tiled MLP", "activation checkpointing", "peak RSS GiB / rank: rank 0 (others)",
                  "vs neither GiB", "tokens/s", "vs neither", "s / timed step", "others' CPU", "status"],
                 "llrrrrrrl", rows)


def threshold_table(results: list[Result], pairs: list[tuple[int, int]]) -> str:
    rows = []
    for length, sp in sorted(pairs, key=lambda p: p[0] // p[1]):
        runs = {r.case.tiled: r for r in results if r.case.length == length and r.case.sp == sp
                and not r.case.ac and not r.case.chunk}
        auto = runs.get("auto")
        off = runs.get("false") or (auto if auto and not auto.tiled_on else None)
        on = runs.get("true") or (auto if auto and auto.tiled_on else None)
        if not (off and on):
            continue
        if off.ok and on.ok:
            saves, cost = off.peak_gib - on.peak_gib, 1 - on.tokens_per_s / off.tokens_per_s
            saved, costs = f"{saves:.2f} GiB ({saves / off.peak_gib:.0%})", f"{cost:+.0%}"
        else:
            at_least = max(off.rank_hwm_gib, default=0) - on.peak_gib if on.ok else None
            saved, costs = (f"≥ {at_least:.2f} GiB" if at_least else "–"), "–"
        rows.append([f"{-(-length // sp):,}", f"{kib(length)}, SP={sp}", peak_text(off) if off.ok else
                     f"{peak_text(off)}, {off.status}", peak_text(on), saved, fmt(off.tokens_per_s, ",.0f"),
                     fmt(on.tokens_per_s, ",.0f"), costs])
    return table(["tokens / rank", "max_length, SP", "peak GiB untiled", "peak GiB tiled", "tiling saves",
                  "tokens/s untiled", "tokens/s tiled", "tiling costs (tokens/s)"], "rlrrrrrr", rows)


def gpu_table(results: list[Result], dry_run: bool) -> str:
    rows = [[f"{c.length:,}", str(c.sp), f"{c.per_rank:,}",
             tiled_text(r) if r.status != "not run" else c.tiled, str(c.ac).lower(),
             fmt(r.peak_gib if dry_run else r.device_peak_gib, ".2f"),
             fmt(r.tokens_per_s, ",.0f"), fmt(r.step_s, ".2f"), f"{r.seconds:.0f}", status_text(r)]
            for r in results for c in [r.case]]
    memory = "peak RSS GiB, rank 0 (dry run: host)" if dry_run else "device peak GiB (rank 0)"
    return table(["max_length", "SP", "tokens / rank", "tiled MLP", "activation checkpointing", memory,
                  "tokens/s", "s / timed step", "run s", "status"], "rrrllrrrrl", rows)


# ----------------------------------------------------------------------------------------------- driver

def cpu_plan(args) -> tuple[list[Case], dict, list]:
    """The runs, the explicit cases that a default run stands for (``tiled_mlp=auto`` resolving to the same
    setting), and the (length, SP) pairs that the tiling table compares."""
    from sftdist.engine.tiling import wanted

    cases: list[Case] = []

    def add(case: Case) -> None:
        if case not in cases:
            cases.append(case)

    for n in sorted({*args.lengths, *([] if args.no_cap else args.cap_lengths)}):
        for sp in args.sp:
            add(Case(n, sp, "auto", False))
    for n in ([] if args.no_split else [SPLIT_BASE, *args.split_lengths]):
        for sp in args.sp:
            add(Case(n, sp, "true", False, SPLIT_CHUNK))
    for n in ([] if args.no_split else [SPLIT_BASE, max(args.split_lengths)]):
        for sp in args.sp:
            add(Case(n, sp, "true", False, SPLIT_CHUNK, SPLIT_MALLOC))
    pairs = [] if args.no_threshold else [tuple(int(x) for x in t.split(":")) for t in args.threshold]
    for n, sp in pairs:
        add(Case(n, sp, "true", False))
        add(Case(n, sp, "false", False))
    if not args.no_variants:
        for tiled in ("false", "true"):
            for ac in (False, True):
                add(Case(args.variant_length, args.variant_sp, tiled, ac))
        pairs.append((args.variant_length, args.variant_sp))
    aliases = {c: Case(c.length, c.sp, "auto", c.ac, c.chunk) for c in cases if c.tiled != "auto"
               and wanted("auto", c.per_rank) == (c.tiled == "true") and Case(c.length, c.sp, "auto", c.ac,
                                                                              c.chunk) in cases}
    cases = [c for c in cases if c not in aliases]
    # the main table first (a spent --budget-min cuts the extras), then by length
    cases.sort(key=lambda c: (not (c.length in args.lengths and c.default), c.malloc, c.length, c.sp, c.tiled,
                              c.ac, c.chunk))
    return cases, aliases, pairs


def others_busy(seconds: float) -> float:
    """Share of the machine's CPUs busy over ``seconds`` (nothing of this benchmark runs meanwhile)."""
    b0 = _busy_cpu_s()
    time.sleep(seconds)
    return (_busy_cpu_s() - b0) / (seconds * (os.cpu_count() or 1))


def run_all(mode: Mode, cases: list[Case], args, work: Path, persist=lambda results: None) -> list[Result]:
    """Run ``cases`` in order; ``persist`` gets the results so far after each run."""
    results, prepared, oom_from, start, last = [], {}, {}, time.time(), 0.0
    for i, case in enumerate(cases):
        variant = (case.tiled, case.ac)
        if variant in oom_from and mode.name == "gpu":
            results.append(Result(case, "not run", f"OOM at {oom_from[variant]:,}"))
            continue
        # on a device, a run that would end past the budget does not start (the last run's time as its guess)
        if time.time() - start + (last if mode.name == "gpu" else 0) > args.budget_min * 60:
            results.append(Result(case, "not run", f"--budget-min {args.budget_min:g} spent"))
            continue
        if case.length not in prepared:
            prepared[case.length] = prepare(mode, case.length, work)
        data, seed = prepared[case.length]
        quiet_by = time.monotonic() + args.quiet_wait  # a run started in others' burst is slowed throughout
        while args.quiet_wait and others_busy(2.0) > 0.25 and time.monotonic() < quiet_by:
            pass
        r = run_case(mode, case, data=data, seed=seed, work=work, timeout_s=args.case_timeout,
                     rank_limit_gib=args.rank_limit_gib)
        oom_from.update({variant: case.length} if r.status == "OOM" else {})
        last = r.seconds
        results.append(r)
        persist(results)
        print(f"[{i + 1}/{len(cases)} {time.time() - start:5.0f}s] {case.label():45s} {r.status:8s} peak "
              f"{peak_text(r)} GiB  dev {fmt(r.device_peak_gib, '.2f')}  "
              f"tok/s {fmt(r.tokens_per_s, ',.0f')}  run {r.seconds:.0f}s  "
              f"others {fmt(r.others_cpu, '.0%')}  {r.note}", file=sys.stderr, flush=True)
    return results


def load_saved(path: Path) -> dict:
    saved = json.loads(path.read_text())
    saved["results"] = [Result(**{**r, "case": Case(**r["case"])}) for r in saved["results"]]
    saved["started"] = dt.datetime.fromisoformat(saved["started"])
    return saved


def measure(mode: Mode, cases: list[Case], args, command: str) -> dict:
    """Run ``cases`` (with ``--reuse``: those the ``--save`` file lacks) and return the run record."""
    t0 = time.time()
    record = {"started": dt.datetime.now(dt.timezone.utc), "wall": 0.0, "load0": os.getloadavg()[0],
              "command": command, "results": [], "machine": machine() if mode.name == "cpu" else ""}
    if args.reuse and args.save and args.save.exists():  # one benchmark in several sittings
        record = load_saved(args.save)
        record["command"] += f"` and `{command}"
    keep = [r for r in record["results"] if r.status in MEASURED
            and not (args.rerun_contended and r.ok and (r.others_cpu or 0) > CONTENDED)]
    wall0 = record["wall"]

    def union(new: list[Result]) -> list[Result]:  # a contended run stays until its rerun replaces it
        fresh = {r.case for r in keep + new}
        return keep + new + [r for r in record["results"] if r.case not in fresh]

    def persist(new: list[Result]) -> None:
        if args.save:
            args.save.write_text(json.dumps(
                {**record, "started": record["started"].isoformat(), "wall": wall0 + time.time() - t0,
                 "results": [dataclasses.asdict(r) for r in union(new)]}, indent=1))

    with tempfile.TemporaryDirectory(prefix="sequence_parallel-") as tmp:
        new = run_all(mode, [c for c in cases if c not in {r.case for r in keep}], args, Path(tmp), persist)
        if args.bisect and mode.name == "cpu" and not args.no_cap:  # the lengths the runs above point to
            checks = [Case(n, sp, "auto", False) for sp in args.sp
                      if (n := check_length(*cap_points(union(new), args.cap_lengths, sp, args.cap_gib[0])))]
            done = {r.case for r in keep + new}
            new += run_all(mode, [c for c in checks if c not in done], args, Path(tmp),
                           lambda more: persist(new + more))
    persist(new)
    return {**record, "wall": wall0 + time.time() - t0, "results": union(new)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the device version: Qwen2.5-0.5B shape, bf16")
    ap.add_argument("--cpu-dry-run", action="store_true", help="with --gpu: a tiny model and lengths, on CPU")
    ap.add_argument("--nproc", type=int, help="--gpu: processes = SP size (default: visible GPUs; dry run 1)")
    ap.add_argument("--variants", default="auto:off,false:off,true:on",
                    help="--gpu: tiled_mlp:activation_checkpointing pairs, comma-separated")
    ap.add_argument("--lengths", type=int, nargs="+", help="max_length of the main table")
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2], help="CPU: SP sizes")
    ap.add_argument("--cap-gib", type=float, nargs="+", default=[4.0, 7.0], help="CPU: per-rank memory caps")
    ap.add_argument("--cap-lengths", type=int, nargs="+", default=[2 * K, 4 * K, 8 * K, 16 * K, 32 * K])
    ap.add_argument("--no-cap", action="store_true", help="CPU: only the main table's lengths")
    ap.add_argument("--bisect", action="store_true", help="CPU: run each SP at the first cap's interpolation")
    ap.add_argument("--split-lengths", type=int, nargs="+", default=[8 * K, 16 * K],
                    help=f"CPU: lengths of the tiled, loss_chunk_tokens={SPLIT_CHUNK} probe runs")
    ap.add_argument("--no-split", action="store_true", help="CPU: skip those runs")
    ap.add_argument("--variant-length", type=int, default=16 * K)
    ap.add_argument("--variant-sp", type=int, default=2)
    ap.add_argument("--no-variants", action="store_true", help="CPU: skip the tiled MLP x checkpointing runs")
    ap.add_argument("--threshold", nargs="+", default=[f"{2 * K}:1", f"{8 * K}:2", f"{32 * K}:2"],
                    help="CPU: max_length:SP pairs run both tiled and untiled")
    ap.add_argument("--no-threshold", action="store_true", help="CPU: skip them")
    ap.add_argument("--rank-limit-gib", type=float, help="stop a run once a rank's RSS passes this (an OOM)")
    ap.add_argument("--budget-min", type=float, help="start no run after this many minutes (GPU 4.5, CPU 90)")
    ap.add_argument("--quiet-wait", type=float,
                    help="before each run, wait up to this many seconds for others to leave the CPUs "
                         "(CPU: 60, GPU: 0)")
    ap.add_argument("--case-timeout", type=float, help="seconds per run (GPU: 240, CPU: 1500)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="folder with tokenizers/ and datasets/")
    ap.add_argument("--no-results", action="store_true", help="print the tables only; leave RESULTS.md alone")
    ap.add_argument("--save", type=Path, help="write every run's numbers to this JSON file (after each run)")
    ap.add_argument("--reuse", action="store_true", help="with --save: run only what the file lacks")
    ap.add_argument("--rerun-contended", action="store_true",
                    help=f"with --reuse: also rerun runs in which others used > {CONTENDED:.0%}% of the CPUs")
    ap.add_argument("--load", type=Path, help="render the tables from a --save file instead of running")
    ap.add_argument("--probe-worker", type=Path, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.probe_worker:
        return probe_worker(args.probe_worker, [a for a in rest if a != "--"])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cpu_dry_run and not args.gpu:
        ap.error("--cpu-dry-run goes with --gpu")
    if args.nproc is not None and not args.gpu:
        ap.error("--nproc goes with --gpu (CPU mode: --sp)")
    args.no_results |= args.cpu_dry_run  # a check, not a measurement
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: kills the run in flight, removes tmp
    corpus = tuple(args.shared / c for c in CORPUS)
    if args.gpu:
        if not args.cpu_dry_run:
            import torch

            if not torch.cuda.is_available():
                sys.exit("--gpu needs a visible GPU (or --cpu-dry-run)")
        args.nproc = args.nproc or (1 if args.cpu_dry_run else torch.cuda.device_count())
        args.lengths = args.lengths or ([256, 512, 1024] if args.cpu_dry_run
                                        else [8 * K, 32 * K, 64 * K, 128 * K])
        args.budget_min = 4.5 if args.budget_min is None else args.budget_min
        args.quiet_wait = args.quiet_wait or 0.0
        args.case_timeout = args.case_timeout or 240
        mode = Mode("gpu", TINY if args.cpu_dry_run else QWEN_05B, args.shared / "tokenizers" / "qwen2",
                    corpus, "fp32" if args.cpu_dry_run else "bf16")
        cases = [Case(n, args.nproc, v.split(":")[0], v.split(":")[1] == "on")
                 for n in args.lengths for v in args.variants.split(",")]
        aliases, pairs = {}, []
    else:
        args.lengths = args.lengths or [2 * K, 8 * K, 32 * K]
        args.budget_min = 90 if args.budget_min is None else args.budget_min
        args.quiet_wait = 60.0 if args.quiet_wait is None else args.quiet_wait
        args.case_timeout = args.case_timeout or 1500
        mode = Mode("cpu", SMALL, args.shared / "tokenizers" / "llama2-sentencepiece", corpus, "fp32")
        cases, aliases, pairs = cpu_plan(args)
    if missing := [p for p in [mode.tokenizer, *corpus] if not p.exists()]:
        sys.exit(f"missing {', '.join(map(str, missing))} (../shared beside the checkout, or --shared)")
    command = "python bench/sequence_parallel.py" + "".join(f" {a}" for a in sys.argv[1:])
    record = load_saved(args.load) if args.load else measure(mode, cases, args, command)
    results = sorted(record["results"], key=lambda r: (r.case.malloc, r.case.length, r.case.sp, r.case.tiled,
                                                       r.case.ac, r.case.chunk))
    by = {r.case: r for r in results}
    results += [dataclasses.replace(by[auto], case=c) for c, auto in aliases.items() if auto in by]
    section = (gpu_section if args.gpu else cpu_section)(results, args, record, pairs)
    print(section)
    if not args.no_results:
        write_results(section, begin=MARKERS[mode.name][0], end=MARKERS[mode.name][1])
        print(f"updated {BENCH / 'RESULTS.md'}", file=sys.stderr)


def cpu_section(results: list[Result], args, record: dict, pairs: list) -> str:
    lengths = sorted({*args.lengths, *([] if args.no_cap else args.cap_lengths)})
    parts = [f"""## Sequence parallelism (bench/sequence_parallel.py)

Run {record['started']:%Y-%m-%d %H:%M} UTC: `{record['command']}`
(total wall time {record['wall'] / 60:.1f} min; load average {record['load0']:.2f} at start).

{record.get('machine') or machine()}
- Model: the small bench preset from config (Llama, hidden 512, 8 layers, 8 / 4 heads, FFN 1376, untied
  embeddings, vocabulary 32,000 of `llama2-sentencepiece`: 56.0M parameters), random init, fp32, ZeRO-2,
  DeepSpeed's AdamW. SP=1: one process, 2 threads; SP=2: `torchrun --nproc_per_node 2`, 1 thread per rank,
  DP=1. Micro-batch 1 = global batch 1, packed rows, `train.loss_chunk_tokens` 8192 unless said otherwise.
- Rows: one document of exactly `max_length` tokens each, a distinct window of the wiki demo / tiny
  Shakespeare text as the assistant reply (truncated to the row). Each run's first step is a short
  (~80-token) conversation, put first through the seed: it allocates Adam's states and warms up. The timed
  steps after it are full rows: 2 up to 4k, 1 from 8k (a 32k step takes ~5 min here).
- peak RSS: rank 0's `mem/host_peak_rss_gib` after the last step (its peak resident set since start-up,
  data stage included); in brackets, the other ranks' `VmHWM` read from `/proc` until they exit (their
  export of `final/` included); "≥ X": a run stopped at X. tokens/s = the timed steps' tokens / their
  `step_time_s` (a row's tokens count once per SP group). others' CPU = share of the 2 CPUs that other
  processes used during the run (`/proc/stat`; the machine is shared: above ~20% a run is slowed).
- tiled MLP: `auto` tiles from 8,192 tokens per rank (`max_length / SP`); the tables say what it chose.

### Per-rank memory and throughput by length and SP size (defaults: `tiled_mlp=auto`, no checkpointing)

{sp_table(results, lengths)}
"""]
    if growth := growth_table(results, lengths):
        parts.append("Per-rank peak added from one length to the next (the runtime and the model states "
                     "cancel: activations, and the loss's logits while a rank's rows fit one 8,192-row "
                     "chunk, which sftdist then keeps through backward instead of recomputing):\n\n"
                     f"{growth}\n")
    if not args.no_cap:
        bisect = "" if args.bisect else " (`--bisect`)"
        parts.append(f"""### Longest length under a per-rank memory cap (peak RSS GiB / rank)

Per cap and SP size, from the runs above: the longest doubling length whose rank-0 peak stays under the cap,
a straight line between it and the next length (an estimate), and{bisect} a run at that estimate rounded
down to a multiple of 512, for the first cap.

{cap_table(results, args.cap_lengths, args.sp, args.cap_gib)}
""")
    if not args.no_split:
        parts.append(f"""### What SP=2 divides

Every run here has `parallelism.tiled_mlp=true` and `train.loss_chunk_tokens={SPLIT_CHUNK}` (the LM head's
fp32 `[chunk, 32000]` logits stay small at every length and SP size) and goes through a worker that wraps
`sftdist.train.run`: "autograd-saved" is the most that `torch.autograd.graph.saved_tensors_hooks` saw the
decoder's forward (the engine's, without the LM head and loss) keep for backward on a rank, each storage
counted once; "above base" subtracts the same SP size's run of {SPLIT_BASE}-token rows (runtime, model
states, their allocator slack). The second block runs with `MALLOC_MMAP_THRESHOLD_={SPLIT_MALLOC}`: glibc
then maps every allocation from {SPLIT_MALLOC // 1024} KiB on its own and returns it when freed, so the
resident set follows the live tensors (by default freed heap memory stays resident, and the threshold for
mapping grows to 32 MiB, so a tensor half as large, as under SP=2, can stay in the heap where SP=1's is
returned).

{split_table(results, args.split_lengths, args.sp)}
""")
    if not args.no_variants:
        parts.append(f"""### Tiled MLP and activation checkpointing at {kib(args.variant_length)}, \
SP={args.variant_sp} ({-(-args.variant_length // args.variant_sp):,} tokens per rank)

{variant_table(results, args.variant_length, args.variant_sp)}
""")
    if pairs:
        parts.append(f"""### What tiling saves and costs by tokens per rank (no checkpointing)

{threshold_table(results, pairs)}
""")
    if skipped := [r for r in results if r.status == "not run"]:
        parts.append("Not run: " + "; ".join(f"{r.case.label()} ({r.note})" for r in skipped) + "\n")
    return "\n".join(parts)


def gpu_section(results: list[Result], args, record: dict, pairs: list) -> str:
    import torch
    import transformers

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    device = "CPU dry run (no GPU)" if args.cpu_dry_run else \
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    model = ("a tiny qwen2 from config (hidden 128, 4 layers), fp32 on CPU: a check of the GPU mode, not a "
             "measurement") if args.cpu_dry_run else ("the Qwen2.5-0.5B shape from config (hidden 896, 24 "
                                                      "layers, 14 / 2 heads, FFN 4864, tied embeddings, the "
                                                      "qwen2 tokenizer's vocabulary), bf16, ZeRO-2")
    return f"""## Sequence parallelism on a GPU (bench/sequence_parallel.py --gpu\
{', CPU dry run' if args.cpu_dry_run else ''})

Run {record['started']:%Y-%m-%d %H:%M} UTC: `{record['command']}` (total wall time {record['wall']:.0f} s).

- Machine: {device}, {os.cpu_count()} CPUs, {platform.platform()}.
- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers \
{transformers.__version__}; sftdist at {commit}.
- Model: {model}. SP = {args.nproc} process(es), DP=1, micro-batch 1 = global batch 1, packed
  single-document rows, a short first step, then 1 timed full row per run. A variant that ran out of memory
  is not tried at longer lengths; no run starts that would end past {args.budget_min:g} min (the last run's
  time as the guess).

{gpu_table(results, args.cpu_dry_run)}
"""


if __name__ == "__main__":
    main()
