"""Checks of user-given settings that fail with one line naming the setting, its value and
what to give instead (``name=value: hint``); used by the run specs of ``core.experiments``."""
from __future__ import annotations

from pathlib import Path


def fail(name: str, value: object, hint: str) -> None:
    raise ValueError(f"{name}={value!r}: {hint}")


def choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(name, value, f"unknown; use one of {', '.join(choices)}")


def fraction(name: str, value: object, *, low_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a float in [0, 1) (``(0, 1)`` with ``low_open``); ``None`` if ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, value, "give a number, e.g. 0.5")
    value = float(value)
    if not ((0.0 < value) if low_open else (0.0 <= value)) or not value < 1.0:
        fail(name, value, f"give a fraction in {'(0' if low_open else '[0'}, 1)")
    return value


def whole(name: str, value: object, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(name, value, f"give a whole number >= {low}")


def flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        fail(name, value, "give True or False")


def text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        fail(name, value, "give a non-empty name")


def path(name: str, value: object, *, must_exist: bool) -> Path | None:
    """``value`` as an absolute path; an input file must exist, an output must not."""
    if value is None:
        return None
    path = Path(value).expanduser().resolve()
    if must_exist and not path.is_file():
        raise FileNotFoundError(f"{name}={str(value)!r}: no such file")
    if not must_exist and path.exists():
        fail(name, str(value), "already exists; choose a new folder (nothing is overwritten)")
    return path
