"""``sftdist-data quality``: run the ``quality`` detectors and token-length checks over every source of a
data config (split as training splits it) and render the findings as a table, JSON and a standalone HTML page."""

from __future__ import annotations

import html
import json
from collections import Counter
from typing import Any, Iterable

from sftdist.config import DataConfig
from sftdist.data import quality as q
from sftdist.data.messages import SOURCE_KEY, DataError, to_conversation
from sftdist.data.prepare import bad_record_error, no_usable_record, raw_splits
from sftdist.data.tokenize import IGNORE_INDEX, encode_conversation
from sftdist.tools.inspect import format_table, length_percentiles

COLUMNS = ["source", "records", "exact dup", "near dup", "conflicting", "empty", "short", "cut", "echo", "refusal",
           "2 user", "sys mid", "over max_len", "tokens p50/p90/p99/max", "eval overlap"]
KEYS = ["records", "exact_duplicates", "near_duplicates", "conflicting_prompts", "empty_replies", "short_replies",
        "cut_replies", "echo_replies", "refusals", "consecutive_user", "system_mid", "over_max_length"]


def read_conversations(rows: dict[str, list] | None, fmt: str, columns: dict,
                       source_key: str = SOURCE_KEY) -> tuple[list, list, dict[str, int], str]:
    """``(records, tools, skipped, first_error)`` of a ``raw_splits`` table: the records that convert to
    messages, the others counted per reason as the data stage counts them, and the first one's error message
    (the data stage's own, naming file, record and key; "" when every record converts)."""
    records, tools, skipped, first = [], [], Counter(), ""
    rows = rows or {"raw": [], "where": [], "read_error": []}
    for raw, where, err in zip(rows["raw"], rows["where"], rows["read_error"]):
        try:
            if err:
                raise DataError(err, "invalid_json")
            messages, tool_list = to_conversation(json.loads(raw), fmt, where, columns, source_key=source_key)
        except DataError as e:
            skipped[e.reason] += 1
            first = first or str(e)
            continue
        records.append((where, messages))
        tools.append(tool_list)
    return records, tools, dict(skipped), first


def check_read(name: str, on_bad_record: str, records: int, kept: int, skipped: dict[str, int], first: str,
               split: str) -> None:
    """Stop where the data stage would stop: at the first bad record under ``data.on_bad_record=error``, and,
    whatever it says, when no record of the train split converts (nothing to train on).

    Raises:
        DataError: the data stage's own error for the same input.
    """
    if skipped and on_bad_record == "error":
        raise bad_record_error(first, name, next(iter(skipped)))
    if split == "train" and not kept:
        raise no_usable_record(name, records, skipped, first)


def token_lengths(records: list, tools: list, tokenizer, *, max_length: int, train_on: str) -> dict[str, Any]:
    """Token-length percentiles of the rendered records, how many exceed ``max_length``, and how many
    supervised tokens truncating them to ``max_length`` would lose."""
    lengths, over, lost = [], [], 0
    for i, ((where, messages), tool_list) in enumerate(zip(records, tools)):
        try:
            labels = encode_conversation(tokenizer, messages, tools=tool_list, train_on=train_on)["labels"]
        except Exception:  # MaskError or a template refusing the record: the data stage reports those
            continue
        lengths.append(len(labels))
        if len(labels) > max_length:
            over.append(i)
            lost += sum(x != IGNORE_INDEX for x in labels[max_length:])
    return {"percentiles": length_percentiles(lengths), "over_max_length": over, "truncated_supervised_tokens": lost}


def _finding(records: list, items: list, n: int) -> dict[str, Any]:
    return {"count": len(items), "examples": q.examples(records, items, n)}


