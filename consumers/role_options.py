"""A role's own knobs: the ``[trainer]``, ``[indexer]`` or ``[publisher]`` table of the settings file."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Collection, TypeVar

from streamrecall.errors import ConfigError
from streamrecall.settings import Settings

O = TypeVar("O")


def role_options(cls: type[O], settings: Settings, role: str, *, may_be_zero: Collection[str] = ()) -> O:
    """Build the frozen options dataclass ``cls`` from ``settings.extra[role]``.

    Unknown keys are refused; each value must have its default's type (an int where an int is
    expected, a number where a float is; numeric strings are read as numbers) and be > 0, or >= 0 for the names in ``may_be_zero``;
    a setting whose default is text takes text (``cls`` checks its choices).
    Every error names the setting as ``role.name``.
    """
    raw = dict(settings.extra.get(role, {}))
    defaults = {f.name: f.default for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ConfigError(f"{role}.{unknown[0]}: unknown setting (known: {', '.join(sorted(defaults))})")
    values = {name: _checked(f"{role}.{name}", defaults[name], value) for name, value in raw.items()}
    options = cls(**values)
    for name in defaults:
        value = getattr(options, name)
        if isinstance(value, str):
            continue
        if value < 0 or (value == 0 and name not in may_be_zero):
            bound = ">= 0" if name in may_be_zero else "> 0"
            raise ConfigError(f"{role}.{name}: must be {bound}, got {value!r}")
    return options


def _checked(name: str, default: Any, value: Any) -> Any:
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be text, got {value!r}")
        return value
    if isinstance(value, str):  # numbers written as strings ("64") are read as numbers
        try:
            value = int(value) if isinstance(default, int) else float(value)
        except ValueError:
            raise ConfigError(f"{name}: must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: must be a number, got {value!r}")
    if isinstance(default, int) and not isinstance(value, int):
        raise ConfigError(f"{name}: must be an integer, got {value!r}")
    return float(value) if isinstance(default, float) else value
