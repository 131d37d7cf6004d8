"""The mask audit: before any model is loaded, re-render a sample of every chat source and check its masks
with the rules of ``sftdist.data.mask_rules``, which locate messages independently of the encoder (by
re-rendering with sentinels, not by searching the reply text).

The audit runs where the cache entry is prepared (local rank 0 of each node), on records that preparation
reads anyway, and its verdict is kept with the entry (``audit.json``, keyed by the audit's settings), so that
a warm start reads the verdict instead of the source file. A failure stops the run with the source, record,
tokenizer, template family and broken rule, and is never kept: a rerun audits again. A template
that has no end-of-turn token stops the run before tokenisation (``check_chat_template``): its replies would
still be exact, but the model could not learn to stop. With ``data.require_end_of_turn=false`` the audit
only warns, once.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Optional

from sftdist.config import DataConfig, DataSource
from sftdist.data.mask_rules import MaskProblem, check_built_sample, check_history, check_masks
from sftdist.data.messages import DataError, to_conversation
from sftdist.data.sources import read_records
from sftdist.data.split_turns import encode_samples, history_rewrites, turn_messages
from sftdist.data.template_shape import template_shape
from sftdist.data.tokenize import supervised_runs, trained_turns


def supervised_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of supervised positions, as token ids.

    Example:
        >>> supervised_spans([5, 6, 7, 8, 9], [-100, 6, 7, -100, 9])
        [[6, 7], [9]]
    """
    return [ids for supervised, ids in supervised_runs(input_ids, labels) if supervised]


def check_record(tokenizer, messages: list[dict], tools, train_on: str, split_turns: str = "auto") -> list[MaskProblem]:
    """Problems with the masks of every sample one conversation becomes under ``data.split_turns`` (empty
    list when all are exact)."""
    problems = []
    for view, enc in encode_samples(tokenizer, messages, tools, train_on=train_on, split_turns=split_turns):
        if view is None:
            trained = trained_turns(messages, train_on)
            problems += check_masks(tokenizer, messages, tools, enc, trained, train_on)
            if split_turns != "never" and train_on != "all":
                problems += check_history(tokenizer, messages, tools, enc, trained)
            continue
        found = (check_built_sample(tokenizer, messages, tools, view.turn, enc) if view.built else
                 check_masks(tokenizer, turn_messages(messages, view.turn), tools, enc, [view.turn]))
        problems += [MaskProblem(p.rule, f"{p.detail} (the sample of reply {view.turn} alone)") for p in found]
    return problems


def template_warnings(tokenizer, split_turns: str = "auto") -> list[str]:
    """What the audit says once about a tokenizer's chat template, however many sources use it."""
    shape = template_shape(tokenizer)
    if shape.probe_error:
        return [f"chat template ({shape.family}) could not render a plain two-turn probe conversation "
                f"({shape.probe_error}); replies are trained without an end-of-turn token"]
    warnings = []
    if shape.end_of_turn is None:
        warnings.append(f"chat template ({shape.family}) has no end-of-turn token: nothing special closes a reply, "
                        f"so the model will not learn to stop (add an EOS/end-of-turn token to the template)")
    rewrites = history_rewrites(tokenizer) if split_turns == "never" else ()
    if rewrites:
        warnings.append(f"chat template ({shape.family}) renders replies otherwise than at inference (probes: "
                        f"{', '.join(rewrites)}), and data.split_turns=never trains them so: dropped reasoning or "
                        f"system prompts are never trained; data.split_turns=auto gives each such reply a sample")
    return warnings


def check_chat_template(cfg: DataConfig, tokenizer) -> None:
    """Before any tokenisation: chat sources need a chat template, and one that closes each reply with an
    end-of-turn token (unless ``data.require_end_of_turn=false``).

    Raises:
        DataError: naming the sources, the tokenizer and how to supply a template.
    """
    chat = [f"{s.name} ({s.format})" for s in cfg.sources if s.format != "text"]
    if not chat:
        return
    name = tokenizer.name_or_path
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data sources {', '.join(chat)} are conversations, but tokenizer {name!r} has no chat "
                        f"template: use the tokenizer of a chat/instruct model (model.tokenizer=...), or give one "
                        f"with model.chat_template=FILE.jinja (or the template text)", "no_chat_template")
    shape = template_shape(tokenizer)
    if shape.end_of_turn is None and not shape.probe_error and cfg.require_end_of_turn:
        raise DataError(f"the chat template of tokenizer {name!r} ({shape.family}) renders no end-of-turn token "
                        f"after an assistant reply, so the model would never learn to stop: end each assistant turn "
                        f"with an EOS/end-of-turn token (e.g. {{{{ eos_token }}}}) in model.chat_template=FILE.jinja, "
                        f"or set data.require_end_of_turn=false to train anyway", "no_end_of_turn")


