"""Validation of the engine's config dataclasses: one error type that names the key, the value and what is allowed."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A setting with a value that is not allowed. `key` is the field name inside its dataclass."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


def check(condition: bool, key: str, value, allowed: str) -> None:
    """Raise `ConfigError(key, value, allowed)` unless `condition` holds."""
    if not condition:
        raise ConfigError(key, value, allowed)


def check_choice(key: str, value, choices) -> None:
    check(value in choices, key, value, f"choose one of {', '.join(map(str, choices))}")


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for reports that must fit on one line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
