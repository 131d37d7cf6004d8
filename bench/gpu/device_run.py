"""The GPU run, prepared here and run once on a lent device by ``bench/gpu/run.sh`` (see bench/gpu/README.md).

Phases, in order, each printing one line with its time:

1. ``versions``: Python, torch, CUDA, the card and every package the run uses;
2. ``correctness``: a ~0.5B Qwen2.5-shaped model built from config (random init) in bf16 with packing and
   attention by document, under ZeRO-2 and ZeRO-3; LoRA under ZeRO-3 with its adapter saved; QLoRA where
   bitsandbytes is installed; a run stopped halfway and resumed against the uninterrupted one; ``final/``
   loaded with transformers and generating; the host syncs of the micro-batch loop (``SFTDIST_SYNC_CHECK``);
3. ``memory``: each run's peak device memory against ``sftdist-plan``'s prediction for the same config;
4. ``throughput``: sftdist against TRL's ``SFTTrainer`` on the same records, tokenizer, lengths and batch
   (packing, sdpa; TRL also padding-free), at each length, plus LoRA, Liger-kernel and torch.compile rows;
   supervised tokens/s, tokens/s and MFU (6N + attention, the LM head at every token, as
   ``train_vs_trl.useful_flops_per_supervised_token`` counts it, against the card's dense peak);
5. ``summary``: ``$OUT/gpu_run.json`` and ``$OUT/gpu_run.md``.

``--cpu-smoke`` runs every phase on this CPU with a tiny model in fp32 for a few steps (the test suite does,
so that the script cannot rot between loans); what needs CUDA (QLoRA, Liger, the sync check) says why it
was skipped. The exit status is 1 when a correctness check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import train_vs_trl  # noqa: E402  (bench/ is not a package)

BUNDLE_ASSETS = REPO / ".whl" / "assets"
SHARED = REPO.parent / "shared"
QWEN2_5_0_5B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_QWEN2 = dict(QWEN2_5_0_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=1024)
PACKAGES = ("torch", "transformers", "deepspeed", "peft", "datasets", "hydra-core", "trl", "liger-kernel",
            "bitsandbytes", "triton", "accelerate")
SYNC_LINE = "host syncs in the micro-batches:"


@dataclass
class Setup:
    """What this run trains: the device run's 0.5B model, or the smoke's tiny one."""

    smoke: bool
    work: Path
    out: Path
    deadline: float
    shape: dict = field(init=False)
    precision: str = field(init=False)
    lengths: tuple[int, ...] = field(init=False)
    tokens_per_micro_batch: int = field(init=False)
    steps: int = field(init=False)
    tokenizer: str = field(init=False)
    data: Path = field(init=False)

    def __post_init__(self) -> None:
        self.shape = TINY_QWEN2 if self.smoke else QWEN2_5_0_5B
        self.precision = "fp32" if self.smoke else "bf16"
        self.lengths = (256,) if self.smoke else (2048, 4096)
        self.tokens_per_micro_batch = 512 if self.smoke else 16384
        self.steps = 4 if self.smoke else 30
        self.tokenizer, self.data = assets()

    @property
    def main_length(self) -> int:
        return self.lengths[-1]

    def overrides(self, length: int, run_dir: Path, steps: int | None = None) -> list[str]:
        micro = self.tokens_per_micro_batch // length
        return [*(f"model.from_config.{k}={v}" for k, v in self.shape.items()), f"model.tokenizer={self.tokenizer}",
                "data.sources=[{name:alpaca,path:'" + str(self.data) + "',format:alpaca}]", "data.packing=true",
                f"data.cache_dir={self.work / 'cache'}", "data.audit_samples=0", f"train.max_length={length}",
                f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}",
                f"train.max_steps={steps or self.steps}", "train.warmup_steps=0",
                f"train.lr={3e-3 if self.smoke else 1e-4}", "train.schedule=constant", "train.eval_every=0", f"parallelism.precision={self.precision}",
                f"output_dir={run_dir}"]

    def time_left(self) -> float:
        return self.deadline - time.time()


def assets() -> tuple[str, Path]:
    """The Qwen2 tokenizer and the alpaca records: from the bundle (``make gpu-bundle``), else ../shared."""
    for root, tok, data in ((BUNDLE_ASSETS, "tokenizer-qwen2", "llamafactory_alpaca_en_demo.json"),
                            (SHARED, "tokenizers/qwen2", "datasets/llamafactory_alpaca_en_demo.json")):
        if (root / tok).is_dir() and (root / data).is_file():
            return str(root / tok), root / data
    sys.exit("device_run: no Qwen2 tokenizer and alpaca records: run `make gpu-bundle` (with ../shared beside "
             "the checkout) first")


def versions() -> dict:
    import torch

    found = {"python": platform.python_version(), "torch_cuda": torch.version.cuda,
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    found["commit"] = commit.stdout.strip() or None
    return found


def train(setup: Setup, name: str, length: int, extra: list[str], *, run_dir: Path | None = None,
          steps: int | None = None, sync_check: bool = False) -> dict:
    """One ``python -m sftdist.train`` run: its losses, steady rates, peak memory and host-sync lines."""
    run_dir = run_dir or setup.work / name
    env = dict(os.environ, **({"SFTDIST_SYNC_CHECK": "1"} if sync_check else {}))
    cmd = [sys.executable, "-m", "sftdist.train", *setup.overrides(length, run_dir, steps), *extra]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(setup.time_left(), 60))
    log = proc.stdout + proc.stderr
    (setup.work / f"{name}.log").write_text(log)
    result = {"name": name, "length": length, "seconds": round(time.time() - start, 1), "ok": proc.returncode == 0,
              "overrides": extra, "run_dir": str(run_dir)}
    if proc.returncode:
        lines = log.strip().splitlines() or ["no output"]
        return result | {"error": next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1])[-400:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) > 0 and "loss" in r]
    steady = rows[2:] or rows  # after allocator, cache and compile warm-up
    peak = [r["mem/device_peak_gib"] for r in rows if r.get("mem/device_peak_gib") is not None]
    return result | {
        "losses": {r["step"]: r["loss"] for r in rows},
        "supervised_tok_s": statistics.median(r["supervised_tokens_per_sec"] for r in steady),
        "tok_s": statistics.median(r["tokens_per_sec"] for r in steady),
        "device_peak_gib": max(peak) if peak else None,
        "syncs": [line.split(SYNC_LINE)[1].strip() for line in log.splitlines() if SYNC_LINE in line][-3:]}


def check(name: str, ok: bool, detail: str) -> dict:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return {"check": name, "ok": bool(ok), "detail": detail}


def losses_close(a: dict, b: dict, steps, rtol: float) -> tuple[bool, str]:
    diffs = [abs(a[s] - b[s]) / max(abs(b[s]), 1e-9) for s in steps if s in a and s in b]
    if not diffs:
        return False, "no common steps"
    return max(diffs) <= rtol, f"largest relative difference {max(diffs):.2e} over {len(diffs)} steps (tolerance {rtol:g})"


def correctness(setup: Setup, runs: dict) -> list[dict]:
    import torch

    gpu = torch.cuda.is_available()
    length, steps, checks = setup.main_length, setup.steps, []
    half = steps // 2
    runs["zero2"] = z2 = train(setup, "zero2", length, ["parallelism=zero2", f"train.save_every={half}"],
                               sync_check=True)
    checks.append(check("ZeRO-2 trains", z2["ok"] and z2["losses"][steps] < z2["losses"][1],
                        z2.get("error") or f"loss {z2['losses'][1]:.3f} -> {z2['losses'][steps]:.3f}"))
    if setup.smoke:  # (one process fewer in the suite; on CPU tests/dist/test_loss_equivalence.py checks it)
        checks.append(check("ZeRO-3 = ZeRO-2", True, "skipped in the smoke"))
    elif (z3 := train(setup, "zero3", length, ["parallelism=zero3"]))["ok"] and z2["ok"]:
        runs["zero3"] = z3
        # bf16 rounds ZeRO-2's and ZeRO-3's differently ordered reductions differently
        checks.append(check("ZeRO-3 = ZeRO-2", *losses_close(z3["losses"], z2["losses"], range(1, steps + 1), 2e-2)))
    else:
        checks.append(check("ZeRO-3 = ZeRO-2", False, z3.get("error") or z2.get("error", "")))
    # the second half again, from the ZeRO-2 run's halfway checkpoint, in a run directory of its own
    resumed = train(setup, "resumed", length, ["parallelism=zero2",
                                               f"train.resume={z2['run_dir']}/checkpoints/step-{half}"])
    if resumed["ok"] and z2["ok"]:
        # the same kernels on the same data in the same order: bit for bit on CPU; on a GPU atomics in some
        # backward kernels may reorder sums, hence a tolerance there
        checks.append(check("resume = uninterrupted", *losses_close(
            resumed["losses"], z2["losses"], range(half + 1, steps + 1), 1e-3 if gpu else 0.0)))
    else:
        checks.append(check("resume", False, resumed.get("error") or z2.get("error", "")))
    runs["lora_zero3"] = lora = train(setup, "lora_zero3", length, ["parallelism=zero3", "peft=lora"])
    adapter = Path(lora["run_dir"]) / "final" / "adapter_model.safetensors"
    checks.append(check("LoRA under ZeRO-3 saves its adapter", lora["ok"] and adapter.is_file(),
                        lora.get("error") or f"{adapter.name}: {adapter.stat().st_size / 2**20:.1f} MiB"
                        if adapter.is_file() else f"no {adapter}"))
    checks.append(qlora(setup, runs, z2))
    checks.append(generates(z2))
    if gpu:
        ours = [s for s in z2.get("syncs", []) if "(sftdist: 0;" not in s]
        checks.append(check("no host sync in sftdist's micro-batch code", z2["ok"] and not ours,
                            "; ".join(z2.get("syncs", [])) or "none reported"))
    return checks


def qlora(setup: Setup, runs: dict, z2: dict) -> dict:
    """QLoRA needs a pretrained checkpoint (it quantises on load): the ZeRO-2 run's final/ is one."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return check("QLoRA", True, "skipped: bitsandbytes is not installed")
    if not torch.cuda.is_available() or not z2["ok"]:
        return check("QLoRA", True, "skipped: needs CUDA and the ZeRO-2 run's final/")
    final = Path(z2["run_dir"]) / "final"
    runs["qlora"] = run = train(setup, "qlora", setup.main_length, [
        "~model.from_config", f"model.name_or_path={final}", f"model.tokenizer={final}", "peft=qlora",
        "parallelism=zero2"])
    return check("QLoRA trains", run["ok"] and run["losses"][setup.steps] < run["losses"][1],
                 run.get("error") or f"loss {run['losses'][1]:.3f} -> {run['losses'][setup.steps]:.3f}")


