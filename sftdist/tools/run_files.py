"""Read what a run directory holds (``metrics.jsonl``, ``config.yaml``, Hydra's overrides) for the tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_metrics(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a ``metrics.jsonl`` in step order, and what was skipped. A truncated last line (a run
    killed mid-write) and corrupt lines are skipped, not fatal; a step logged twice keeps its last row.

    >>> parse_metrics('{"step": 2, "loss": 1.5}\\n{"step": 1, "loss": 2.0}\\n{"step": 3, "lo')
    ([{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}], ['truncated last line'])
    """
    lines = [line for line in text.splitlines() if line.strip()]
    by_step: dict[int, dict[str, Any]] = {}
    corrupt = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            by_step[int(row["step"])] = row
        except (ValueError, TypeError, KeyError):
            corrupt.append(number)
    skipped = ["truncated last line"] if corrupt and corrupt[-1] == len(lines) else []
    if middle := [n for n in corrupt if n != len(lines)]:
        skipped.insert(0, f"{len(middle)} corrupt line(s) skipped (first: line {middle[0]})")
    return [by_step[step] for step in sorted(by_step)], skipped


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested dicts and lists.

    >>> flatten({"train": {"lr": 1e-05}, "data": {"sources": [{"weight": 1}]}})
    {'train.lr': 1e-05, 'data.sources[0].weight': 1}
    """
    if isinstance(tree, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in tree.items()]
    elif isinstance(tree, list):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(tree)]
    else:
        return {prefix: tree}
    if not items:
        return {prefix: tree} if prefix else {}
    return {key: leaf for k, v in items for key, leaf in flatten(v, k).items()}


def read_yaml(path: Path) -> Any:
    """A YAML file as plain containers (OmegaConf reads floats like ``1e-5`` as floats, as training did)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
