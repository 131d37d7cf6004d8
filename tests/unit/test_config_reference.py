"""docs/config-reference.md stays what the schema generates: every key of every group has a row, and the
field comments in sftdist/config/ are what the rows say."""

import dataclasses
import doctest
import inspect
import re
import typing

import pytest

from sftdist.config.schema import ParallelConfig, SFTConfig, TrainConfig
from sftdist.tools import config_reference
from tests.conftest import REPO

PAGE = REPO / "docs" / "config-reference.md"
REGENERATE = "python -m sftdist.tools.config_reference --write"
# Fields that had no comment when the page was first generated; a new field needs one (its row's last cell).
UNDOCUMENTED = {
    "model.trust_remote_code", "parallelism.contiguous_gradients", "peft.dropout", "peft.target_modules",
    "train.warmup_steps", "train.adam_betas", "train.adam_eps", "train.seed", "logging.wandb_project",
    "logging.wandb_entity", "logging.wandb_group", "logging.wandb_tags", "logging.sample_max_new_tokens",
    "launch.nnodes", "launch.node_rank", "launch.master_addr", "launch.master_port", "launch.account",
    "launch.qos", "launch.gpus_per_node", "launch.cpus_per_task", "launch.constraint",
}


@pytest.fixture(scope="module")
def page() -> str:
    return config_reference.build_page()


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key under ``cls``, walked from the dataclasses themselves (``[]`` for list items)."""
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        hint = typing.get_type_hints(cls)[f.name]
        items = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            keys += schema_keys(hint, f"{prefix}{f.name}.")
        elif items and dataclasses.is_dataclass(items[0]):
            keys += schema_keys(items[0], f"{prefix}{f.name}[].")
    return keys


def row(page: str, key: str) -> str:
    rows = [line for line in page.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"expected one row for {key}, found {len(rows)}"
    return rows[0]


def test_committed_page_is_current(page):
    assert PAGE.exists(), f"docs/config-reference.md is missing: run `{REGENERATE}`"
    assert PAGE.read_text() == page, f"docs/config-reference.md is stale: run `{REGENERATE}`"


def page_keys() -> list[str]:
    """The keys that get a row: every field, except the groups themselves (model, data, ...)."""
    hints = typing.get_type_hints(SFTConfig)
    groups = {f.name for f in dataclasses.fields(SFTConfig) if dataclasses.is_dataclass(hints[f.name])}
    return [key for key in schema_keys(SFTConfig) if key not in groups]


def test_every_schema_field_has_a_row(page):
    keys = page_keys()
    assert {"model.name_or_path", "data.sources[].path", "train.early_stopping.patience", "launch.launcher",
            "output_dir", "run_name"} <= set(keys)
    committed = PAGE.read_text() if PAGE.exists() else ""
    missing = [key for key in keys if f"| `{key}` |" not in committed]
    assert not missing, f"docs/config-reference.md has no row for {missing}: run `{REGENERATE}`"
    for key in keys:
        row(page, key)
    assert len(re.findall(r"^\| `", page, re.MULTILINE)) == len(keys)


def test_new_fields_have_a_comment(page):
    bare = {key for key in page_keys() if row(page, key).endswith("|  |")} - UNDOCUMENTED
    assert not bare, f"give these fields a trailing `# comment` (units, meaning) in sftdist/config/: {sorted(bare)}"


def test_every_row_has_four_cells(page):
    for line in page.splitlines():
        if line.startswith("| `"):
            assert len(re.split(r"(?<!\\)\|", line)) == 6, line  # 4 cells: '|' in text must be escaped


def test_field_comments_reach_their_rows(page):
    # A comment run over the comment-only lines above the field, read here from the source on its own.
    source = inspect.getsource(ParallelConfig)
    lead = re.search(r"((?:^[ \t]*#.*\n)+)[ \t]*collective_timeout_s:", source, re.MULTILINE).group(1)
    comment = " ".join(line.strip().lstrip("#").strip() for line in lead.splitlines())
    assert "hung or lost rank" in comment
    assert comment in row(page, "parallelism.collective_timeout_s")
    # A trailing comment, and the choices its __post_init__ checks.
    trailing = re.search(r"^\s*warmup_ratio: .*#\s*(.+)$", inspect.getsource(TrainConfig), re.MULTILINE).group(1)
    assert trailing.strip() in row(page, "train.warmup_ratio")
    assert "One of: `cosine`, `linear`, `constant`." in row(page, "train.schedule")


def test_defaults_are_rendered(page):
    assert "| `???` (required) |" in row(page, "output_dir")
    assert "| `[0.9, 0.95]` |" in row(page, "train.adam_betas")
    assert "| `null` |" in row(page, "model.name_or_path")
    assert "`model=tiny` (default)" in page


def test_check_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config_reference, "REPO", tmp_path)
    monkeypatch.setattr(config_reference, "PAGE", tmp_path / "config-reference.md")
    (tmp_path / "config-reference.md").write_text("old\n")
    assert config_reference.main(["--check"]) == 1
    out, err = capsys.readouterr()
    assert "-old" in out and REGENERATE in err
    assert config_reference.main(["--write"]) == 0
    assert config_reference.main(["--check"]) == 0


def test_doctests():
    result = doctest.testmod(config_reference)
    assert result.attempted >= 4 and result.failed == 0
