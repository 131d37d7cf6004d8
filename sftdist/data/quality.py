"""Pure detectors of SFT data problems over ``(where, messages)`` records: duplicates, near duplicates,
conflicting supervision, empty/short/cut/echoed/refusal replies, role-order slips and overlap between sets.

Every detector takes a list of records ``(where, messages)`` (``messages`` as ``to_conversation`` returns
them) and returns plain lists of indices or index pairs, so that the report (``quality_report``) and the
data-stage filters (``prepare``) count exactly the same things.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any, Callable, Iterable, Optional

Record = tuple[str, list[dict[str, Any]]]

DEFAULT_REFUSALS = ("as an ai language model", "as an ai model", "i cannot help with", "i can't help with",
                    "i'm sorry, but i cannot", "i am unable to assist", "i'm unable to assist", "i cannot fulfill",
                    "i can't assist with")
SHINGLE_WORDS = 3  # word n-grams compared by MinHash
# Replies shorter than this are left out of near-duplicate search: "Yes." or "42" coincide by chance across
# unrelated prompts; identical whole conversations are still caught by the exact check.
NEAR_MIN_WORDS = 8
NUM_PERM = 128
_MERSENNE = (1 << 31) - 1
_CLOSING = tuple('.!?)]}"\'`*>…。！？') + ("```",)
_DANGLING = tuple(",;:-–—(/&")
_LIST_ITEM = re.compile(r"^\s*([-*•+]|\d+[.)]|#+)\s")
_FENCE = re.compile(r"^\s*```", re.M)
_ATTRIBUTION = re.compile(r"[\"'”]\s*[-–—]\s*\w")


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped.

    Example:
        >>> normalize("  Hello\\n\\n  WORLD ")
        'hello world'
    """
    return " ".join(text.lower().split())


def message_text(m: dict[str, Any]) -> str:
    """A message's content plus its tool calls as canonical JSON (a tool-call-only reply is not empty).

    Example:
        >>> call = {"function": {"name": "f", "arguments": {}}}
        >>> message_text({"role": "assistant", "content": "", "tool_calls": [call]})
        '[{"function": {"arguments": {}, "name": "f"}}]'
    """
    calls = m.get("tool_calls")
    return m["content"] + (json.dumps(calls, sort_keys=True) if calls else "")


