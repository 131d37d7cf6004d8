"""The house keeps standing: imports run one way between the concerns of ``docs/architecture.md``, no module
takes part in an import cycle (lazy imports inside functions count too), and the commands that do not train
start without torch."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "sftdist"
# Lower layers never import higher ones, and two concerns on one layer never import each other.
LAYERS = {"config": 0, "cluster": 1, "data": 1, "engine": 2, "observe": 3, "lifecycle": 4, "tools": 5,
          "loop": 6, "train": 7, "cli": 8, "__main__": 9}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(target: str) -> str:
    """``sftdist.a.b`` as the module it names: the module itself, or the package it is a name in."""
    while target.count(".") > 0:
        path = REPO.joinpath(*target.split("."))
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return target
        target = target.rsplit(".", 1)[0]
    return target


def imports_of(path: Path) -> set[str]:
    """Every sftdist module that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("sftdist.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sftdist"):
            # `from sftdist.data import quality` imports the submodule; `from sftdist.config import X` the package
            found |= {resolve(f"{node.module}.{a.name}") for a in node.names}
    return found - {"sftdist"}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def concern(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_module_belongs_to_a_layer():
    assert {concern(m) for m in import_graph()} - {"__init__"} <= set(LAYERS)


def test_imports_run_down_the_layers_only():
    wrong = [f"{m} imports {t}" for m, targets in import_graph().items() for t in sorted(targets)
             if concern(t) != concern(m) and LAYERS[concern(t)] >= LAYERS[concern(m)]]
    assert not wrong, "imports that run up (or across) the layers:\n" + "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a path (first == last), or [] when there is none.

    Example:
        >>> find_cycle({"a": {"b"}, "b": {"a"}})
        ['a', 'b', 'a']
        >>> find_cycle({"a": {"b"}, "b": set()})
        []
    """
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_no_import_cycles():
    assert find_cycle(import_graph()) == []


def test_find_cycle_examples():
    import doctest

    assert doctest.run_docstring_examples(find_cycle, {"find_cycle": find_cycle}) is None
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]


def test_commands_that_do_not_train_start_without_torch():
    """A fresh interpreter (what it imports is the point): the launcher, plot, sweep report and the command
    dispatcher import no torch, DeepSpeed or transformers."""
    code = ("import sys; import sftdist.cluster.launch, sftdist.tools.plot, sftdist.tools.sweep_report, "
            "sftdist.cli; bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_pyproject_lists_every_package():
    """Every folder of package files (``sftdist/**.py``, ``conf/**.yaml``, shipped as ``sftdist.conf``) is in
    pyproject's ``packages``: setuptools prints ~40 lines of warning per missing one at every install."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("*.py")}
    folders |= {".".join(("sftdist", *p.parent.relative_to(REPO).parts))
                for p in (REPO / "conf").rglob("*.yaml")}
    assert folders <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(folders - listed)}"
