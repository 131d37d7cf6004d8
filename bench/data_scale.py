"""The data stage at 10k, 100k and 1M conversations: preparation time, memory, cache size and a 2-rank start.

Corpus (written once per size and seed under ``bench/.data_scale/``, deterministic): three JSONL sources from
the shared sets, 60% multi-turn chat (``format: messages``, turns of ``llamafactory_kto_en_demo.json``, ``label``
dropped), 20% tool use (``format: sharegpt`` with ``tools``, ``llamafactory_glaive_toolcall_en_demo.json``) and
20% generic text (``format: text``, ``llamafactory_c4_demo.jsonl``, sentences of the wiki demo). Each record
takes a real record's shape and recombines real content: a chat record has a real record's number of turns,
each a user/assistant pair of a random real record; a tool record keeps a real record's tools and tool-call
exchanges and takes its other exchanges from other records; a document is a real one. In every message and
document of two or more sentences, one sentence in five (at least one) is swapped for a random real sentence
of the same role, so records are distinct and lengths stay those of the real sets (``--stats`` compares them).

Per size, each phase runs in a fresh process with ``--budget`` seconds (``> N`` when it runs out):

* ``prepare``: ``prepare_all(cfg.data, tokenizer, ...)`` into a fresh ``data.cache_dir``: seconds, records/s,
  peak RSS (``VmHWM``) of the process (and what it added to the RSS at the start) and of its largest worker
  (``RUSAGE_CHILDREN``), the cache's size;
* ``warm``: what every rank does before training: ``prepare_all`` (finds the cache), ``build_datasets(...,
  dirs=dirs)`` (load + mask audit) and ``build_schedule``: seconds and peak RSS;
* ``start``: ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m sftdist.train`` on the warm
  cache, ``train.max_steps=1``: seconds from launch to the first step's metrics, each rank's RSS then (what
  it holds on to) and its peak RSS (``VmHWM``), read from ``/proc`` every 0.1 s.

``(Nx)`` = the value over the first row's: time should follow the size, memory stay at 1.0x. With
``--streaming`` every source gets ``streaming: true`` in a table of its own (``streaming_case``: the data path
of one rank alone, a resume at 90% of a pass, a 2-rank run). Usage (repository root, project venv; all three
sizes with ``--streaming --stats`` took 25 min on 2 cores at 5e80823, 17 of them preparing 1M)::

    nice -n 10 .venv/bin/python bench/data_scale.py --sizes 10000,100000 --stats --no-results
    .venv/bin/python bench/data_scale.py                     # 10k, 100k, 1M; updates bench/RESULTS.md
    # another checkout's sftdist (e.g. `git archive HEAD | tar -x -C /tmp/base`):
    PYTHONPATH=/tmp/base .venv/bin/python bench/data_scale.py --no-results
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SHARED = BENCH.parent.parent / "shared"
WORK = BENCH / ".data_scale"  # corpora (kept), caches and run directories (removed); in bench/.gitignore
BEGIN, END = "<!-- data_scale:begin -->", "<!-- data_scale:end -->"
SHARES = {"chat": 0.6, "tools": 0.2, "text": 0.2}  # of the records, and the mix weights
FORMATS = {"chat": "messages", "tools": "sharegpt", "text": "text"}
GENERATOR = 1  # bump when the corpus changes: corpora of another version are rebuilt
MIB = 2**20
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")

# ------------------------------------------------------------------------------------------------ corpus


def real_records(shared: Path) -> dict[str, list[dict]]:
    """The real sets as the corpus's three sources (kto's ``label`` dropped)."""
    d = shared / "datasets"
    kto = json.loads((d / "llamafactory_kto_en_demo.json").read_text())
    glaive = json.loads((d / "llamafactory_glaive_toolcall_en_demo.json").read_text())
    c4 = [json.loads(line) for line in (d / "llamafactory_c4_demo.jsonl").read_text().splitlines() if line]
    return {"chat": [{"messages": r["messages"]} for r in kto], "tools": glaive, "text": c4}


def sentences(texts) -> list[str]:
    return [s for t in texts for s in SENTENCE.split(t) if s.strip()]


def exchanges(conversation: list[dict]) -> list[list[dict]]:
    """A ShareGPT conversation cut before each human turn."""
    out: list[list[dict]] = []
    for turn in conversation:
        if turn["from"] == "human" or not out:
            out.append([])
        out[-1].append(turn)
    return out


class Recombiner:
    """Draws realistic records from the real ones (see the module docstring); ``chat``, ``tools``, ``text``."""

    def __init__(self, shared: Path):
        self.real = real_records(shared)
        self.pairs = [r["messages"][i:i + 2] for r in self.real["chat"] for i in range(0, len(r["messages"]), 2)]
        self.exchanges = [exchanges(r["conversations"]) for r in self.real["tools"]]
        self.plain = [e for ex in self.exchanges for e in ex if {t["from"] for t in e} <= {"human", "gpt"}]
        turns = [t for ex in self.exchanges for e in ex for t in e]
        wiki = (shared / "datasets" / "llamafactory_wiki_demo.txt").read_text().splitlines()
        self.pool = {role: sentences(m["content"] for p in self.pairs for m in p if m["role"] == role)
                     for role in ("user", "assistant")}
        self.pool |= {role: sentences(t["value"] for t in turns if t["from"] == role) for role in ("human", "gpt")}
        self.pool["text"] = sentences([d["text"] for d in self.real["text"]] + wiki)

    def vary(self, text: str, role: str, rng: random.Random) -> str:
        parts = SENTENCE.split(text)
        if len(parts) < 2:
            return text
        for i in rng.sample(range(len(parts)), max(1, len(parts) // 5)):
            parts[i] = rng.choice(self.pool[role])
        return " ".join(parts)

    def chat(self, rng: random.Random) -> dict:
        turns = len(rng.choice(self.real["chat"])["messages"]) // 2
        return {"messages": [{"role": m["role"], "content": self.vary(m["content"], m["role"], rng)}
                             for _ in range(turns) for m in rng.choice(self.pairs)]}

    def tools(self, rng: random.Random) -> dict:
        i, conversation = rng.randrange(len(self.exchanges)), []
        for e in self.exchanges[i]:
            e = rng.choice(self.plain) if {t["from"] for t in e} <= {"human", "gpt"} else e
            conversation += [{"from": t["from"], "value": self.vary(t["value"], t["from"], rng)
                              if t["from"] in ("human", "gpt") else t["value"]} for t in e]
        return {"conversations": conversation, "tools": self.real["tools"][i].get("tools", "")}

    def text(self, rng: random.Random) -> dict:
        return {"text": self.vary(rng.choice(self.real["text"])["text"], "text", rng)}


def build_corpus(n: int, seed: int, shared: Path) -> Path:
    """Write (or find) the corpus of ``n`` records: one JSONL file per source, and meta.json last."""
    root = WORK / f"corpus-{n}-seed{seed}"
    meta = root / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("generator") == GENERATOR:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    gen, start, info = Recombiner(shared), time.perf_counter(), {"generator": GENERATOR, "sources": {}}
    counts = {"chat": round(n * SHARES["chat"]), "tools": round(n * SHARES["tools"])}
    counts["text"] = n - sum(counts.values())
    for name, count in counts.items():
        rng, seen = random.Random(f"{seed}:{name}"), set()
        with (root / f"{name}.jsonl").open("w") as f:
            for _ in range(count):
                line = json.dumps(getattr(gen, name)(rng), ensure_ascii=False)
                seen.add(hashlib.blake2b(line.encode(), digest_size=8).digest())
                f.write(line + "\n")
        size = (root / f"{name}.jsonl").stat().st_size
        info["sources"][name] = {"records": count, "distinct": len(seen), "bytes": size}
    info["seconds"] = time.perf_counter() - start
    meta.write_text(json.dumps(info, indent=1))
    return root


def write_real(shared: Path) -> Path:
    """The real sets in the corpus's layout (``--stats``: the same pipeline on the originals)."""
    root = WORK / "real"
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in real_records(shared).items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return root


