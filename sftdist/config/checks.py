"""The config error type and the small value checks every config group's ``__post_init__`` uses."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")


def check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if not (value > 0 or (value == 0 and allow_zero)):  # (NaN too: it compares false with everything)
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def one_line(e: BaseException) -> str:
    """An error and the error it came from (Hydra wraps OmegaConf's reason), on one line."""
    first = [(str(x).splitlines() or [type(x).__name__])[0].rstrip(".")
             for x in (e, e.__cause__) if x is not None]
    return ": ".join(first)