def source_quality(records: list, tools: list, tokenizer, *, max_length: int, train_on: str, near_threshold: float,
                   min_reply_tokens: int, refusal_patterns: Iterable[str], n_examples: int = 3) -> dict[str, Any]:
    """Every finding of one split of one source: per check a count and up to ``n_examples`` examples
    (the ``where`` of the records involved)."""
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    lengths = token_lengths(records, tools, tokenizer, max_length=max_length, train_on=train_on)
    roles = q.role_problems(records)
    found = {
        "exact_duplicates": q.exact_duplicates(records),
        "near_duplicates": [(d, f) for d, f, _ in q.near_duplicates(records, near_threshold)],
        "conflicting_prompts": q.conflicting_prompts(records),
        "empty_replies": q.empty_replies(records),
        "short_replies": q.short_replies(records, min_reply_tokens, count),
        "cut_replies": q.cut_replies(records),
        "echo_replies": q.echo_replies(records),
        "refusals": q.refusals(records, refusal_patterns),
        "consecutive_user": roles["consecutive_user"],
        "system_mid": roles["system_mid"],
        "over_max_length": lengths["over_max_length"],
    }
    out: dict[str, Any] = {"records": len(records)}
    out.update({k: _finding(records, v, n_examples) for k, v in found.items()})
    out["token_percentiles"] = lengths["percentiles"]
    out["truncated_supervised_tokens"] = lengths["truncated_supervised_tokens"]
    return out


def quality_report(cfg: DataConfig, tokenizer, *, max_length: int, seed: int, near_threshold: float = 0.8,
                   min_reply_tokens: int = 3, refusal_patterns: Iterable[str] = q.DEFAULT_REFUSALS,
                   n_examples: int = 3) -> dict[str, Any]:
    """The quality report of every chat source of ``cfg`` (``text`` sources are listed as skipped).

    Returns:
        ``{"settings": ..., "sources": {name: {"train": findings, "eval": findings | None, "unreadable": n,
        "unreadable_reasons": {reason: n}, "eval_overlap": ...}}, "cross_source": [{"source", "other", "count",
        "examples"}], "skipped": [...]}``.

    Raises:
        DataError: as the data stage raises it for the same records: the first bad one under
            ``data.on_bad_record=error``; a source none of whose training records converts, whatever it says.
    """
    refusal_patterns = list(refusal_patterns)
    report: dict[str, Any] = {"settings": {"max_length": max_length, "near_threshold": near_threshold,
                                           "min_reply_tokens": min_reply_tokens, "refusal_patterns": refusal_patterns},
                              "sources": {}, "cross_source": [], "skipped": []}
    kept: list[tuple[str, list]] = []
    kw = dict(max_length=max_length, train_on=cfg.train_on, near_threshold=near_threshold,
              min_reply_tokens=min_reply_tokens, refusal_patterns=refusal_patterns, n_examples=n_examples)
    for i, source in enumerate(cfg.sources):
        if source.format == "text":
            report["skipped"].append(source.name)
            continue
        key = f"data.sources.{i}"
        train_rows, eval_rows = raw_splits(source, seed)
        train, train_tools, skipped = _read_checked(train_rows, source, cfg.on_bad_record, key, "train")
        entry: dict[str, Any] = {"train": source_quality(train, train_tools, tokenizer, **kw), "eval": None,
                                 "unreadable": sum(skipped.values()), "unreadable_reasons": skipped,
                                 "eval_overlap": None}
        if eval_rows is not None:
            evaluation, eval_tools, eval_skipped = _read_checked(eval_rows, source, cfg.on_bad_record, key, "eval")
            entry["eval"] = source_quality(evaluation, eval_tools, tokenizer, **kw)
            entry["unreadable"] += sum(eval_skipped.values())
            entry["unreadable_reasons"] = dict(Counter(skipped) + Counter(eval_skipped))
            pairs = q.overlap(train, evaluation)
            entry["eval_overlap"] = {"count": len(pairs), "examples": [[evaluation[e][0], train[t][0]]
                                                                        for e, t in pairs[:n_examples]]}
        for other, records in kept:
            pairs = q.overlap(records, train)
            if pairs:
                shown = [[train[i][0], records[j][0]] for i, j in pairs[:n_examples]]
                report["cross_source"].append({"source": source.name, "other": other, "count": len(pairs),
                                               "examples": shown})
        kept.append((source.name, train))
        report["sources"][source.name] = entry
    return report


