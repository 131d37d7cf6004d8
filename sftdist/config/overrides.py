"""Command-line overrides, checked and interpreted before Hydra composes them.

Two things Hydra cannot know:

- An unknown key (``train.lrr=1e-5``) fails in Hydra with "Key 'lrr' not in 'TrainConfig'" and advice to
  append it with ``+``, which would fail too. ``unknown_keys`` finds such keys against the typed schema and
  names the closest real key instead.
- ``model.name_or_path=PATH`` on top of a preset that builds a model from a config (the default ``model=tiny``)
  means "train this model". ``prefer_named_model`` makes it so, instead of stopping with "set only one of
  model.name_or_path and model.from_config".
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from importlib import resources
from typing import Any, Optional

from omegaconf import OmegaConf

from sftdist.config.checks import ConfigError
from sftdist.config.schema import SFTConfig

NOT_SCHEMA_KEYS = ("hydra",)  # Hydra's own namespace
GROUPS = ("model", "data", "parallelism", "peft", "train", "logging", "launch", "sweep", "recipe")  # group=option


def _unwrap(tp: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def _fields(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}


def schema_problem(key: str, root: Any) -> Optional[str]:
    """Why the dotted ``key`` is not in the dataclass schema ``root`` (None when it is, or cannot be told).

    Example:
        >>> from sftdist.config.schema import SFTConfig
        >>> schema_problem("train.lrr", SFTConfig)
        "unknown config key 'train.lrr' (did you mean train.lr?)"
        >>> schema_problem("trian.lr", SFTConfig)
        "unknown config key 'trian.lr' (did you mean train.lr?)"
        >>> schema_problem("data.sources.0.weigth", SFTConfig)
        "unknown config key 'data.sources.0.weigth' (did you mean data.sources.0.weight?)"
        >>> [schema_problem(k, SFTConfig) for k in ("model.from_config.hidden_size", "train.early_stopping.patience")]
        [None, None]
    """
    tp, done = root, []
    for part in key.split("."):
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if origin in (list, typing.List) and part.isdigit():
            tp = typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(tp):
            fields = _fields(tp)
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
                if close:  # name the whole corrected key when the rest of it fits the corrected part
                    rest = key.split(".")[len(done) + 1:]
                    fixed = ".".join([*done, close[0], *rest])
                    hint = f" (did you mean {fixed if not schema_problem(fixed, root) else '.'.join([*done, close[0]])}?)"
                else:
                    hint = f" ({'.'.join(done) or 'the top level'} has: {', '.join(fields)})"
                return f"unknown config key {key!r}{hint}"
            tp = fields[part]
        else:  # a free-form dict (model.from_config) or a value: anything below it is the user's business
            return None
        done.append(part)
    return None


def override_key(arg: str) -> Optional[str]:
    """The config key an override sets, or None for flags, group selections (``model=tiny``,
    ``hydra/launcher=slurm``) and Hydra's own keys.

    Example:
        >>> [override_key(a) for a in ("train.lr=1e-5", "+train.x=1", "~model.revision", "model=tiny", "-m",
        ...                            "hydra.job.chdir=true", "hydra/launcher=slurm")]
        ['train.lr', 'train.x', 'model.revision', None, None, None, None]
    """
    if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
        return None
    key = arg.split("=", 1)[0].lstrip("+~")
    if "/" in key or "@" in key or key.split(".")[0] in NOT_SCHEMA_KEYS or "." not in key and key in GROUPS:
        return None
    return key


def unknown_keys(args: list[str]) -> list[str]:
    """A message for every override in ``args`` whose key is not in the sftdist config schema."""

    keys = [k for k in map(override_key, args) if k]
    return [p for p in (schema_problem(k, SFTConfig) for k in keys) if p]


def check_override_keys(args: list[str]) -> None:
    """Raise a ``ConfigError`` naming each unknown key (with the closest real one), before Hydra composes."""
    problems = unknown_keys(args)
    if problems:
        raise ConfigError("; ".join(problems))


def prefer_named_model(raw, overrides: list[str]) -> Optional[str]:
    """When the command line names ``model.name_or_path`` on a preset that builds from ``model.from_config``,
    load the named model: drop the preset's ``from_config`` (and its ``tokenizer``, unless the command line
    set one too). Edits the composed ``DictConfig`` in place; returns what was done, for the log.

    A user config that sets both itself, or a command line that sets both, is left to fail: that is a real
    contradiction.
    """
    from omegaconf import open_dict

    keys = {override_key(a) or "" for a in overrides}
    model = raw.model
    if not (model.get("name_or_path") and model.get("from_config")) or "model.name_or_path" not in keys or \
            any(k == "model.from_config" or k.startswith("model.from_config.") for k in keys):
        return None
    with open_dict(model):
        model.from_config = None
        if "model.tokenizer" not in keys:
            model.tokenizer = None
    return (f"model.name_or_path={model.name_or_path}: loading that model instead of the preset's random-init "
            f"model.from_config" + ("" if "model.tokenizer" in keys else ", with its own tokenizer"))


def recipes_chosen(task_overrides: list[str]) -> list[str]:
    """The ``recipe=`` choices of a command line (one name or a ``[a,b]`` list).

    Example:
        >>> recipes_chosen(["train.lr=1e-5", "recipe=[lora_single_gpu, replay_1to1]"])
        ['lora_single_gpu', 'replay_1to1']
        >>> recipes_chosen(["recipe=full_zero3"]), recipes_chosen(["model=tiny"])
        (['full_zero3'], [])
    """
    chosen = []
    for arg in task_overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "recipe" and value and value != "null":
            chosen += [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return chosen


def recipe_picks_peft(name: str) -> bool:
    """Whether ``conf/recipe/<name>.yaml`` selects a ``peft`` option in its defaults list.

    Example:
        >>> recipe_picks_peft("lora_single_gpu"), recipe_picks_peft("full_zero3"), recipe_picks_peft("replay_1to1")
        (True, True, False)
    """
    path = resources.files("sftdist.conf") / "recipe" / f"{name}.yaml"
    if not path.is_file():
        return False
    defaults = OmegaConf.create(path.read_text()).get("defaults") or []
    # an entry is {"override /peft": "lora"} (or {"/peft": ...}); a string entry names a config, not a group
    return any(k.split()[-1].strip("/") == "peft" for d in defaults if OmegaConf.is_dict(d) for k in d)


def peft_chosen(task_overrides: list[str]) -> bool:
    """Whether the user chose how to fine-tune: ``peft=...`` or a ``peft.*`` key on the command line, or a
    recipe that picks a ``peft`` option.

    Example:
        >>> peft_chosen(["peft=none"]), peft_chosen(["recipe=full_zero3"]), peft_chosen(["recipe=replay_1to1"])
        (True, True, False)
    """
    keys = {a.split("=", 1)[0].lstrip("+~") for a in task_overrides}
    if any(k == "peft" or k.startswith("peft.") for k in keys):
        return True
    return any(recipe_picks_peft(r) for r in recipes_chosen(task_overrides))