def audit_pool_size(source: DataSource, samples: int) -> int:
    """How many first good records the audit of ``source`` draws from (0: no audit).

    Example:
        >>> chat = DataSource(name="c", path="c.jsonl")
        >>> audit_pool_size(chat, 32), audit_pool_size(chat, 0)
        (640, 0)
    """
    return 0 if source.format == "text" or samples <= 0 else samples * 20


def audit_source(source: DataSource, tokenizer, *, train_on: str, samples: int, seed: int,
                 split_turns: str = "auto", pool: Optional[list] = None) -> int:
    """Audit up to ``samples`` records of a chat source, drawn by ``seed`` from its first 20x records; every
    sample of a record that ``split_turns`` splits.

    Bad records themselves are not the audit's concern (the data stage reports them); it skips them.

    Args:
        pool: The source's first ``audit_pool_size`` good records as ``(where, row)`` (within
            ``max_samples``), when the caller read them already; else they are read here.

    Returns:
        The number of records audited.

    Raises:
        DataError: naming the source, record and tokenizer of the first record whose masks are wrong.
    """
    if not audit_pool_size(source, samples):
        return 0
    pool = first_good_records(source, audit_pool_size(source, samples)) if pool is None else pool
    audited = 0
    for where, row in random.Random(f"audit:{seed}").sample(pool, min(samples, len(pool))):
        try:
            messages, tools = to_conversation(row, source.format, where, dict(source.columns))
            problems = check_record(tokenizer, messages, tools, train_on, split_turns)
        except Exception:  # a record the data stage already rejected and counted (bad fields, template errors)
            continue
        if problems:
            raise DataError(f"mask audit failed for data source {source.name!r}, {where}, with the chat template of "
                            f"tokenizer {tokenizer.name_or_path!r}: {'; '.join(map(str, problems))}", "mask_audit")
        audited += 1
    return audited


def first_good_records(source: DataSource, size: int) -> list[tuple[str, dict]]:
    """The first ``size`` records of a source that read as rows, within its first ``max_samples``; reads no
    further into the file."""
    pool = []
    for n, (where, row) in enumerate(read_records(source), start=1):
        if not isinstance(row, DataError):
            pool.append((where, row))
        if len(pool) >= size or n == source.max_samples:
            break
    return pool


VERDICT_FILE = "audit.json"


def verdict_key(*, samples: int, seed: int, train_on: str, split_turns: str) -> str:
    """The settings an audit verdict holds for.

    Example:
        >>> verdict_key(samples=32, seed=0, train_on="assistant", split_turns="auto")
        'samples=32,seed=0,train_on=assistant,split_turns=auto'
    """
    return f"samples={samples},seed={seed},train_on={train_on},split_turns={split_turns}"


def read_verdicts(entry: Path) -> dict[str, int]:
    """The audit verdicts kept with a cache entry: settings key -> records audited (``{}`` when none)."""
    try:
        return json.loads((entry / VERDICT_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_verdict(entry: Path, key: str, audited: int) -> None:
    """Keep a passed audit's verdict with the entry, beside the others, written whole under a temporary name and
    renamed into place (a reader never sees half a file)."""
    verdicts = {**read_verdicts(entry), key: audited}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{VERDICT_FILE}-", dir=entry)
    except OSError:  # a cache someone else owns, read-only: the audit then runs at each start, as before
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(verdicts, f, indent=2)
        os.replace(tmp, entry / VERDICT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def audit_entry(entry: Path, source: DataSource, tokenizer, *, train_on: str, samples: int, seed: int,
                split_turns: str = "auto", pool: Optional[list] = None) -> int:
    """The audit verdict of a cache entry for these settings: the kept one, else the audit run now (on
    ``pool``, or on the source's first records) and kept.

    Returns:
        The number of records audited (0 for a text source or ``samples=0``).

    Raises:
        DataError: when the audit fails (nothing is kept then).
    """
    if not audit_pool_size(source, samples):
        return 0
    key = verdict_key(samples=samples, seed=seed, train_on=train_on, split_turns=split_turns)
    kept = read_verdicts(entry)
    if key in kept:
        return int(kept[key])
    audited = audit_source(source, tokenizer, train_on=train_on, samples=samples, seed=seed,
                           split_turns=split_turns, pool=pool)
    write_verdict(entry, key, audited)
    return audited
