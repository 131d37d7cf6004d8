"""``sftdist COMMAND [args]``: one command for everything sftdist does, from one table.

Each command's module is imported only when that command runs (``sftdist plot`` never imports torch), and
its arguments pass through untouched: Hydra overrides, ``-m`` and ``--cfg`` reach ``sftdist train`` as they
would reach ``python -m sftdist.train``. The ``sftdist-*`` console scripts are aliases of the same functions.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import NamedTuple, Optional


class Command(NamedTuple):
    target: str  # "module:function"; the function reads sys.argv[1:]
    summary: str
    alias: str  # the console script that runs the same function
    argv_prefix: tuple[str, ...] = ()  # put before the user's arguments (the subcommand of a grouped alias)


COMMANDS: dict[str, Command] = {
    "train": Command("sftdist.train:main", "train on this process (Hydra app: overrides, -m sweeps, --cfg job)",
                     "sftdist-train"),
    "launch": Command("sftdist.cluster.launch:main", "start training with torchrun, deepspeed or SLURM "
                      "(launch=...); --dry-run, --wait", "sftdist-launch"),
    "data prepare": Command("sftdist.tools.data_cli:prepare_main", "tokenise, mask and cache every source; "
                            "audit the masks", "sftdist-prepare"),
    "data inspect": Command("sftdist.tools.data_cli:data_main", "rendered samples with the trained tokens "
                            "highlighted, and per-source statistics", "sftdist-data", ("inspect",)),
    "data quality": Command("sftdist.tools.data_cli:data_main", "find duplicates, empty or cut replies, "
                            "refusals, over-long records", "sftdist-data", ("quality",)),
    "plan": Command("sftdist.tools.plan:main", "per-rank memory, data size and run time of a config, before "
                    "any GPU is used", "sftdist-plan"),
    "baseline": Command("sftdist.tools.baseline_cli:main", "the base model's eval loss zero- and few-shot; "
                        "after a run, what fine-tuning bought", "sftdist-baseline"),
    "export": Command("sftdist.lifecycle.export:main", "--merge RUN_DIR: merge a LoRA adapter into its base "
                      "model", "sftdist-export"),
    "plot": Command("sftdist.tools.plot:main", "draw the curves of one or more runs as PNGs", "sftdist-plot"),
    "sweep-report": Command("sftdist.tools.sweep_report:main", "compare the points of a learning-rate sweep",
                            "sftdist-sweep-report"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    return "\n".join(["usage: sftdist COMMAND [args]", "", "commands:", *rows, "",
                      "`sftdist COMMAND --help` shows a command's own options. Every command also runs as its "
                      "alias,", "e.g. `sftdist-launch` for `sftdist launch`; see docs/cli.md."])


def find_command(args: list[str]) -> tuple[Optional[str], list[str]]:
    """The table's command named by the first one or two words of ``args``, and the arguments after them.

    Example:
        >>> find_command(["data", "inspect", "--n", "2"])
        ('data inspect', ['--n', '2'])
        >>> find_command(["train", "-m", "train.lr=1e-5,2e-5"])
        ('train', ['-m', 'train.lr=1e-5,2e-5'])
        >>> find_command(["trian"])
        (None, [])
    """
    for words in (2, 1):
        name = " ".join(args[:words])
        if len(args) >= words and name in COMMANDS:
            return name, args[words:]
    return None, []


def run_command(name: str, args: list[str]) -> None:
    """Import the command's module and run its function as its console script would run."""
    command = COMMANDS[name]
    module, function = command.target.split(":")
    sys.argv = [f"sftdist {name}", *command.argv_prefix, *args]
    result = getattr(importlib.import_module(module), function)()
    if isinstance(result, int):
        sys.exit(result)


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = find_command(args)
    if name is None and args[0] == "data" and (len(args) == 1 or args[1] in ("-h", "--help")):
        print("\n".join(line for line in usage().splitlines() if not line.startswith("  ") or " data " in line))
        return
    if name is None:
        words = " ".join(args[:2]) if args[0] == "data" else args[0]
        close = difflib.get_close_matches(words, [*COMMANDS, "data"], n=1)
        hint = f"; did you mean `sftdist {close[0]}`?" if close else ""
        sys.exit(f"sftdist: unknown command {words!r}{hint}\n\n{usage()}")
    run_command(name, rest)


if __name__ == "__main__":
    main()
