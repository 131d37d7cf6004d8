"""One ``sftdist`` command: its table names every console script, ``--help`` lists every command and
every command answers ``--help``, arguments reach a command untouched, and a typo gets a did-you-mean."""

import doctest
import shutil
import subprocess
import sys
import tomllib

import pytest

import sftdist.cli as cli
from tests.conftest import REPO, run_cmd

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_docstring_examples():
    result = doctest.testmod(cli)
    assert result.attempted > 0 and result.failed == 0


def test_every_console_script_is_an_alias_of_a_command():
    aliases = {c.alias: c.target for c in cli.COMMANDS.values()}
    scripts = dict(SCRIPTS)
    assert scripts.pop("sftdist") == "sftdist.cli:main"
    assert scripts == aliases, "every sftdist-* script must be a command of cli.COMMANDS (and the reverse)"


def test_help_lists_every_command(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name, command in cli.COMMANDS.items():
        assert f"  {name} " in out and command.summary in out


def test_unknown_command_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["trian", "train.lr=1e-5"])
    assert "unknown command 'trian'; did you mean `sftdist train`?" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "inspet"])
    assert "did you mean `sftdist data inspect`?" in str(e.value.code)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_answers_help(name, capsys, monkeypatch):
    """In this process (the dispatcher and each command's parsing are the subject, not a process start)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # run_command sets it for the command
    try:
        cli.main([*name.split(), "--help"])
    except SystemExit as e:  # argparse's --help exits 0
        assert e.code in (0, None), e.code
    out = capsys.readouterr().out
    assert "usage" in out.lower() or "Powered by Hydra" in out, out


@pytest.mark.parametrize("alias", ["sftdist-launch", "sftdist-prepare"])
def test_aliases_answer_help(alias):
    """The console scripts themselves (a process of their own is the point); these two once refused --help."""
    script = shutil.which(alias) or str(REPO / ".venv" / "bin" / alias)
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "usage: " in proc.stdout, proc.stderr


def test_hydra_arguments_pass_through_untouched():
    proc = run_cmd([sys.executable, "-m", "sftdist", "train", "--cfg", "job", "train.lr=0.5", "model=tiny"])
    assert "lr: 0.5" in proc.stdout and "Powered by Hydra" not in proc.stdout
