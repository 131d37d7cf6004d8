"""Training throughput, sftdist vs TRL's SFTTrainer on the same work, interleaved (``make bench``).

Both sides train the same seeded random-init Llama preset on the same alpaca records with the same tokenizer
(llama-2, its own chat template), max_length 512, micro-batch 8, global batch 8, the same optimizer steps,
fp32 on CPU in one process. Each case runs in a fresh subprocess (``--worker``), the cases of one repeat one
after another (A, B, C, D, A, B, ...), and the table shows medians over repeats. Per case:

- prep s / records/s: the data stage from the records in memory (TRL) or on disk (sftdist) to tokenised,
  masked samples, with a cold cache;
- supervised tok/s, tok/s: supervised and non-padding tokens per second over the steps after the first;
- padding: padding / all token slots of the batches;
- peak RSS of the worker process (for ``2 ranks``: the larger rank);
- MFU: useful FLOPs per second / the measured fp32 matmul peak of this machine (``torch.mm`` of 2048^3 on
  all threads, best of 10). Useful FLOPs per token = 6 x (non-embedding, non-head parameters) + 12 x layers x
  hidden x (the token's own sample length) (attention, non-causal count as in PaLM), plus 6 x hidden x vocab
  for the LM head at supervised tokens only; ``MFU (all)`` counts the head at every non-padding token.
  Both sides are charged the same useful FLOPs per supervised token (the same records).

Run it with ``bench/.venv-trl/bin/python bench/train_vs_trl.py`` (``make bench`` sets that venv up); it
rewrites its section of bench/RESULTS.md unless ``--no-results``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "llama2-sentencepiece"
DATA = SHARED / "datasets" / "llamafactory_alpaca_en_demo.json"
PRESETS = {  # Llama architecture; vocabulary = the tokenizer's
    "micro": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=688),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1376),
}
CASES = {  # name: (framework, packing, extra)
    "sftdist packing": ("sftdist", True, {}),
    "sftdist padding": ("sftdist", False, {}),
    "TRL packing": ("trl", True, {}),
    "TRL padding": ("trl", False, {}),
    "sftdist packing, LoRA": ("sftdist", True, {"lora": True}),
    "sftdist packing, 2 ranks ZeRO-2": ("sftdist", True, {"ranks": 2}),
    "sftdist packing, lm_head=full": ("sftdist", True, {"overrides": ["train.lm_head=full"]}),
    "sftdist packing, ZeRO-0": ("sftdist", True, {"overrides": ["parallelism=zero0"]}),
}
HEADLINE = 4  # the first four cases run on every preset, the others on the first preset only
MAX_LENGTH, MICRO_BATCH, LR, SEED = 512, 8, 1e-4, 0


def model_config(preset: str, vocab: int) -> dict:
    return dict(model_type="llama", vocab_size=vocab, max_position_embeddings=MAX_LENGTH, tie_word_embeddings=False,
                rms_norm_eps=1e-5, **PRESETS[preset])


def useful_flops_per_supervised_token(cfg: dict, lengths: list[int], supervised: list[int]) -> tuple[float, float]:
    """(head at supervised tokens only, head at every token) FLOPs per supervised token over these samples.

    Example:
        >>> c = dict(hidden_size=2, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
        ...          intermediate_size=4, vocab_size=10)
        >>> useful_flops_per_supervised_token(c, [3], [1])  # layer params 2*2*2 + 2*2*2 + 3*2*4 = 40
        (1056.0, 1296.0)
    """
    h, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    layer_params = layers * (2 * h * h + 2 * h * kv + 3 * h * cfg["intermediate_size"])
    body = sum(n * (6 * layer_params + 12 * layers * h * n) for n in lengths)
    sup = sum(supervised)
    return (body + 6 * h * v * sup) / sup, (body + 6 * h * v * sum(lengths)) / sup


def matmul_peak() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


def steady(step_times: list[float], supervised: list[int], tokens: list[int]) -> dict:
    """Rates over the steps after the first (compile, allocator and cache warm-up)."""
    secs = sum(step_times[1:])
    return {"supervised_tok_s": sum(supervised[1:]) / secs, "tok_s": sum(tokens[1:]) / secs,
            "step_s": statistics.median(step_times[1:])}


def sftdist_worker(case: dict, work: Path) -> dict:
    from datasets import load_from_disk

    from sftdist.config import compose_config
    from sftdist.data.build import prepare_all
    from sftdist.engine.model import load_tokenizer

    cfg_model = model_config(case["preset"], 0)
    cfg_model.pop("vocab_size")
    overrides = [
        f"model.tokenizer={TOKENIZER}", "model.from_config=" + json.dumps(cfg_model).replace('"', ""),
        "data.sources=[{name:alpaca,path:'" + str(DATA) + "',format:alpaca}]", f"data.packing={case['packing']}",
        f"data.cache_dir={work / 'cache'}", "data.audit_samples=0", "data.num_proc=1",
        f"train.max_steps={case['steps']}", f"train.micro_batch_size={MICRO_BATCH // case.get('ranks', 1)}",
        f"train.global_batch_size={MICRO_BATCH}", f"train.max_length={MAX_LENGTH}", f"train.lr={LR}",
        "train.warmup_steps=0", "train.schedule=constant", f"train.seed={SEED}", "train.eval_every=0",
        "parallelism.precision=fp32", f"output_dir={work / 'run'}", "logging.log_every=100",
        *(["peft=lora"] if case.get("lora") else []), *case.get("overrides", []),
    ]
    ranks = case.get("ranks", 1)
    cfg = compose_config(overrides)
    tokenizer = load_tokenizer(cfg.model)
    start = time.perf_counter()
    dirs = prepare_all(cfg.data, tokenizer, max_length=MAX_LENGTH, seed=SEED)
    prep_s = time.perf_counter() - start
    table = load_from_disk(str(dirs[0] / "train"))
    records = len(json.loads(DATA.read_text()))  # input records, as on the TRL side
    lengths, supervised = list(table["num_tokens"]), list(table["num_supervised"])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    cmd = [sys.executable, "-m", "sftdist.train", *overrides] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
         "-m", "sftdist.train", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sftdist failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [rows[0]["elapsed_s"]] + [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    useful, useful_all = useful_flops_per_supervised_token(
        model_config(case["preset"], len(tokenizer)), lengths, supervised)
    return {"prep_s": prep_s, "records": records, "padding": statistics.mean(r["padding_fraction"] for r in rows),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20,
            "flops_per_sup": useful, "flops_per_sup_all": useful_all, "final_loss": rows[-1]["loss"],
            **steady(times, [r["supervised_tokens"] for r in rows], [r["tokens"] for r in rows])}


def trl_worker(case: dict, work: Path) -> dict:
    """One TRL case. Besides this script's own cases, bench/gpu/device_run.py sends ``tokenizer``, ``data``,
    ``model`` (a config dict), ``max_length``, ``micro_batch``, ``precision``, ``padding_free``, ``lora`` and
    ``liger``; on a GPU the run goes there."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftdist.data.messages import to_conversation

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(str(case.get("tokenizer", TOKENIZER)))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = Path(case.get("data", DATA))
    raw = json.loads(data.read_text())
    convs = [to_conversation(r, "alpaca", f"record {i}")[0] for i, r in enumerate(raw)]
    ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    cfg = dict(case.get("model") or model_config(case["preset"], 0), vocab_size=len(tokenizer))
    bf16, gpu = case.get("precision") == "bf16", torch.cuda.is_available()
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), attn_implementation="sdpa",
                                             dtype=torch.bfloat16 if bf16 else torch.float32)
    args = SFTConfig(output_dir=str(work / "trl"), max_length=case.get("max_length", MAX_LENGTH),
                     packing=case["packing"], padding_free=case.get("padding_free", False),
                     per_device_train_batch_size=case.get("micro_batch", MICRO_BATCH), gradient_accumulation_steps=1,
                     max_steps=case["steps"], learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                     logging_steps=100, save_strategy="no", report_to=[], use_cpu=not gpu, seed=SEED,
                     dataloader_num_workers=0, bf16=bf16, fp16=False, use_liger_kernel=case.get("liger", False))
    peft_config = None
    if case.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    prep = {}
    original = SFTTrainer._prepare_dataset

    def timed(self, *a, **kw):
        t = time.perf_counter()
        out = original(self, *a, **kw)
        prep["s"] = prep.get("s", 0.0) + time.perf_counter() - t
        return out

    SFTTrainer._prepare_dataset = timed
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         peft_config=peft_config)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    batches: list[tuple[int, int, int]] = []
    collate = trainer.data_collator

    def counting(features):
        b = collate(features)
        labels = b["labels"]
        sup = int((labels[..., 1:] != -100).sum())
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else labels.numel()
        batches.append((sup, real, b["input_ids"].numel()))
        return b

    trainer.data_collator = counting
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    used = batches[:len(times)]  # the dataloader may fetch one batch ahead
    return {"prep_s": prep["s"], "records": len(raw),
            "padding": 1 - sum(b[1] for b in used) / sum(b[2] for b in used),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "device_peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else None,
            "padding_free": bool(trainer.args.padding_free),
            **steady(times, [b[0] for b in used], [b[1] for b in used])}