def overrides(corpus: Path, cache: Path, args, *, streaming: bool = False, max_length: int = 0) -> list[str]:
    """The Hydra overrides of every phase: the training run's tokenizer, max_length and cache."""
    flag = ", streaming: true" if streaming else ""
    sources = ", ".join(f"{{name: {n}, path: '{corpus / (n + '.jsonl')}', format: {FORMATS[n]}, weight: {w}"
                        f"{flag}}}" for n, w in SHARES.items())
    return ["model=tiny", f"model.tokenizer={args.shared / 'tokenizers' / 'qwen2'}",
            f"model.chat_template={args.shared / 'chat_templates' / args.chat_template}",
            f"train.max_length={max_length or args.max_length}", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.warmup_steps=0", "logging.log_every=1", f"data.sources=[{sources}]",
            f"data.packing={str(args.packing).lower()}", f"data.num_proc={args.workers}",
            "data.on_bad_record=skip", f"data.cache_dir={cache}"]


# ------------------------------------------------------------------------------------------------ worker side

def status_kib(field: str, pid: object = "self") -> int:
    try:
        return int(next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if ln.startswith(field + ":")).split()[1])
    except (OSError, StopIteration):
        return 0


def percentiles(values: list[int]) -> dict:
    """Mean, median and 99th percentile of sample lengths."""
    v = sorted(values)
    return {"n": len(v), "mean": sum(v) / len(v), "p50": v[len(v) // 2], "p99": v[int(len(v) * 0.99)]}


def worker(phase: str, ovr: list[str]) -> None:
    """One phase (``prepare``, ``warm`` or ``stats``) in this fresh process; prints one JSON line."""
    import resource

    import datasets

    from sftdist.config import compose_config
    from sftdist.data.build import build_datasets, build_schedule, prepare_all
    from sftdist.engine.model import load_tokenizer

    datasets.disable_progress_bars()
    cfg = compose_config(ovr)
    tok, t = load_tokenizer(cfg.model), cfg.train
    out: dict = {"rss_before_mib": status_kib("VmRSS") / 1024}
    cpu, start = os.times(), time.perf_counter()
    dirs = prepare_all(cfg.data, tok, max_length=t.max_length, seed=t.seed)
    out["prepare_s"] = time.perf_counter() - start
    if phase == "stream":
        out.update(stream_worker(cfg, tok, dirs))
    elif phase == "prepare":
        stats = [json.loads((d / "stats.json").read_text()) for d in dirs]
        out.update(records=sum(s["records"] for s in stats), kept=sum(s["kept"] for s in stats),
                   cpu_s=sum(os.times()[:4]) - sum(cpu[:4]))
    else:
        start = time.perf_counter()
        data = build_datasets(cfg.data, tok, max_length=t.max_length, seed=t.seed, dirs=dirs)
        out["load_s"], start = time.perf_counter() - start, time.perf_counter()
        schedule = build_schedule(data, cfg.data, seed=t.seed, global_batch_size=t.global_batch_size,
                                  max_length=t.max_length)
        out.update(schedule_s=time.perf_counter() - start, rows=schedule.epoch_len)
    out.update(peak_mib=status_kib("VmHWM") / 1024,
               children_peak_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    if phase == "stats":  # after the peak was read
        out["tokens"] = {s.name: percentiles(s.train.with_format("arrow")["num_tokens"].to_pylist())
                         for s in data.sources}
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------ driver side

def code_root() -> Path:
    """The checkout whose ``sftdist`` runs (another one first on ``PYTHONPATH`` to time it): every child's
    working directory, since ``python -m`` puts that first on ``sys.path``."""
    import sftdist

    return Path(sftdist.__file__).resolve().parents[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and its descendants (sftdist ignores SIGTERM; torchrun's ranks have own sessions)."""
    import psutil

    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run_phase(phase: str, ovr: list[str], budget: float) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--worker", phase, "--", *ovr], cwd=code_root(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return {"over": budget}
    if proc.returncode:
        raise SystemExit(f"{phase} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def rank_of(pid: int) -> int | None:
    """The rank a process of the run is (None: the launcher or another process)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"torch.distributed.run" in cmd or b"sftdist.train" not in cmd:
        return None
    return int(next((e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")), b"0"))


def step_rows(metrics: Path) -> list[dict]:
    try:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # not written yet, or a line half written
        return []
    return [r for r in rows if r.get("step", 0) >= 1 and "loss" in r]


def two_rank_start(ovr: list[str], run_dir: Path, budget: float, steps: int = 1) -> dict:
    """A real 2-rank ``torch.distributed.run`` of ``sftdist.train``: per-rank VmHWM, seconds to step 1."""
    import psutil

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sftdist.train", *ovr, f"train.max_steps={steps}", f"output_dir={run_dir}"]
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    start, hwm, first, rss = time.perf_counter(), {0: 0, 1: 0}, None, {0: 0, 1: 0}
    proc = subprocess.Popen(cmd, cwd=code_root(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"})
    while proc.poll() is None:
        if time.perf_counter() - start > budget:
            kill_tree(proc)
            return {"over": budget, "hwm_mib": [hwm[r] / 1024 for r in (0, 1)]}
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        ranks = {r: p.pid for p in tree if (r := rank_of(p.pid)) is not None}
        for r, pid in ranks.items():
            hwm[r] = max(hwm[r], status_kib("VmHWM", pid))
        if first is None and step_rows(run_dir / "metrics.jsonl"):
            first = time.perf_counter() - start
            rss = {r: status_kib("VmRSS", pid) for r, pid in ranks.items()}  # what each rank holds on to
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"2-rank run failed ({proc.returncode}); see {log.name}")
    rows = step_rows(run_dir / "metrics.jsonl")
    return {"first_step_s": first, "wall_s": time.perf_counter() - start, "steps": rows,
            "hwm_mib": [hwm[r] / 1024 for r in (0, 1)], "rss_mib": [rss.get(r, 0) / 1024 for r in (0, 1)],
            # rank 0's peak as it reports it, as a check of the polled one
            "metric_peak_mib": max(r.get("mem/host_peak_rss_gib", 0) for r in rows) * 1024}


def run_size(n: int, args) -> dict:
    corpus = build_corpus(n, args.seed, args.shared)
    meta = json.loads((corpus / "meta.json").read_text())
    cache, run_dir = WORK / f"cache-{n}", WORK / f"run-{n}"
    for p in (cache, run_dir):
        shutil.rmtree(p, ignore_errors=True)
    ovr = overrides(corpus, cache, args)
    row = {"n": n, "corpus_bytes": sum(s["bytes"] for s in meta["sources"].values()), "meta": meta}
    row["prepare"] = run_phase("prepare", ovr, args.budget)
    print(f"{n:,}: prepare {row['prepare']}", file=sys.stderr)
    if "over" not in row["prepare"]:
        row["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        row["warm"] = run_phase("warm", ovr, args.budget)
        print(f"{n:,}: warm {row['warm']}", file=sys.stderr)
        if not args.no_start:
            row["start"] = two_rank_start(ovr, run_dir, args.budget)
            print(f"{n:,}: 2-rank start {row['start'].get('first_step_s')} s, {row['start']['hwm_mib']} MiB",
                  file=sys.stderr)
    if not args.keep_cache:
        for p in (cache, run_dir):
            shutil.rmtree(p, ignore_errors=True)
    return row


# ------------------------------------------------------------------------------------------------ streaming

def has_streaming() -> bool:
    from sftdist.config import DataSource

    return "streaming" in getattr(DataSource, "__dataclass_fields__", {})


STREAM_STEPS = 100  # steps of one rank's data path timed (2 rows of up to max_length each)


def position_at(path: Path, fraction: float) -> dict:
    """A ``RecordReader`` position at ``fraction`` of a JSONL file's bytes (the next line start), in pass 0."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(int(size * fraction))
        f.readline()
        offset = f.tell()
        f.seek(0)
        lines, left = 0, offset
        while left:
            chunk = f.read(min(left, 8 * MIB))
            lines, left = lines + chunk.count(b"\n"), left - len(chunk)
    return {"epoch": 0, "file": 0, "offset": offset, "line": lines, "n": lines, "hub": None}


def stream_worker(cfg, tok, dirs) -> dict:
    """Rank 0 of 2's data path alone (read, tokenise, mix, pack, collate) for ``STREAM_STEPS`` steps, then a
    resume at 90% of a pass: its state with every stream moved to 90% of its file, loaded by a fresh pipeline,
    up to its next step's batches (what a resumed run does after loading the checkpoint)."""
    from sftdist.data.batches import build_batches
    from sftdist.data.build import build_datasets

    t = cfg.train
    data = build_datasets(cfg.data, tok, max_length=t.max_length, seed=t.seed, dirs=dirs)

    def pipeline():
        return build_batches(data, cfg.data, tok, seed=t.seed, global_batch_size=t.global_batch_size,
                             max_length=t.max_length, micro_batch_size=t.micro_batch_size, dp_rank=0, dp_world=2,
                             preview=False)[0]

    batches, tokens, start = pipeline(), 0, time.perf_counter()
    for step in range(STREAM_STEPS):
        tokens += sum(int((b["token_source"] >= 0).sum()) for b in batches.micro_batches(step))
    seconds = time.perf_counter() - start
    samples = sum(sum(f.statuses.values()) for f in batches.mix.feeds)
    state = batches.state_dict()
    for feed, source in zip(state["mix"]["feeds"], cfg.data.sources):
        feed["reader"] = position_at(Path(source.path), 0.9)
    records = sum(feed["reader"]["n"] for feed in state["mix"]["feeds"]) / 2  # this rank's share
    start = time.perf_counter()
    resumed = pipeline()
    resumed.load_state_dict(state)
    resumed.micro_batches(state["step"])
    return {"data_tokens_per_s": tokens / seconds, "records_per_s": samples / seconds,
            "resume_s": time.perf_counter() - start, "replay_s": records / (samples / seconds)}


def streaming_case(n: int, args) -> dict:
    """Every source with ``streaming: true``: the data path of one rank alone (``stream_worker``), then a 2-rank
    run of ``--stream-steps`` steps (steps 2.. give the tokens/s: the first pays for warming up) and its per-rank
    peak RSS."""
    cache, run_dir = WORK / f"cache-stream-{n}", WORK / f"run-stream-{n}"
    for p in (cache, run_dir):
        shutil.rmtree(p, ignore_errors=True)
    ovr = overrides(build_corpus(n, args.seed, args.shared), cache, args, streaming=True)
    alone = run_phase("stream", ovr, args.budget)
    out = two_rank_start(ovr, run_dir, args.budget, steps=args.stream_steps)
    later = out.get("steps", [])[1:]
    out["tokens_per_s"] = sum(r["tokens"] for r in later) / sum(r["step_time_s"] for r in later) if later else None
    for p in (cache, run_dir):
        shutil.rmtree(p, ignore_errors=True)
    return {"n": n, **out, "alone": alone}


# ------------------------------------------------------------------------------------------------ report

def table(rows: list[dict]) -> str:
    """The scale table; ``(Nx)`` = the value over the first row's; ``+N`` = what a phase added to its RSS."""
    lines = [("| conversations | corpus MiB | prepare s | records/s | prepare peak RSS MiB: main, +data / largest "
              "worker | cache MiB | warm start s (find + load & audit + schedule) | warm peak RSS MiB, +data | "
              "2 ranks: s to step 1 | 2 ranks: RSS MiB at step 1, rank 0 / 1 | 2 ranks: peak RSS MiB, rank 0 / 1 |"),
             "|" + "---:|" * 11]
    base: dict = {}

    def x(key: str, phase: dict, value: float | None, fmt: str = "{:,.1f}") -> str:
        if "over" in phase:
            return f"> {phase['over']:.0f}"
        if value is None:
            return "–"
        base.setdefault(key, value)
        return fmt.format(value) + f" ({value / base[key]:.1f}x)"

    for r in rows:
        p, w, s = r["prepare"], r.get("warm") or {}, r.get("start") or {}
        parts = [w.get(k) for k in ("prepare_s", "load_s", "schedule_s")]
        warm = x("warm", w, sum(parts) if "load_s" in w else None)
        warm += " ({:.1f} + {:.1f} + {:.1f})".format(*parts) if "load_s" in w else ""
        ranks = [*s["rss_mib"], *s["hwm_mib"]] if "first_step_s" in s else [None] * 4
        rate = f"{p['kept'] / p['prepare_s']:,.0f}" if "kept" in p else "–"
        mem = {k: f"{d['peak_mib']:,.0f}, " + x(k, d, d["peak_mib"] - d["rss_before_mib"], "+{:,.0f}")
               if "peak_mib" in d else x(k, d, None) for k, d in (("peak", p), ("wpeak", w))}
        lines.append(f"| {r['n']:,} | {r['corpus_bytes'] / MIB:,.0f} | {x('prep', p, p.get('prepare_s'))} "
                     f"| {rate} | {mem['peak']} / {p.get('children_peak_mib', 0):,.0f} "
                     f"| {r.get('cache_bytes', 0) / MIB:,.0f} | {warm} | {mem['wpeak']} "
                     f"| {x('first', s, s.get('first_step_s'))} | "
                     + " | ".join(f"{x(f'r{i}', s, ranks[i], '{:,.0f}')} / {x(f'r{i + 1}', s, ranks[i + 1], '{:,.0f}')}"
                                  for i in (0, 2)) + " |")
    return "\n".join(lines)


def length_stats(args, n: int) -> str:
    """Token lengths of the real sets and of the ``n`` corpus through the same pipeline (not truncated)."""
    out = {}
    for what, corpus in (("real", write_real(args.shared)), ("generated", build_corpus(n, args.seed, args.shared))):
        ovr = overrides(corpus, WORK / "cache-stats", args, max_length=args.stats_max_length)
        out[what] = run_phase("stats", ovr, args.budget)["tokens"]
        shutil.rmtree(WORK / "cache-stats", ignore_errors=True)
    meta = json.loads((build_corpus(n, args.seed, args.shared) / "meta.json").read_text())["sources"]
    lines = [f"Token lengths as rendered (max_length {args.stats_max_length}), the real sets vs the {n:,} corpus:\n",
             ("| source | real: samples, tokens mean / p50 / p99 | generated: samples (distinct records), tokens "
              "mean / p50 / p99 |"), "|---|---|---|"]
    for name in SHARES:
        a, g = out["real"][name], out["generated"][name]
        lines.append(f"| {name} ({FORMATS[name]}) | {a['n']:,}, {a['mean']:,.0f} / {a['p50']:,} / {a['p99']:,} "
                     f"| {g['n']:,} ({meta[name]['distinct']:,}), {g['mean']:,.0f} / {g['p50']:,} / {g['p99']:,} |")
    return "\n".join(lines)


def streaming_table(args) -> str:
    if not has_streaming():
        return "Streaming: skipped (this sftdist's `DataSource` has no `streaming` field)."
    lines = [f"Every source with `streaming: true` (no preparation, no cache). Data path alone: rank 0 of 2 for "
             f"{STREAM_STEPS} steps, then a resume at 90% of a pass (a fresh pipeline loads the state, seeks, and "
             f"makes its next step's batches; replay = what re-reading that far would take at the measured rate). "
             f"2-rank run: {args.stream_steps} steps, tokens/s of steps 2..:\n",
             ("| conversations | data path: tokens/s, records/s, peak RSS MiB | resume at 90%: s (replay s) | 2 ranks: "
              "step tokens/s | 2 ranks: peak RSS MiB, rank 0 / 1 | 2 ranks: s to step 1 |"), "|" + "---:|" * 6]
    for n in args.sizes.split(","):
        s = streaming_case(int(n), args)
        a = s["alone"]
        if "over" in s or "over" in a:
            lines.append(f"| {int(n):,} | > {args.budget:.0f} s |" + " |" * 5)
            continue
        tokens = "–" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"
        lines.append(f"| {int(n):,} | {a['data_tokens_per_s']:,.0f}, {a['records_per_s']:,.0f}, {a['peak_mib']:,.0f} "
                     f"| {a['resume_s']:.2f} ({a['replay_s']:,.0f}) | {tokens} | {s['hwm_mib'][0]:,.0f} / "
                     f"{s['hwm_mib'][1]:,.0f} | {s['first_step_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="conversations per corpus, comma-separated")
    ap.add_argument("--budget", type=float, default=1800, help="seconds per phase and size")
    ap.add_argument("--workers", type=int, default=0, help="data.num_proc (0: sftdist's default)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--no-packing", dest="packing", action="store_false")
    ap.add_argument("--seed", type=int, default=0, help="of the corpus")
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--chat-template", default="qwen2.5-instruct.jinja", help="in SHARED/chat_templates")
    ap.add_argument("--stats", action="store_true", help="token lengths of the first corpus vs the real sets")
    ap.add_argument("--stats-max-length", type=int, default=32768)
    ap.add_argument("--no-start", action="store_true", help="skip the 2-rank start")
    ap.add_argument("--streaming", action="store_true", help="also a streaming chat source (DataSource.streaming)")
    ap.add_argument("--stream-steps", type=int, default=5)
    ap.add_argument("--keep-cache", action="store_true", help="keep each size's cache and run directory")
    ap.add_argument("--no-results", action="store_true", help="print the tables only; leave RESULTS.md alone")
    ap.add_argument("--json", type=Path, help="also write every measurement to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        worker(args.worker, [o for o in rest if o != "--"])
        return
    sys.path.insert(0, str(BENCH))
    from zero_memory import machine, write_results

    when, load, t0 = dt.datetime.now(dt.timezone.utc), os.getloadavg()[0], time.time()
    rows = [run_size(int(n), args) for n in args.sizes.split(",")]
    text = table(rows)
    text += "\n\n" + length_stats(args, rows[0]["n"]) if args.stats else ""
    text += "\n\n" + streaming_table(args) if args.streaming else ""
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    section = (
        f"## The data stage at scale (bench/data_scale.py)\n\nRun {when:%Y-%m-%d %H:%M} UTC: `python "
        f"bench/data_scale.py {' '.join(sys.argv[1:])}` (wall time {time.time() - t0:.0f} s; load average {load:.2f} "
        f"at start, {os.getloadavg()[0]:.2f} at end; the machine is shared).\n\n{machine()} sftdist from "
        f"`{code_root()}`.\n- Corpus: {', '.join(f'{v:.0%} {k} ({FORMATS[k]})' for k, v in SHARES.items())} "
        f"recombined from the shared sets (seed {args.seed}); qwen2 tokenizer, {args.chat_template}, max_length "
        f"{args.max_length}, packing {args.packing}, data.num_proc {args.workers}, weights = shares.\n"
        f"- `(Nx)` = the first row's value times N: time should follow the size, memory stay at 1.0x; `+N` = what "
        f"the phase added to the process's RSS at its start (imports, tokenizer). `> N` = the phase's "
        f"{args.budget:.0f} s budget ran out.\n\n{text}\n")
    print(section)
    if not args.no_results:
        write_results(section, begin=BEGIN, end=END)
        print("updated bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
