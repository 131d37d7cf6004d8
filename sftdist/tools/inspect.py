"""Render what training will see, for a human: sample records with their supervised tokens highlighted and
per-source statistics, as plain or ANSI text and as a standalone HTML page (``sftdist-data inspect``)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Optional

from sftdist.data.build import SourceData, TrainData, mix_report
from sftdist.data.loader import SampleSchedule
from sftdist.data.prepare import OK_STATUSES
from sftdist.data.tokenize import supervised_runs

ANSI_SUPERVISED, ANSI_PROMPT, ANSI_RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"
LEGEND = {"plain": "supervised tokens are between [[ and ]]",
          "ansi": f"{ANSI_SUPERVISED}supervised tokens in bold green{ANSI_RESET}, "
                  f"{ANSI_PROMPT}prompt dim{ANSI_RESET}"}
COLUMNS = ["source", "format", "records", "kept", "skipped/dropped", "supervised", "len p50/p90/p99/max",
           "samples/epoch", "sup. tokens/epoch", "audited"]
HTML_STYLE = """body{font-family:sans-serif;margin:2em}
pre{white-space:pre-wrap;background:#fafafa;padding:.6em;border:1px solid #ddd}
.prompt{color:#888}.sup{background:#d6f5d6;color:#000}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}td:first-child{text-align:left}"""


def decode_runs(tokenizer, runs: list[tuple[bool, list[int]]]) -> list[tuple[bool, str]]:
    """Decode each run, special tokens included, as it reads inside the whole sample.

    A run is taken as the growth of the decoded prefix rather than decoded alone, because tokenizers that
    drop a leading space (SentencePiece) or split a UTF-8 character over tokens decode pieces differently
    from the whole.
    """
    out, ids, text = [], [], ""
    for sup, run in runs:
        ids = ids + run
        longer = tokenizer.decode(ids, skip_special_tokens=False)
        # A prefix that ended inside a UTF-8 character decoded to U+FFFD, so it is no prefix of the whole.
        fits = longer.startswith(text)
        out.append((sup, longer[len(text):] if fits else tokenizer.decode(run, skip_special_tokens=False)))
        text = longer
    return out


def style_run(text: str, supervised: bool, style: str) -> str:
    """Mark one run of text for ``style`` ``plain`` (``[[...]]``), ``ansi`` or ``html`` (escaped spans).

    Example:
        >>> style_run("Hi<|im_end|>", True, "plain"), style_run("Q", False, "plain")
        ('[[Hi<|im_end|>]]', 'Q')
        >>> style_run("a<b>", True, "html")
        '<span class="sup">a&lt;b&gt;</span>'
    """
    if style == "plain":
        return f"[[{text}]]" if supervised else text
    if style == "html":
        return f'<span class="{"sup" if supervised else "prompt"}">{html.escape(text)}</span>'
    # Styles are reapplied on every line: pagers such as `less -R` reset attributes at each newline.
    on = ANSI_SUPERVISED if supervised else ANSI_PROMPT
    return "\n".join(f"{on}{line}{ANSI_RESET}" if line else "" for line in text.split("\n"))


def highlight_tokens(tokenizer, input_ids: list[int], labels: list[int], style: str = "plain") -> str:
    """The decoded sample with its supervised runs marked for ``style`` (``plain``, ``ansi`` or ``html``)."""
    runs = decode_runs(tokenizer, supervised_runs(input_ids, labels))
    return "".join(style_run(text, sup, style) for sup, text in runs)


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles p50/p90/p99 and the maximum of ``lengths`` (all 0 when empty).

    Example:
        >>> length_percentiles([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])
        {'p50': 5, 'p90': 9, 'p99': 10, 'max': 10}
    """
    xs = sorted(lengths)
    if not xs:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    pick = lambda p: xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]  # noqa: E731
    return {"p50": pick(50), "p90": pick(90), "p99": pick(99), "max": xs[-1]}


def source_stats(data: TrainData, schedule: SampleSchedule) -> list[list[str]]:
    """One row of ``COLUMNS`` per source: what was kept (and how many conversations ``data.split_turns``
    split into how many samples) and why the rest was not, the supervised fraction, sample lengths, and the
    realised mix of the first epoch."""
    rows = []
    for src, mix in zip(data.sources, mix_report(data, schedule)):
        st = src.stats
        bad = {k: v for k, v in sorted(st["statuses"].items()) if k not in OK_STATUSES}
        truncated = st["statuses"].get("truncated", 0)
        p = length_percentiles(list(src.train["num_tokens"]))
        rows.append([
            src.name, src.format, str(st["records"]),
            f"{st['kept']}" + (f" ({truncated} truncated)" if truncated else "")
            + (f" ({mix['split']['conversations']} split into {mix['split']['samples']} samples)"
               if mix["split"]["conversations"] else ""),
            f"{sum(bad.values())}" + (f" ({', '.join(f'{k}={v}' for k, v in bad.items())})" if bad else ""),
            f"{st['supervised_tokens'] / max(st['tokens'], 1):.1%}",
            "/".join(str(p[k]) for k in ("p50", "p90", "p99", "max")),
            f"{mix['samples_per_epoch']} ({mix['sample_share']:.1%})", f"{mix['supervised_token_share']:.1%}",
            str(st.get("audited", 0)),
        ])
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned, space-padded text table.

    Example:
        >>> print(format_table(["a", "bb"], [["xyz", "1"]]))
        a    bb
        xyz  1
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def render_samples(tokenizer, src: SourceData, n: int, style: str) -> list[tuple[str, str]]:
    """``(title, highlighted text)`` of the first ``n`` training records of one source."""
    out = []
    for i in range(min(n, len(src.train))):
        row = src.train[i]
        title = (f"{src.name} #{i}: {row['where']} "
                 f"({row['num_tokens']} tokens, {row['num_supervised']} supervised)")
        out.append((title, highlight_tokens(tokenizer, row["input_ids"], row["labels"], style)))
    return out


def render_html(samples: list[tuple[str, list[tuple[str, str]]]], rows: list[list[str]]) -> str:
    """A standalone HTML page (no external assets) of samples rendered with ``style="html"`` and the table.

    Args:
        samples: Per source, its name and its ``render_samples(..., style="html")``.
        rows: ``source_stats`` rows.
    """
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>sftdist data inspect</title>',
             f"<style>{HTML_STYLE}</style></head><body>", "<h1>sftdist data inspect</h1>",
             '<p><span class="sup">supervised tokens</span> <span class="prompt">prompt tokens</span></p>',
             "<h2>Statistics</h2><table>", "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in COLUMNS) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    parts.append("</table>")
    for name, items in samples:
        parts.append(f"<h2>{esc(name)}</h2>")
        parts += [f"<h3>{esc(title)}</h3><pre>{body}</pre>" for title, body in items]
    return "\n".join(parts + ["</body></html>", ""])


def inspect_report(tokenizer, data: TrainData, schedule: SampleSchedule, *, n: int, color: bool,
                   html_path: Optional[str]) -> str:
    """The text of ``sftdist-data inspect``: the first ``n`` records of every source with their supervised
    tokens highlighted, then the per-source statistics table.

    Args:
        tokenizer: The tokenizer the data was encoded with.
        data: The data stage's output (``build_datasets``).
        schedule: The sample schedule (``build_schedule``), for the realised mix.
        n: Records shown per source.
        color: Highlight with ANSI escapes instead of ``[[ ]]`` markers.
        html_path: Also write the same content as a standalone HTML page to this file.

    Returns:
        The report; it names ``html_path`` when one was written.
    """
    style = "ansi" if color else "plain"
    lines = [f"sftdist data inspect: {LEGEND[style]}", *(f"warning: {w}" for w in data.warnings), ""]
    for src in data.sources:
        for title, body in render_samples(tokenizer, src, n, style):
            lines += [f"=== {title}", body, ""]
    rows = source_stats(data, schedule)
    lines += ["per-source statistics (first epoch of the mix):", format_table(COLUMNS, rows)]
    if html_path:
        samples = [(src.name, render_samples(tokenizer, src, n, "html")) for src in data.sources]
        Path(html_path).write_text(render_html(samples, rows), encoding="utf-8")
        lines.append(f"HTML report written to {html_path}")
    return "\n".join(lines)
