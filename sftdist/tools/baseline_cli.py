"""``sftdist-baseline [options] [overrides]``: before training, the base model's eval loss zero-shot and with k
training examples as earlier turns, plus greedy answers; with ``--run RUN_DIR``, the fine-tuned model beside
them. Prompt first: if a few examples in the prompt do as well, fine-tuning is not needed (``sftdist.tools.baseline``)."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from sftdist.config import ConfigError, SFTConfig, compose_config, validate
from sftdist.observe.progress import PhaseProgress
from sftdist.tools.baseline import (
    base_model,
    eval_losses,
    few_shot_data,
    finetuned_model,
    run_config,
    shot_sources,
)
from sftdist.tools.run_files import parse_metrics


def run_metrics(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's own step-0 and last ``eval_loss`` from its ``metrics.jsonl`` (None without eval rows)."""
    path = run_dir / "metrics.jsonl"
    rows = parse_metrics(path.read_text(errors="replace"))[0] if path.is_file() else []
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if not evals:
        return None
    first = next((r["eval_loss"] for r in evals if r.get("step") == 0), None)
    return {"step0_eval_loss": first, "final_eval_loss": evals[-1]["eval_loss"], "final_step": evals[-1]["step"]}


def plan_lines(evals: dict[str, int], *, k: int, shot_names: list[str], no_shots: str | None, answers: int,
               max_new_tokens: int, run_dir: Path | None) -> list[str]:
    """What the baseline is about to do, said before the slow part so that a user can stop it early.

    Args:
        evals: Eval records per source (the sources with an eval split).
        k: ``--k``.
        shot_names: The sources that get k-shot rows (``shot_sources``).
        no_shots: Why there are none although ``k > 0``.
        answers: ``--answers``: eval prompts per source.
        max_new_tokens: ``--max-new-tokens``.
        run_dir: ``--run``.

    Example:
        >>> for line in plan_lines({"chat": 40, "web": 10}, k=3, shot_names=["chat"], no_shots=None,
        ...                        answers=2, max_new_tokens=64, run_dir=None):
        ...     print(line)
        plan: eval splits of 50 records (chat 40, web 10)
          zero-shot:  eval loss on 50 records, 4 greedy answers of up to 64 tokens
          3-shot:     eval loss on 50 records, 3 training examples before each of the 40 of chat; 2 answers
          in all:     2 eval passes (100 records), 6 answers (--k 0: no 3-shot pass; --answers 0: none)
    """
    records = sum(evals.values())
    prompts = sum(min(answers, n) for n in evals.values())
    shot_records = sum(evals[n] for n in shot_names)
    shot_prompts = sum(min(answers, evals[n]) for n in shot_names)
    tuned = run_dir is not None
    passes = 1 + bool(shot_names) + tuned
    listed = ", ".join(f"{n} {c}" for n, c in evals.items())
    answered = f"{prompts} greedy answers of up to {max_new_tokens} tokens" if prompts else "no answers"
    lines = [f"plan: eval splits of {records} records ({listed})",
             f"  zero-shot:  eval loss on {records} records, {answered}"]
    if shot_names:
        lines.append(f"  {k}-shot:     eval loss on {records} records, {k} training examples before each of "
                     f"the {shot_records} of {', '.join(shot_names)}; {shot_prompts} answers")
    else:
        lines.append(f"  k-shot:     {no_shots or 'skipped (--k 0)'}")
    if tuned:
        lines.append(f"  fine-tuned: eval loss on {records} records, {prompts} answers ({run_dir / 'final'})")
    skips = [f"--k 0: no {k}-shot pass"] * bool(shot_names) + ["--answers 0: none"] * bool(prompts)
    lines.append(f"  in all:     {passes} eval pass{'es' * (passes > 1)} ({passes * records} records), "
                 f"{prompts * (1 + tuned) + shot_prompts} answers" + (f" ({'; '.join(skips)})" if skips else ""))
    return lines


def loss_pass(label: str, model, data, cfg: SFTConfig, tokenizer, say: Callable[[str], None]) -> dict[str, float]:
    """``eval_losses`` with a progress bar or lines (``label``: which model and prompts)."""
    total = sum(len(s.eval) for s in data.sources if s.eval is not None)
    with PhaseProgress(f"{label} eval loss", total, unit="records", say=say) as progress:
        return eval_losses(model, data, cfg, tokenizer, tick=progress.update)