def run_case(name: str, preset: str, steps: int) -> dict:
    framework, packing, extra = CASES[name]
    case = {"framework": framework, "packing": packing, "preset": preset, "steps": steps, **extra}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case), "--work", tmp],
                              capture_output=True, text=True)
    if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1])[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_of(results: list[dict], key: str):
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def report(results: dict, args, peak: float, started: float) -> str:
    """The Markdown section: machine, table of medians, ratios."""
    import platform

    import torch
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "sftdist"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    lines = [f"## Training throughput: sftdist vs TRL SFTTrainer ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"Command: `bench/.venv-trl/bin/python bench/train_vs_trl.py {' '.join(sys.argv[1:])}` "
             f"(total wall time {time.time() - started:.0f} s).", "",
             f"- Machine: {os.cpu_count()} CPUs, {platform.platform()}; no GPU; fp32 matmul peak "
             f"{peak / 1e9:.1f} GFLOP/s (`torch.mm` 2048^3, all threads, best of 10, measured at the start).",
             f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, trl {trl_version}; sftdist at {commit}{' + uncommitted changes' if dirty else ''}.",
             f"- Work: `{DATA.name}` (alpaca, 999 records; TRL gets the same conversations as prompt-completion "
             f"pairs), tokenizer `{TOKENIZER.name}`, max_length {MAX_LENGTH}, micro-batch {MICRO_BATCH}, "
             f"global batch {MICRO_BATCH}, {args.steps} optimizer steps (rates over steps 2..{args.steps}), "
             f"fp32, AdamW lr {LR} constant, seed {SEED}; medians of {args.repeats} interleaved repeats.",
             "", "| preset | case | prep s | records/s | supervised tok/s | tok/s | padding | peak RSS GB | "
             "MFU | MFU (all) | step s | runs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for preset in args.presets:
        flops = median_of(results[(preset, args.cases[0])], "flops_per_sup")
        flops_all = median_of(results[(preset, args.cases[0])], "flops_per_sup_all")
        for name in args.cases:
            if not (rs := results[(preset, name)]):
                continue
            sup, prep, rec = (median_of(rs, k) for k in ("supervised_tok_s", "prep_s", "records"))
            mfu = sup * flops / peak if sup and flops else None
            mfu_all = sup * flops_all / peak if sup and flops_all else None
            errors = [r["error"] for r in rs if "error" in r]
            lines.append(f"| {preset} | {name} | {fmt(prep, '.2f')} | {fmt(rec / prep if prep else None, ',.0f')} | "
                         f"{fmt(sup, ',.0f')} | {fmt(median_of(rs, 'tok_s'), ',.0f')} | "
                         f"{fmt(median_of(rs, 'padding'), '.1%')} | {fmt(median_of(rs, 'peak_rss_gb'), '.2f')} | "
                         f"{fmt(mfu, '.1%')} | {fmt(mfu_all, '.1%')} | {fmt(median_of(rs, 'step_s'), '.2f')} | "
                         f"{len(rs) - len(errors)}/{len(rs)}{' (' + errors[0] + ')' if errors else ''} |")
    lines += ["", "Ratios (medians of per-repeat ratios, sftdist packing / other):", ""]
    for preset in args.presets:
        for other, key in [("TRL packing", "supervised_tok_s"), ("TRL padding", "supervised_tok_s"),
                           ("TRL packing", "prep_s"), ("TRL packing", "peak_rss_gb")]:
            pairs = [(a, b) for a, b in zip(results[(preset, "sftdist packing")], results.get((preset, other), []))
                     if key in a and key in b]
            if pairs:
                ratio = statistics.median(a[key] / b[key] for a, b in pairs)
                what = {"supervised_tok_s": "supervised tokens/s", "prep_s": "preparation seconds",
                        "peak_rss_gb": "peak RSS"}[key]
                lines.append(f"- {preset}: {what} sftdist / {other} = {ratio:.2f}")
    return "\n".join(lines)


def write_results(section: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text()
    begin, end = "<!-- train_vs_trl:begin -->", "<!-- train_vs_trl:end -->"
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        title, sep, rest = text.partition("\n\n")  # after the title and the intro paragraph
        intro, sep2, rest = rest.partition("\n\n")
        text = f"{title}{sep}{intro}{sep2}{block}\n\n{rest}"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-results", action="store_true", help="print the table only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        case = json.loads(args.worker)
        worker = sftdist_worker if case["framework"] == "sftdist" else trl_worker
        print(json.dumps(worker(case, Path(args.work))))
        return
    if not (TOKENIZER.is_dir() and DATA.is_file()):
        sys.exit(f"needs ../shared beside the checkout ({TOKENIZER}, {DATA})")
    if "sftdist packing" not in args.cases:
        args.cases.insert(0, "sftdist packing")
    started, peak = time.time(), matmul_peak()
    results: dict = {(p, c): [] for p in args.presets for c in args.cases}
    for repeat in range(args.repeats):
        for preset in args.presets:
            for name in args.cases:  # interleaved: every case once per repeat, in turn
                if preset != args.presets[0] and list(CASES).index(name) >= HEADLINE:
                    continue
                t = time.time()
                results[(preset, name)].append(r := run_case(name, preset, args.steps))
                print(f"[{repeat + 1}/{args.repeats}] {preset:5s} {name:32s} {time.time() - t:6.1f} s  "
                      + (r.get("error") or f"{r['supervised_tok_s']:8,.0f} supervised tok/s"), flush=True)
    section = report(results, args, peak, started)
    print("\n" + section)
    if not args.no_results:
        write_results(section)


if __name__ == "__main__":
    main()
