"""``sftdist-prepare [overrides]``, ``sftdist-data inspect [--n N] [--html FILE] [overrides]`` and
``sftdist-data quality [--html FILE] [--json FILE] [overrides]``: the data stage alone, on CPU, with the
same config as training (e.g. a SLURM CPU job that the GPU job depends on)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from sftdist.config import ConfigError, SFTConfig, compose_config
from sftdist.data.build import build_for_run, mix_report, split_note
from sftdist.data.messages import DataError
from sftdist.data.streaming import bounded_streams


PREPARE_USAGE = "usage: sftdist data prepare [key=value ...]   (alias: sftdist-prepare)"


def load_data(cfg: SFTConfig):
    """Tokenizer, data, schedule and cache directories exactly as a training run with this config would
    build them."""
    from sftdist.engine.model import load_tokenizer

    for note in bounded_streams(cfg.data):
        print(note, file=sys.stderr)
    tokenizer = load_tokenizer(cfg.model)
    return (tokenizer, *build_for_run(cfg, tokenizer))


def prepare_main(argv: Optional[list[str]] = None) -> None:
    """Build the tokenised-data cache of every source, audit the masks, and print the realised mix."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in overrides):
        print(f"{PREPARE_USAGE}\n\n{prepare_main.__doc__}")
        return
    start = time.time()
    try:
        cfg = compose_config(overrides)
        _, data, schedule, dirs = load_data(cfg)
    except (ConfigError, DataError) as e:
        sys.exit(f"sftdist-prepare: error: {e}")
    for warning in data.warnings:
        print(f"warning: {warning}")
    for row, d in zip(mix_report(data, schedule), dirs):
        print(f"{row['source']}: {row['kept']}/{row['records']} records kept {row['statuses']}"
              f"{split_note(row['split'])}; "
              f"{row['sample_share']:.1%} of samples, {row['supervised_token_share']:.1%} of supervised tokens; "
              f"{row['audited']} masks audited; cache {d}")
    print(f"data stage done in {time.time() - start:.1f}s; training with the same overrides reuses this cache")


def data_main(argv: Optional[list[str]] = None) -> None:
    """``sftdist-data inspect``: rendered samples with supervised tokens highlighted, and data statistics."""
    from sftdist.tools.inspect import inspect_report

    parser = argparse.ArgumentParser(prog="sftdist-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show rendered samples with their masks, and per-source statistics")
    p.add_argument("--n", type=int, default=3, help="samples to show per source")
    p.add_argument("--html", help="also write an HTML page to this file")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for training")
    add_quality_parser(sub)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "quality":
        return quality_main(args)
    try:
        tokenizer, data, schedule, _ = load_data(compose_config(args.overrides))
    except (ConfigError, DataError) as e:
        sys.exit(f"sftdist-data: error: {e}")
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(inspect_report(tokenizer, data, schedule, n=args.n, color=color, html_path=args.html))


def add_quality_parser(sub) -> None:
    """The ``quality`` subcommand's options."""
    from sftdist.data.quality import DEFAULT_REFUSALS

    p = sub.add_parser("quality", help="duplicates, conflicting, short, cut and refusal replies, role-order slips, "
                                       "token-length outliers and train/eval overlap, per source")
    p.add_argument("--near-threshold", type=float, default=None,
                   help="Jaccard similarity of reply word 3-grams that counts as a near duplicate "
                        "(default: data.near_dup_threshold)")
    p.add_argument("--min-reply-tokens", type=int, default=None,
                   help="a reply under this many tokens is short (default: data.min_reply_tokens, or 3 when off)")
    p.add_argument("--refusal-pattern", action="append", default=None,
                   help=f"a refusal/boilerplate phrase (repeatable; replaces the defaults {list(DEFAULT_REFUSALS)})")
    p.add_argument("--examples", type=int, default=3, help="examples listed per finding")
    p.add_argument("--html", help="also write an HTML page to this file")
    p.add_argument("--json", help="also write the whole report as JSON to this file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for training")


def quality_main(args) -> None:
    """``sftdist-data quality``: the data quality report of every source, with the run's tokenizer and split."""
    import json
    from pathlib import Path

    from sftdist.data.quality import DEFAULT_REFUSALS
    from sftdist.engine.model import load_tokenizer
    from sftdist.tools.quality_report import format_report, quality_report, render_html

    try:
        cfg = compose_config(args.overrides)
        for note in bounded_streams(cfg.data):
            print(note, file=sys.stderr)
        d = cfg.data
        threshold = d.near_dup_threshold if args.near_threshold is None else args.near_threshold
        if not 0 < threshold <= 1:
            raise ConfigError(f"--near-threshold={threshold} must be in (0, 1]")
        report = quality_report(d, load_tokenizer(cfg.model), max_length=cfg.train.max_length, seed=cfg.train.seed,
                                near_threshold=threshold, min_reply_tokens=args.min_reply_tokens or d.min_reply_tokens or 3,
                                refusal_patterns=args.refusal_pattern or DEFAULT_REFUSALS, n_examples=args.examples)
    except (ConfigError, DataError) as e:
        sys.exit(f"sftdist-data: error: {e}")
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"JSON report written to {args.json}")
    if args.html:
        Path(args.html).write_text(render_html(report), encoding="utf-8")
        print(f"HTML report written to {args.html}")