def answer_pass(label: str, model, tokenizer, prompts: list, *, max_new_tokens: int,
                say: Callable[[str], None]) -> list[str]:
    """Greedy answers to ``prompts``, one at a time, with a progress bar or lines."""
    from sftdist.observe.samples import generate_samples

    out = []
    with PhaseProgress(f"{label} answers", len(prompts), unit="answers", say=say) as progress:
        for p in prompts:
            [row] = generate_samples(model, tokenizer, [p], step=0, max_new_tokens=max_new_tokens, synced=False)
            out.append(row["completion"])
            progress.update()
    return out


def measure(cfg: SFTConfig, *, k: int, answers: int, max_new_tokens: int, run_dir: Optional[Path] = None,
            say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every figure and answer of the report (``baseline_report``), JSON-ready.

    Args:
        cfg: The run config: composed from overrides, or the run's own (``run_config``).
        k: Training conversations prepended to each eval conversation (0: zero-shot only).
        answers: Eval prompts per source answered greedily by each model.
        max_new_tokens: Longest generated answer.
        run_dir: A finished run whose ``final/`` model is measured too.
        say: The plan and the progress lines (stderr in the CLI).

    Raises:
        ConfigError: a config training would refuse on this machine (one process), no source has an eval
            split, or a model/tokenizer cannot be loaded.
        DataError: a bad record or a stale data cache.
    """
    from sftdist.data.build import build_datasets
    from sftdist.engine.deepspeed_wrap import resolve_precision
    from sftdist.engine.distributed import has_gpu
    from sftdist.engine.model import load_tokenizer
    from sftdist.observe.samples import eval_split_prompts

    t = cfg.train
    validate(cfg, dp_world=1, has_gpu=has_gpu())  # e.g. qlora or bf16 without a GPU: one line, before any work
    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg.data, tokenizer, max_length=t.max_length, seed=t.seed)
    if not data.has_eval():
        raise ConfigError("no data source has an eval split: the baseline measures the eval replies (give a source "
                          "eval_fraction or eval_path)")
    names = shot_sources(data, cfg, k)
    notes = []
    if k and not names:
        notes.append(f"no {k}-shot figures: " + ("with data.train_on=all the shots' tokens would be scored too"
                                                 if cfg.data.train_on == "all" else "no source with an eval split "
                                                 "holds conversations"))
    evals = {s.name: len(s.eval) for s in data.sources if s.eval is not None}
    for line in plan_lines(evals, k=k, shot_names=names, no_shots=notes[0] if notes else None, answers=answers,
                           max_new_tokens=max_new_tokens, run_dir=run_dir):
        say(line)
    with PhaseProgress(f"{k}-shot prompts", sum(evals[n] for n in names), unit="records", say=say) as progress:
        shot_data, used = few_shot_data(data, cfg, tokenizer, k, tick=progress.update)
    precision = resolve_precision(cfg.parallelism.precision, gpu=has_gpu())
    say(f"loading the base model ({precision})")
    model = base_model(cfg, tokenizer, precision)
    prompts = eval_split_prompts(data, answers)
    shot_prompts = [p for p in eval_split_prompts(shot_data, answers) if p.source in used]  # others: as zero-shot
    kw = {"max_new_tokens": max_new_tokens, "say": say}
    zero = loss_pass("zero-shot", model, data, cfg, tokenizer, say)
    zero_answers = answer_pass("zero-shot", model, tokenizer, prompts, **kw)
    few, few_answers = None, [None] * len(prompts)
    if used:
        few = loss_pass(f"{k}-shot", model, shot_data, cfg, tokenizer, say)
        shot_answers = iter(answer_pass(f"{k}-shot", model, tokenizer, shot_prompts, **kw))
        few_answers = [next(shot_answers) if p.source in used else None for p in prompts]
    tuned, tuned_answers = None, [None] * len(prompts)
    if run_dir is not None:
        adapter = (run_dir / "final" / "adapter_config.json").exists()
        if not adapter:  # the full fine-tuned weights replace the base: never hold both
            del model
            gc.collect()
            model = None
        say(f"loading the fine-tuned model from {run_dir / 'final'}")
        tuned_model = finetuned_model(cfg, run_dir, tokenizer, precision, model)
        tuned = loss_pass("fine-tuned", tuned_model, data, cfg, tokenizer, say)
        tuned_answers = answer_pass("fine-tuned", tuned_model, tokenizer, prompts, **kw)

    sources, overall = loss_rows(data, zero, few, tuned, used)
    answer_rows = answer_table(tokenizer, prompts, used, zero_answers, few_answers, tuned_answers)
    model_name = cfg.model.name_or_path or f"{cfg.model.from_config['model_type']} from model.from_config (seed {t.seed})"
    return {"settings": {"model": model_name, "precision": precision, "k": k if used else 0, "max_length": t.max_length,
                         "max_new_tokens": max_new_tokens, "run": str(run_dir) if run_dir else None, "notes": notes},
            "sources": sources, "overall": overall, "answers": answer_rows,
            "run_metrics": run_metrics(run_dir) if run_dir else None}


def _figure(losses: Optional[dict], key: str) -> Optional[float]:
    return losses.get(key) if losses else None


def loss_rows(data, zero: dict, few: Optional[dict], tuned: Optional[dict],
              used: dict) -> tuple[list[dict], dict]:
    """The report's eval losses: one row per source with an eval split, and the overall row."""
    sources = [{"source": s.name, "format": s.format, "records": len(s.eval),
                "supervised_tokens": zero[f"eval_supervised_tokens/{s.name}"],
                "zero_shot": zero[f"eval_loss/{s.name}"],
                "k_shot": _figure(few, f"eval_loss/{s.name}") if s.name in used else None,
                "k_shot_supervised_tokens": _figure(few, f"eval_supervised_tokens/{s.name}") if s.name in used else None,
                "shots_mean": sum(used[s.name]) / max(len(used[s.name]), 1) if s.name in used else None,
                "finetuned": _figure(tuned, f"eval_loss/{s.name}")}
               for s in data.sources if s.eval is not None]
    overall = {"records": sum(r["records"] for r in sources),
               "supervised_tokens": sum(r["supervised_tokens"] for r in sources),
               "zero_shot": zero["eval_loss"], "k_shot": _figure(few, "eval_loss"),
               "finetuned": _figure(tuned, "eval_loss")}
    return sources, overall


def answer_table(tokenizer, prompts: list, used: dict, zero_answers: list, few_answers: list,
                 tuned_answers: list) -> list[dict]:
    """One row per eval prompt: the prompt, its reference reply and each model's answer."""
    index: dict[str, int] = {}
    rows = []
    for p, z, f, ft in zip(prompts, zero_answers, few_answers, tuned_answers):
        index[p.source] = index.get(p.source, -1) + 1
        rows.append({"source": p.source, "index": index[p.source], "prompt": tokenizer.decode(p.input_ids),
                     "reference": tokenizer.decode(p.reference) if p.reference else None, "zero_shot": z,
                     "k_shot": f if p.source in used else None, "finetuned": ft})
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sftdist.config.checks import one_line
    from sftdist.data.messages import DataError
    from sftdist.tools.baseline_report import format_report, render_html

    parser = argparse.ArgumentParser(prog="sftdist-baseline", description=__doc__)
    parser.add_argument("--run", help="a finished run directory: also measure its final/ model (full or LoRA), "
                                      "with the run's own config")
    parser.add_argument("--k", type=int, default=3, help="training examples prepended as earlier turns (default 3); "
                                                          "0 skips the k-shot pass: zero-shot only, one eval pass less")
    parser.add_argument("--answers", type=int, default=3, help="eval prompts per source answered greedily by each "
                                                                "model (default 3; 0: no answers, losses only)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest generated answer (default 128)")
    parser.add_argument("--html", help="the HTML page (default: RUN_DIR/baseline.html with --run, else ./baseline.html)")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for training (not with --run)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if min(args.k, args.answers, args.max_new_tokens) < 0:
        parser.error("--k, --answers and --max-new-tokens take a number >= 0")
    run_dir = Path(args.run) if args.run else None
    try:
        if run_dir and args.overrides:
            raise ConfigError(f"--run uses the run's own config ({run_dir / 'config.yaml'}), so that the figures are "
                              f"the run's; drop the overrides {args.overrides}")
        cfg = run_config(run_dir) if run_dir else compose_config(args.overrides)
        from sftdist.data.streaming import bounded_streams

        for note in bounded_streams(cfg.data):  # (its few-shot examples come from a stream's first records)
            print(f"sftdist-baseline: {note}", file=sys.stderr)
        report = measure(cfg, k=args.k, answers=args.answers, max_new_tokens=args.max_new_tokens, run_dir=run_dir,
                         say=lambda line: print(f"sftdist-baseline: {line}", file=sys.stderr))
    except (ConfigError, DataError, HydraException, OmegaConfBaseException, OSError) as e:
        sys.exit(f"sftdist-baseline: error: {one_line(e)}")
    print(format_report(report))
    html_path = Path(args.html or (run_dir / "baseline.html" if run_dir else "baseline.html"))
    try:
        html_path.write_text(render_html(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        sys.exit(f"sftdist-baseline: error: cannot write the report: {e}")
    print(f"\nHTML page: {html_path}" + (f"; JSON: {args.json}" if args.json else ""))