def replies(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """``(index, text)`` of each assistant message that is trained (not marked ``train: false``)."""
    return [(i, message_text(m)) for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def conversation_key(messages: list[dict[str, Any]]) -> str:
    """Hash of the normalised whole conversation (roles included): equal for exact duplicates.

    Example:
        >>> a = [{"role": "user", "content": "Hi  there"}, {"role": "assistant", "content": "Yo"}]
        >>> b = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "YO"}]
        >>> conversation_key(a) == conversation_key(b)
        True
    """
    return _hash("\x1e".join(f"{m['role']}\x1f{normalize(message_text(m))}" for m in messages))


def split_prompt(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """The normalised prompt (everything before the last assistant message) and that last reply.

    Example:
        >>> split_prompt([{"role": "user", "content": "Hi  You"}, {"role": "assistant", "content": "Yo!"}])
        ('user\\x1fhi you', 'yo!')
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = "\x1e".join(f"{m['role']}\x1f{normalize(message_text(m))}" for m in messages[:last])
    return prompt, normalize(message_text(messages[last]))


def exact_duplicates(records: list[Record]) -> list[tuple[int, int]]:
    """``(duplicate, first)`` for every record whose normalised conversation equals an earlier one's.

    Example:
        >>> u = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        >>> exact_duplicates([("r0", u("Hi", "Yo")), ("r1", u("Q", "A")), ("r2", u("hi ", "yo"))])
        [(2, 0)]
    """
    first: dict[str, int] = {}
    out = []
    for i, (_, messages) in enumerate(records):
        key = conversation_key(messages)
        if key in first:
            out.append((i, first[key]))
        else:
            first[key] = i
    return out


def shingles(text: str, k: int = SHINGLE_WORDS) -> set[str]:
    """Word ``k``-grams of the normalised text (the whole text when it has fewer words).

    Example:
        >>> sorted(shingles("a b c d"))
        ['a b c', 'b c d']
    """
    words = normalize(text).split()
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))} if words else set()


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int) -> tuple:
    import numpy as np

    seeds = [hashlib.blake2b(f"perm{p}".encode(), digest_size=8).digest() for p in range(num_perm)]
    a = np.array([1 + int.from_bytes(s[:4], "little") % (_MERSENNE - 1) for s in seeds], dtype=np.uint64)
    b = np.array([int.from_bytes(s[4:], "little") % _MERSENNE for s in seeds], dtype=np.uint64)
    return a[:, None], b[:, None]


def minhash(items: Iterable[str], num_perm: int = NUM_PERM) -> list[int]:
    """MinHash signature: per seeded universal hash ``(a*x + b) mod 2^31-1``, the minimum over ``items``.

    Fixed seeds (derived from the permutation index) make signatures, and so dedup, the same on every run;
    values stay below 2^31, so ``a*x`` fits in 64 bits.

    Example:
        >>> minhash({"a b c"}) == minhash({"a b c"}), len(minhash({"x"}, 16))
        (True, 16)
    """
    import numpy as np

    xs = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % _MERSENNE
                   for s in items], dtype=np.uint64)
    if not len(xs):
        return [_MERSENNE] * num_perm
    a, b = _permutations(num_perm)
    return ((a * xs[None, :] + b) % np.uint64(_MERSENNE)).min(axis=1).tolist()


def lsh_rows(threshold: float, num_perm: int = NUM_PERM) -> int:
    """Rows per LSH band: the most that still make a pair at ``threshold`` a candidate with p >= 0.999.

    LSH only proposes candidates; each is then checked with its exact Jaccard similarity, so the bands are
    chosen for recall and the exact check removes the false positives.

    Example:
        >>> lsh_rows(0.8), lsh_rows(0.5)
        (5, 2)
    """
    best = 1
    for r in range(1, num_perm + 1):
        if 1 - (1 - threshold ** r) ** (num_perm // r) >= 0.999:
            best = r
    return best


def jaccard(a: set, b: set) -> float:
    """Jaccard similarity of two sets (0 when both are empty)."""
    return len(a & b) / len(a | b) if a or b else 0.0


def near_duplicates(records: list[Record], threshold: float = 0.8,
                    min_words: int = NEAR_MIN_WORDS) -> list[tuple[int, int, float]]:
    """``(duplicate, first, jaccard)`` for records whose trained replies' word shingles have Jaccard similarity
    >= ``threshold`` with an earlier record's, exact duplicates excluded (``exact_duplicates`` has those).

    Candidates come from MinHash LSH (``NUM_PERM`` permutations, banded by ``lsh_rows``); each is confirmed
    with the exact Jaccard of the shingle sets, so the result does not depend on hash luck. Each record is
    paired with its most similar earlier record.

    Example:
        >>> u = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]
        >>> text = "the quick brown fox jumps over the lazy dog and runs far away into the woods"
        >>> other = "something else entirely here and now ok"
        >>> near_duplicates([("r0", u(text)), ("r1", u(text + " today")), ("r2", u(other))])
        [(1, 0, 0.93)]
    """
    exact = {d for d, _ in exact_duplicates(records)}
    sets = [shingles(" ".join(t for _, t in replies(m))) if i not in exact else set()
            for i, (_, m) in enumerate(records)]
    rows = lsh_rows(threshold)
    buckets: dict[tuple, list[int]] = {}
    out = []
    for i, s in enumerate(sets):
        if len(s) < max(1, min_words - SHINGLE_WORDS + 1):
            continue
        sig = minhash(s)
        keys = [(band, tuple(sig[band * rows:(band + 1) * rows])) for band in range(NUM_PERM // rows)]
        candidates = sorted({j for key in keys for j in buckets.get(key, [])})
        scored = [(round(jaccard(s, sets[j]), 2), -j) for j in candidates]
        best = max((sc for sc in scored if sc[0] >= threshold), default=None)
        if best is not None:
            out.append((i, -best[1], best[0]))
        for key in keys:
            buckets.setdefault(key, []).append(i)
    return out


def conflicting_prompts(records: list[Record]) -> list[list[int]]:
    """Groups of records that share a normalised prompt but end in different replies (each group in file
    order, groups ordered by their first record): contradictory supervision for the same input.

    Example:
        >>> u = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        >>> conflicting_prompts([("r0", u("2+2?", "4")), ("r1", u("2+2?", "5")), ("r2", u("2+2?", "4")),
        ...                      ("r3", u("x", "y"))])
        [[0, 1, 2]]
    """
    groups: dict[str, list[int]] = {}
    answers: dict[str, set] = {}
    for i, (_, messages) in enumerate(records):
        prompt, reply = split_prompt(messages)
        groups.setdefault(prompt, []).append(i)
        answers.setdefault(prompt, set()).add(reply)
    return [g for p, g in groups.items() if len(answers[p]) > 1]


def looks_cut(text: str) -> bool:
    """Whether a reply looks cut off: an unclosed ``` fence, a dangling ``,;:-(`` at the end, or a last line
    of prose (five words or more, not a list item or heading) ending in a letter or digit. Lines ending in
    a hashtag, handle or link, equations and quote attributions are not cut.

    Example:
        >>> looks_cut("Here is the code:\\n```python\\nprint(1)"), looks_cut("The capital of France is Par")
        (True, True)
        >>> looks_cut("Done."), looks_cut("- apples\\n- pears"), looks_cut('{"a": 1}'), looks_cut("")
        (False, False, False, False)
        >>> looks_cut('"Be yourself." - Oscar Wilde'), looks_cut("Love it! #PuppyLove"), looks_cut("so 10 / 5 = 2")
        (False, False, False)
    """
    text = text.rstrip()
    if len(_FENCE.findall(text)) % 2:
        return True
    if not text or text.endswith(_CLOSING):
        return False
    last = text.splitlines()[-1]
    # Hashtags, handles, links, equations and quote attributions end without punctuation by nature.
    if last.split()[-1].startswith(("#", "@", "http")) or "=" in last or _ATTRIBUTION.search(last):
        return False
    if text.endswith(_DANGLING):
        return True
    return text[-1].isalnum() and len(last.split()) >= 5 and not _LIST_ITEM.match(last)


def short_replies(records: list[Record], min_tokens: int,
                  count: Callable[[str], int] = lambda s: len(s.split())) -> list[int]:
    """Records with a trained reply of fewer than ``min_tokens`` tokens (``count``: words by default; the
    report and the data stage pass the run's tokenizer). Empty replies are included.

    Example:
        >>> u = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]
        >>> short_replies([("r0", u("")), ("r1", u("ok")), ("r2", u("a full reply"))], 2)
        [0, 1]
    """
    return [i for i, (_, m) in enumerate(records) if any(count(t) < min_tokens for _, t in replies(m))]


def empty_replies(records: list[Record]) -> list[int]:
    """Records with a trained reply that is blank (no text and no tool call).

    Example:
        >>> empty_replies([("r0", [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}])])
        [0]
    """
    return [i for i, (_, m) in enumerate(records) if any(not t.strip() for _, t in replies(m))]


def cut_replies(records: list[Record]) -> list[int]:
    """Records with a trained reply that ``looks_cut`` (tool-call-only replies are never cut)."""
    return [i for i, (_, m) in enumerate(records)
            if any(looks_cut(m[j]["content"]) for j, _ in replies(m) if not m[j].get("tool_calls"))]


def echo_replies(records: list[Record]) -> list[int]:
    """Records with a reply that repeats the user message before it (equal, or starting with it, when it has
    three words or more), after normalisation.

    Example:
        >>> u = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        >>> echo_replies([("r0", u("Say hi to me", "say hi to me. Hi!")), ("r1", u("Hi", "Hi")),
        ...               ("r2", u("Hi there you", "Hello"))])
        [0, 1]
    """
    out = []
    for i, (_, m) in enumerate(records):
        for j, text in replies(m):
            prev = next((normalize(x["content"]) for x in reversed(m[:j]) if x["role"] == "user"), "")
            reply = normalize(text)
            if prev and (reply == prev or (len(prev.split()) >= 3 and reply.startswith(prev))):
                out.append(i)
                break
    return out


def refusals(records: list[Record], patterns: Iterable[str] = DEFAULT_REFUSALS) -> list[int]:
    """Records with a trained reply containing one of ``patterns`` (case- and whitespace-insensitive).

    Example:
        >>> u = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]
        >>> refusals([("r0", u("As an AI  language model, I")), ("r1", u("Sure."))])
        [0]
    """
    pats = [normalize(p) for p in patterns]
    return [i for i, (_, m) in enumerate(records) if any(p in normalize(t) for _, t in replies(m) for p in pats)]


def role_problems(records: list[Record]) -> dict[str, list[int]]:
    """Role orders that chat templates render but that are likely mistakes: ``consecutive_user`` (two user
    turns in a row) and ``system_mid`` (a system message after the first message).

    Example:
        >>> m = lambda *roles: [{"role": r, "content": "x"} for r in roles]
        >>> r = [("r0", m("user", "user", "assistant")), ("r1", m("user", "system", "assistant"))]
        >>> role_problems(r)
        {'consecutive_user': [0], 'system_mid': [1]}
    """
    out: dict[str, list[int]] = {"consecutive_user": [], "system_mid": []}
    for i, (_, m) in enumerate(records):
        roles = [x["role"] for x in m]
        if any(a == b == "user" for a, b in zip(roles, roles[1:])):
            out["consecutive_user"].append(i)
        if "system" in roles[1:]:
            out["system_mid"].append(i)
    return out


def overlap(reference: list[Record], other: list[Record]) -> list[tuple[int, int]]:
    """``(other index, reference index)`` for records of ``other`` whose normalised conversation (prompt and
    reply) also occurs in ``reference``: eval records seen in training, or one source contaminating another.

    Example:
        >>> u = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        >>> overlap([("t0", u("a", "b")), ("t1", u("c", "d"))], [("e0", u("C", "d")), ("e1", u("x", "y"))])
        [(0, 1)]
    """
    seen: dict[str, int] = {}
    for i, (_, m) in enumerate(reference):
        seen.setdefault(conversation_key(m), i)
    return [(i, seen[k]) for i, (_, m) in enumerate(other) if (k := conversation_key(m)) in seen]


def dedup_drops(records: list[Record], mode: str, threshold: float = 0.8) -> list[int]:
    """Indices a ``data.dedup`` mode drops, keeping each first occurrence: ``none``, ``exact``, or ``near``
    (exact duplicates and near duplicates of an earlier record).

    Example:
        >>> u = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]
        >>> dedup_drops([("r0", u("A")), ("r1", u("a")), ("r2", u("B"))], "exact")
        [1]
    """
    if mode == "none":
        return []
    drops = {d for d, _ in exact_duplicates(records)}
    if mode == "near":
        drops |= {d for d, _, _ in near_duplicates(records, threshold)}
    return sorted(drops)


def examples(records: list[Record], pairs: Iterable, n: int = 3) -> list[list[str]]:
    """The ``where`` of the first ``n`` pairs or groups of indices (an int gives a one-item list).

    Example:
        >>> examples([("a: line 1", []), ("a: line 2", [])], [(1, 0, 0.9), 1])
        [['a: line 2', 'a: line 1'], ['a: line 2']]
    """
    out: list[list[str]] = []
    for p in pairs:
        if len(out) == n:
            break
        ids: Optional[Iterable] = [p] if isinstance(p, int) else [x for x in p if isinstance(x, int)]
        out.append([records[j][0] for j in ids])
    return out
