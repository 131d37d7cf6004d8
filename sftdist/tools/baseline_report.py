"""The console table and the HTML page of ``sftdist-baseline``, from the report dict ``baseline_cli.measure``
builds (also what ``--json`` writes)."""

from __future__ import annotations

import html
from typing import Any, Optional

from sftdist.tools.inspect import HTML_STYLE, format_table

CONSOLE_CHARS = 240  # of a prompt's end and of an answer's start, on the console (the HTML page shows all)


def clipped(text: str, *, tail: bool = False) -> str:
    """``text`` shortened to ``CONSOLE_CHARS`` for the console: its end for a prompt, its start otherwise.

    Example:
        >>> clipped("x" * 300)[-5:], clipped("ab" * 150, tail=True)[:5], clipped("short")
        ('xx...', '...ab', 'short')
    """
    if len(text) <= CONSOLE_CHARS:
        return text
    return "..." + text[-CONSOLE_CHARS:] if tail else text[:CONSOLE_CHARS] + "..."


def _loss(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def columns(report: dict[str, Any]) -> list[str]:
    """The table's header: one loss column per model measured."""
    k = report["settings"]["k"]
    cols = ["source", "format", "eval records", "supervised tokens", "zero-shot"]
    if k:
        cols += [f"{k}-shot", "shots used (mean)"]
    if report["settings"]["run"]:
        cols += ["fine-tuned"]
    return cols


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per source with an eval split, then ``all`` (token-weighted over every source).

    Example:
        >>> r = {"settings": {"k": 3, "run": None}, "sources": [{"source": "chat", "format": "messages",
        ...      "records": 30, "supervised_tokens": 912, "zero_shot": 2.5, "k_shot": 2.25, "shots_mean": 3.0,
        ...      "finetuned": None}], "overall": {"records": 30, "supervised_tokens": 912, "zero_shot": 2.5,
        ...      "k_shot": 2.25, "finetuned": None}}
        >>> table_rows(r)
        [['chat', 'messages', '30', '912', '2.5000', '2.2500', '3.00'], ['all', '', '30', '912', '2.5000', '2.2500', '']]
    """
    s = report["settings"]
    out = []
    for row in [*report["sources"], {**report["overall"], "source": "all", "format": ""}]:
        cells = [row["source"], row["format"], str(row["records"]), f"{row['supervised_tokens']:,}",
                 _loss(row["zero_shot"])]
        if s["k"]:
            shots = row.get("shots_mean")
            cells += [_loss(row["k_shot"]), "" if row["source"] == "all" else "-" if shots is None else f"{shots:.2f}"]
        if s["run"]:
            cells += [_loss(row["finetuned"])]
        out.append(cells)
    return out


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """What the overall numbers say: did the prompt help, and did fine-tuning beat it?"""
    s, o = report["settings"], report["overall"]
    lines = list(s.get("notes", []))
    if o["k_shot"] is not None:
        lines.append(f"{s['k']}-shot prompting: eval loss {o['zero_shot']:.4f} -> {o['k_shot']:.4f} "
                     f"({o['k_shot'] - o['zero_shot']:+.4f} per token vs zero-shot)")
    if o["finetuned"] is not None:
        best_name, best = ((f"{s['k']}-shot", o["k_shot"]) if o["k_shot"] is not None and o["k_shot"] < o["zero_shot"]
                           else ("zero-shot", o["zero_shot"]))
        lines.append(f"fine-tuned: eval loss {o['finetuned']:.4f}, {o['finetuned'] - best:+.4f} per token vs the "
                     f"best prompt ({best_name}, {best:.4f})"
                     + (": fine-tuning bought nothing over prompting" if o["finetuned"] >= best else ""))
    m = report.get("run_metrics") or {}
    if m.get("final_eval_loss") is not None:
        lines.append(f"the run's metrics.jsonl: step-0 eval_loss {_loss(m.get('step0_eval_loss'))}, last eval_loss "
                     f"{_loss(m['final_eval_loss'])} (step {m['final_step']})")
    return lines


def _answer_fields(report: dict[str, Any]) -> list[tuple[str, str]]:
    fields = [("reference", "reference"), ("zero_shot", "zero-shot")]
    if report["settings"]["k"]:
        fields.append(("k_shot", f"{report['settings']['k']}-shot"))
    if report["settings"]["run"]:
        fields.append(("finetuned", "fine-tuned"))
    return fields


def format_report(report: dict[str, Any]) -> str:
    """The console text: settings, table, verdict and the greedy answers."""
    s = report["settings"]
    lines = [f"sftdist-baseline: {s['model']} ({s['precision']}), eval replies of {len(report['sources'])} "
             f"source(s), max_length {s['max_length']}" + (f", run {s['run']}" if s["run"] else ""),
             "mean token loss on the eval replies (lower is better):", "",
             format_table(columns(report), table_rows(report)), "", *verdict_lines(report)]
    if report["answers"]:
        lines += ["", f"greedy answers (at most {s['max_new_tokens']} new tokens):"]
    for a in report["answers"]:
        lines += ["", f"[{a['source']} #{a['index']}] prompt: {clipped(a['prompt'], tail=True)!r}"]
        lines += [f"  {label + ':':<12}{clipped(a[key])!r}" for key, label in _answer_fields(report)
                  if a.get(key) is not None]
    return "\n".join(lines)


def render_html(report: dict[str, Any]) -> str:
    """A standalone HTML page (no external assets): the table, the verdict, and the answers side by side."""
    esc = html.escape
    s = report["settings"]
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>sftdist baseline</title>',
             f"<style>{HTML_STYLE}\ntd pre{{text-align:left}}</style></head><body>", "<h1>sftdist baseline</h1>",
             f"<p>{esc(s['model'])} ({esc(s['precision'])}), max_length {s['max_length']}"
             + (f", run {esc(s['run'])}" if s["run"] else "") + ". Mean token loss on the eval replies.</p>",
             "<table>", "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns(report)) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in table_rows(report)]
    parts += ["</table>", *(f"<p>{esc(line)}</p>" for line in verdict_lines(report))]
    fields = _answer_fields(report)
    if report["answers"]:
        parts += [f"<h2>Greedy answers (at most {s['max_new_tokens']} new tokens)</h2>", "<table>",
                  "<tr><th>prompt</th>" + "".join(f"<th>{esc(label)}</th>" for _, label in fields) + "</tr>"]
    for a in report["answers"]:
        cells = [f"<td><b>{esc(a['source'])} #{a['index']}</b><pre>{esc(a['prompt'])}</pre></td>"]
        cells += [f"<td><pre>{esc(a.get(key) or '')}</pre></td>" for key, _ in fields]
        parts.append('<tr style="vertical-align:top">' + "".join(cells) + "</tr>")
    if report["answers"]:
        parts.append("</table>")
    return "\n".join(parts + ["</body></html>", ""])