def _read_checked(rows: dict[str, list], source, on_bad_record: str, key: str, split: str) -> tuple[list, list, dict]:
    records, tools, skipped, first = read_conversations(rows, source.format, dict(source.columns), key)
    check_read(source.name, on_bad_record, len(rows["raw"]), len(records), skipped, first, split)
    return records, tools, skipped


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row of ``COLUMNS`` per source split (``name`` and ``name [eval]``)."""
    rows = []
    for name, entry in report["sources"].items():
        for split in ("train", "eval"):
            f = entry[split]
            if f is None:
                continue
            p = f["token_percentiles"]
            lost = f["truncated_supervised_tokens"]
            over = f"{f['over_max_length']['count']}" + (f" (-{lost} sup.)" if lost else "")
            overlap = "-" if split == "train" or entry["eval_overlap"] is None else str(entry["eval_overlap"]["count"])
            rows.append([name if split == "train" else f"{name} [eval]", str(f["records"]),
                         *(str(f[k]["count"]) for k in KEYS[1:-1]), over,
                         "/".join(str(p[k]) for k in ("p50", "p90", "p99", "max")), overlap])
    return rows


def join_wheres(wheres: list[str], limit: int = 4) -> str:
    """Locations joined with `` ~ ``, the file named once when they share it, at most ``limit`` of them.

    Example:
        >>> join_wheres(["a.json: record 3", "a.json: record 1"])
        'a.json: record 3 ~ record 1'
    """
    files = {w.rsplit(": ", 1)[0] for w in wheres}
    shown = [wheres[0]] + ([w.rsplit(": ", 1)[-1] for w in wheres[1:limit]] if len(files) == 1 else wheres[1:limit])
    return " ~ ".join(shown) + (f" (+{len(wheres) - limit} more)" if len(wheres) > limit else "")


def example_lines(report: dict[str, Any]) -> list[str]:
    """``name: check: where, where`` for each example of each non-empty finding."""
    lines = []
    for name, entry in report["sources"].items():
        for split in ("train", "eval"):
            for k in KEYS[1:]:
                for ex in (entry[split] or {}).get(k, {}).get("examples", []):
                    lines.append(f"{name}{' [eval]' if split == 'eval' else ''}: {k}: {join_wheres(ex)}")
        for ex in (entry["eval_overlap"] or {}).get("examples", []):
            lines.append(f"{name}: eval_overlap: {join_wheres(ex)}")
    for c in report["cross_source"]:
        lines += [f"{c['source']} vs {c['other']}: overlap: {join_wheres(ex)}" for ex in c["examples"]]
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The console text: settings, the per-source table, cross-source overlap, then examples."""
    s = report["settings"]
    lines = [f"sftdist data quality (max_length={s['max_length']}, near_threshold={s['near_threshold']}, "
             f"short = under {s['min_reply_tokens']} tokens)", format_table(COLUMNS, table_rows(report))]
    lines += [f"overlap: {c['count']} records of {c['source']} also in {c['other']}" for c in report["cross_source"]]
    lines += [f"skipped (format text): {name}" for name in report["skipped"]]
    lines += [f"skipped (data.on_bad_record=skip): {name}: {entry['unreadable']} records {entry['unreadable_reasons']}"
              for name, entry in report["sources"].items() if entry.get("unreadable")]
    ex = example_lines(report)
    return "\n".join(lines + (["", "examples:", *ex] if ex else []))


def render_html(report: dict[str, Any]) -> str:
    """A standalone HTML page (no external assets) of the table, the overlaps and the examples."""
    from sftdist.tools.inspect import HTML_STYLE

    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>sftdist data quality</title>',
             f"<style>{HTML_STYLE}</style></head><body>", "<h1>sftdist data quality</h1>",
             f"<p>{esc(json.dumps(report['settings']))}</p>", "<table>",
             "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in table_rows(report)]
    parts.append("</table><h2>Overlap between sources</h2><ul>")
    parts += [f"<li>{c['count']} records of {esc(c['source'])} also in {esc(c['other'])}</li>"
              for c in report["cross_source"]]
    parts.append("</ul><h2>Examples</h2><ul>")
    parts += [f"<li>{esc(line)}</li>" for line in example_lines(report)]
    return "\n".join(parts + ["</ul></body></html>", ""])
