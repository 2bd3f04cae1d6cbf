"""Small checks shared by every config section; each returns messages naming `prefix.key`."""

from __future__ import annotations


def check_bounds(obj, prefix: str, *, positive=(), non_negative=()) -> list[str]:
    out = [f"{prefix}.{name}: must be > 0, got {getattr(obj, name)}" for name in positive if getattr(obj, name) <= 0]
    out += [f"{prefix}.{name}: must be >= 0, got {getattr(obj, name)}"
            for name in non_negative if getattr(obj, name) < 0]
    return out


def check_choice(obj, prefix: str, name: str, choices) -> list[str]:
    value = getattr(obj, name)
    if value in choices:
        return []
    return [f"{prefix}.{name}: unknown value {value!r}; choose one of {sorted(choices)}"]
