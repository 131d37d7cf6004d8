"""Generate ``docs/config-reference.md``, one table row per config key, from the schema's fields and comments."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import re
import sys
import tokenize
import typing
from pathlib import Path

from sftdist.config.launch import LaunchConfig
from sftdist.config.schema import SFTConfig

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
PAGE = REPO / "docs" / "config-reference.md"
COMMAND = "python -m sftdist.tools.config_reference --write"


def source_notes(source: str, names: dict) -> tuple[dict, dict]:
    """Per (class, field) of a module's source: its comment (the comment-only lines right above the field,
    then the one after it), and the choices a ``check_choice(key, self.field, CHOICES)`` call holds it to.

    Example:
        >>> src = '''class A:
        ...     # peak rate
        ...     # (not the mean)
        ...     lr: float = 1.0  # per step
        ...     s: str = "a"
        ...     def __post_init__(self):
        ...         check_choice("a.s", self.s, SS)
        ... '''
        >>> source_notes(src, {"SS": ("a", "b")})
        ({('A', 'lr'): 'peak rate (not the mean); per step', ('A', 's'): ''}, {('A', 's'): ('a', 'b')})
    """
    lines, alone, comments, choices = {}, set(), {}, {}
    for tok in tokenize.generate_tokens(iter(source.splitlines(True)).__next__):
        if tok.type == tokenize.COMMENT:
            lines[tok.start[0]] = tok.string.lstrip("#").strip()
            if tok.line.lstrip().startswith("#"):
                alone.add(tok.start[0])
    for cls in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)):
        for node in (n for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)):
            above, line = [], node.lineno - 1
            while line in alone:
                above, line = [lines[line], *above], line - 1
            lead = " ".join(above)
            after = " ".join(lines[n] for n in range(node.lineno, node.end_lineno + 1) if n in lines)
            joint = " " if lead.endswith(":") else "; "  # a lead ending in ':' introduces the trailing comment
            comments[(cls.name, node.target.id)] = joint.join(p for p in (lead, after) if p)
        for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call) and len(n.args) == 3):
            _, value, allowed = call.args
            if getattr(call.func, "id", None) == "check_choice" and getattr(value, "attr", None) and \
                    getattr(value.value, "id", None) == "self":
                try:
                    choices[(cls.name, value.attr)] = tuple(
                        names[allowed.id] if isinstance(allowed, ast.Name) else ast.literal_eval(allowed))
                except (KeyError, ValueError):
                    pass  # best effort: choices computed at run time are left to the comment
    return comments, choices


def render_value(value: typing.Any) -> str:
    """A default as it would be written on the command line.

    Example:
        >>> render_value(None), render_value(True), render_value(["all-linear"]), render_value({"a": 1.5})
        ('null', 'true', '[all-linear]', '{a: 1.5}')
    """
    value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    return '""' if value == "" else str(value)


def markdown_text(text: str) -> str:
    """Prose for a table cell: RST ``code`` becomes Markdown code, ``<`` outside code is escaped, ``|`` always.

    Example:
        >>> markdown_text("eager | sdpa, loss/<name>, ``from_config``")
        'eager \\\\| sdpa, loss/&lt;name>, `from_config`'
    """
    parts = text.replace("``", "`").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts)).replace("|", "\\|")


def nested_class(cls: type, name: str) -> tuple[type | None, str]:
    """The dataclass a field holds (itself or as list items) and the key separator that reaches its fields."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return hint, "."
    if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]."
    return None, ""


def table_rows(cls: type, prefix: str, notes: tuple[dict, dict], groups: bool = True) -> list[str]:
    """One row per field of ``cls`` and of the dataclasses nested in it; ``groups=False`` skips those."""
    (comments, choices), rows = notes, []
    for f in dataclasses.fields(cls):
        inner, sep = nested_class(cls, f.name)
        if inner and not groups:
            continue
        doc = markdown_text(comments.get((cls.__name__, f.name)) or (inspect.getdoc(inner) if inner else ""))
        if (cls.__name__, f.name) in choices:
            doc += ("" if not doc or doc[-1] in ".!?" else ".") + " One of: " + ", ".join(
                f"`{c}`" for c in choices[(cls.__name__, f.name)]) + "."
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "`???` (required)" if default == "???" else f"`{render_value(default)}`".replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{f.type}` | {shown} | {doc.strip()} |")
        if inner:
            rows += table_rows(inner, f"{prefix}{f.name}{sep}", notes)
    return rows


def section(title: str, cls: type, prefix: str, options: list[str], notes: tuple[dict, dict],
            groups: bool = True) -> list[str]:
    """A group's heading, docstring, options and key table."""
    lines = [f"## {title}", "", markdown_text(inspect.getdoc(cls)), ""]
    lines += ["Options: " + ", ".join(options), ""] if options else []
    lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
    return lines + table_rows(cls, prefix, notes, groups) + [""]


def build_page() -> str:
    """The whole page, from the schema's classes, the comments in their source and the files in ``conf/``."""
    comments, choices = {}, {}
    for module in sorted({sys.modules[c.__module__] for c in (SFTConfig, LaunchConfig)}, key=lambda m: m.__name__):
        found = source_notes(inspect.getsource(module), vars(module))
        comments, choices = {**comments, **found[0]}, {**choices, **found[1]}
    picked = dict(re.findall(r"^\s*-\s*(\w+):\s*(\w+)\s*$", (CONF / "config.yaml").read_text(), re.MULTILINE))
    recipes = ", ".join(f"`recipe={p.stem}`" for p in sorted((CONF / "recipe").glob("*.yaml")))
    lines = ["# Configuration reference", "",
             (f"> Generated from the schema by `{COMMAND}`: edit the field comments in `sftdist/config/`, "
              "not this page (`tests/unit/test_config_reference.py` fails when it is stale)."), "",
             ("Every key of the typed config (`sftdist/config/schema.py`, `sftdist/config/launch.py`). Pick a "
              "group's option with `group=option` (e.g. `model=tiny`) and set any key by its dotted name (e.g. "
              "`train.lr=1e-4`; list items by index: `data.sources.0.path=/data/chat.jsonl`). Defaults are the "
              "schema's; the chosen option's YAML file may set others. `???` means the key is required."), "",
             f"Presets that set several groups at once (`conf/recipe/`): {recipes}.", ""]
    for f in dataclasses.fields(SFTConfig):
        inner, _ = nested_class(SFTConfig, f.name)
        if inner:
            options = [f"`{f.name}={p.stem}`" + (" (default)" if picked.get(f.name) == p.stem else "")
                       for p in sorted((CONF / f.name).glob("*.yaml"))]
            lines += section(f"`{f.name}/` ({inner.__name__})", inner, f"{f.name}.", options, (comments, choices))
    lines += section("Top level (SFTConfig)", SFTConfig, "", [], (comments, choices), groups=False)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the page, ``--write`` it to docs/, or ``--check`` that the committed page is current.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0, or 1 when ``--check`` finds the page stale (the diff goes to stdout).
    """
    parser = argparse.ArgumentParser(prog="python -m sftdist.tools.config_reference", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite docs/config-reference.md")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when the page is stale")
    args, text, name = parser.parse_args(argv), build_page(), str(PAGE.relative_to(REPO))
    if args.write:
        PAGE.write_text(text)
        print(f"wrote {name} ({len(text.splitlines())} lines)")
    elif args.check and (old := PAGE.read_text() if PAGE.exists() else "") != text:
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), name, "generated"))
        print(f"{name} is stale: run `{COMMAND}`", file=sys.stderr)
        return 1
    elif not args.check:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