def generates(z2: dict) -> dict:
    """``final/`` loads with transformers alone and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not z2["ok"]:
        return check("final/ generates", False, "no ZeRO-2 run")
    final = Path(z2["run_dir"]) / "final"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.to(dev).generate(**{k: v.to(dev) for k, v in prompt.items()}, max_new_tokens=8,
                                     do_sample=False)
    new = out.shape[1] - prompt["input_ids"].shape[1]
    return check("final/ generates", new > 0, f"{new} new tokens: {tokenizer.decode(out[0, -new:])!r}")


def memory(setup: Setup, runs: dict) -> list[dict]:
    """Each run's measured peak against ``sftdist-plan``'s device total for the same overrides."""
    from sftdist.tools import plan

    rows = []
    for name, run in runs.items():
        if not run["ok"]:
            continue
        out = setup.work / f"plan_{name}.json"
        args = ["--world-size", "1", "--no-data", "--json", str(out), "--device", "gpu", "--gpu-mem", "80",
                *setup.overrides(run["length"], Path(run["run_dir"])), *run["overrides"]]
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # (its tables; the JSON holds the numbers)
                plan.main(args)
            predicted = json.loads(out.read_text())["rows"]["total"][0] / 2**30
        except SystemExit as e:
            rows.append({"run": name, "error": str(e)})
            continue
        measured = run.get("device_peak_gib")
        ratio = measured / predicted if measured else None
        rows.append({"run": name, "predicted_gib": round(predicted, 2), "measured_gib": measured and round(measured, 2),
                     "measured_over_predicted": ratio and round(ratio, 3)})
        print(f"  {name:22s} plan {predicted:7.2f} GiB  measured "
              + (f"{measured:7.2f} GiB ({ratio:.2f}x)" if measured else "n/a (no CUDA)"), flush=True)
    return rows


def useful_flops(setup: Setup, length: int) -> float:
    """Useful FLOPs per supervised token of this data at ``length`` (head at every token; train_vs_trl)."""
    from datasets import load_from_disk

    from sftdist.config import compose_config
    from sftdist.data.build import prepare_all
    from sftdist.engine.model import load_tokenizer

    cfg = compose_config(setup.overrides(length, setup.work / "flops"))
    tokenizer = load_tokenizer(cfg.model)
    # (the training runs' seed: the same cache entry, tokenised once)
    entry = prepare_all(cfg.data, tokenizer, max_length=length, seed=cfg.train.seed)[0]
    table = load_from_disk(str(entry / "train"))
    shape = dict(setup.shape, vocab_size=len(tokenizer))
    return train_vs_trl.useful_flops_per_supervised_token(shape, list(table["num_tokens"]),
                                                          list(table["num_supervised"]))[1]


def trl_case(setup: Setup, name: str, length: int, **extra) -> dict:
    case = {"framework": "trl", "packing": True, "steps": setup.steps, "tokenizer": setup.tokenizer,
            "data": str(setup.data), "model": setup.shape, "max_length": length,
            "micro_batch": setup.tokens_per_micro_batch // length, "precision": setup.precision, **extra}
    work = setup.work / name
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_vs_trl.py"), "--worker", json.dumps(case),
                           "--work", str(work)], capture_output=True, text=True, timeout=max(setup.time_left(), 60))
    (setup.work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    result = {"name": name, "length": length, "seconds": round(time.time() - start, 1), "ok": proc.returncode == 0}
    if proc.returncode:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        return result | {"error": lines[-1][-400:]}
    return result | json.loads(proc.stdout.strip().splitlines()[-1])


def throughput_cases(setup: Setup, runs: dict, *, gpu: bool, have_trl: bool) -> list[tuple[str, int, object]]:
    """``(label, length, run)`` in the order they run: the headline pair at the longest length first, so
    that a run short of time drops the optional rows (LoRA, Liger, compile, TRL padding-free) last."""
    def sftdist(name: str, length: int, extra: list[str], smoke_reuses: str | None = None):
        # The smoke takes the correctness run of the same config where there is one, else skips the row
        # (each process costs the suite seconds; train.compile has its own unit test).
        if setup.smoke:
            return lambda: runs.get(smoke_reuses) or {"ok": False, "seconds": 0, "skipped": "not in the smoke"}
        return lambda: train(setup, name, length, extra)

    def trl(name: str, length: int, **extra):
        return lambda: trl_case(setup, name, length, **extra)

    main, zero2 = setup.main_length, ["parallelism=zero2"]
    cases = []
    for length in sorted(setup.lengths, reverse=True):
        cases.append(("sftdist", length, sftdist(f"sftdist_{length}", length, zero2, "zero2")))
        cases += [("TRL", length, trl(f"trl_{length}", length))] if have_trl else []
    cases.append(("sftdist LoRA", main, sftdist("sftdist_lora", main, [*zero2, "peft=lora"], "lora_zero3")))
    cases += [("TRL LoRA", main, trl("trl_lora", main, lora=True))] if have_trl else []
    if gpu:
        cases.append(("sftdist Liger", main, sftdist("sftdist_liger", main, [*zero2, "train.kernels=liger"])))
        cases += [("TRL Liger", main, trl("trl_liger", main, liger=True))] if have_trl else []
    cases.append(("sftdist torch.compile", main, sftdist("sftdist_compile", main, [*zero2, "train.compile=true"])))
    for length in sorted(setup.lengths, reverse=True):
        cases += [("TRL padding-free", length, trl(f"trl_padding_free_{length}", length, padding_free=True))
                  ] if have_trl else []
    return cases


def throughput(setup: Setup, runs: dict, peak: float) -> list[dict]:
    """sftdist and TRL on the same records at each length; the later rows only while time is left."""
    import torch

    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
    flops = {length: useful_flops(setup, length) for length in setup.lengths}
    rows = []
    for label, length, run in throughput_cases(setup, runs, gpu=torch.cuda.is_available(), have_trl=have_trl):
        if setup.time_left() < 45:
            rows.append({"case": label, "length": length, "skipped": "out of time"})
            continue
        result = run()
        row = {"case": label, "length": length, "seconds": result["seconds"]}
        if result.get("skipped") or not result["ok"]:
            rows.append(row | {k: result[k] for k in ("skipped", "error") if result.get(k)})
            print(f"  {label:22s} {length:5d}  {result.get('skipped') or result.get('error')}", flush=True)
            continue
        mfu = result["supervised_tok_s"] * flops[length] / peak
        row |= {"supervised_tok_s": round(result["supervised_tok_s"], 1), "tok_s": round(result["tok_s"], 1),
                "mfu": round(mfu, 4), "device_peak_gib": result.get("device_peak_gib"),
                "padding_free": result.get("padding_free")}
        rows.append(row)
        print(f"  {label:22s} {length:5d}  {row['supervised_tok_s']:12,.0f} supervised tok/s "
              f"{row['tok_s']:12,.0f} tok/s  MFU {mfu:6.1%}", flush=True)
    return rows


def markdown(summary: dict) -> str:
    v, lines = summary["versions"], []
    lines += [f"Device: {v['device']}; torch {v['torch']} (CUDA {v['torch_cuda']}), transformers "
              f"{v['transformers']}, deepspeed {v['deepspeed']}, peft {v['peft']}, trl {v['trl']}; commit "
              f"{v['commit']}; {summary['date']}; {'CPU smoke' if summary['smoke'] else 'device run'}.", "",
              "| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['check']} | {'ok' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in summary["correctness"]]
    lines += ["", "| run | sftdist-plan GiB | measured peak GiB | measured / plan |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {m['run']} | {m.get('predicted_gib', '-')} | {m.get('measured_gib') or '-'} | "
              f"{m.get('measured_over_predicted') or '-'} |" for m in summary["memory"]]
    lines += ["", "| case | length | supervised tok/s | tok/s | MFU | peak GiB | note |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in summary["throughput"]:
        note = r.get("skipped") or r.get("error") or ("padding-free" if r.get("padding_free") else "")
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        lines.append(f"| {r['case']} | {r['length']} | {r.get('supervised_tok_s', '-')} | {r.get('tok_s', '-')} | "
                     f"{mfu} | {r.get('device_peak_gib') or '-'} | {note} |")
    lines += ["", "Phases: " + ", ".join(f"{k} {s:.0f} s" for k, s in summary["phase_seconds"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="every phase, tiny and fp32, on this CPU")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_run_out")))
    ap.add_argument("--budget-s", type=float, default=480, help="optional rows stop being started after this")
    args = ap.parse_args()
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("SFTDIST_GPU_WORK", "/tmp/sftdist_gpu_run"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    setup = Setup(args.cpu_smoke, work, args.out, started + args.budget_s)
    summary: dict = {"smoke": args.cpu_smoke, "date": time.strftime("%Y-%m-%d"), "phase_seconds": {}}
    runs: dict = {}

    def phase(name: str, fn):
        t = time.time()
        print(f"== {name}", flush=True)
        summary[name] = fn()
        summary["phase_seconds"][name] = round(time.time() - t, 1)
        print(f"== {name}: {time.time() - t:.0f} s (total {time.time() - started:.0f} s)", flush=True)

    from sftdist.observe.step_metrics import device_peak_flops

    phase("versions", versions)
    print("  " + json.dumps(summary["versions"]), flush=True)
    peak, source = device_peak_flops(setup.precision, None)
    summary["peak_flops"], summary["peak_source"] = peak, source
    phase("correctness", lambda: correctness(setup, runs))
    phase("memory", lambda: memory(setup, runs))
    phase("throughput", lambda: throughput(setup, runs, peak))
    (args.out / "gpu_run.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "gpu_run.md").write_text(markdown(summary))
    logs = "".join(f"\n===== {p.name}\n" + p.read_text()[-6000:] for p in sorted(work.glob("*.log")))
    (args.out / "gpu_run_logs.txt").write_text(logs)
    print(markdown(summary))
    sys.exit(0 if all(c["ok"] for c in summary["correctness"]) else 1)


if __name__ == "__main__":
    main()
