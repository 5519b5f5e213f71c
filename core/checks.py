"""Checks of user-given settings that fail with one line naming the setting, its value and
what to give instead (``name=value: hint``); used by the run specs of ``core.experiments``."""
from __future__ import annotations

import os
from pathlib import Path


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when the message is empty): the part
    of a library's error that fits in a one-line refusal."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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


def target_within_bound(sparsity: object, epsilon: object = None, r_max: object = None) -> None:
    """An allocation's settings checked before any import: fractions, and a target sparsity no
    higher than ``r_max`` (default ``choices.DEFAULT_R_MAX``), the bound of every ratio."""
    from .choices import DEFAULT_R_MAX

    sparsity = fraction("sparsity", sparsity)
    fraction("epsilon", epsilon, optional=True)
    bound = fraction("r_max", r_max, low_open=True, optional=True)
    bound = DEFAULT_R_MAX if bound is None else bound
    if sparsity > bound:      # worded as core.allocation.allocate words it
        raise ValueError(f"sparsity={sparsity:g} is above r_max={bound:g}: no matrix may be pruned beyond r_max, "
                         "so the mean cannot reach the target; lower sparsity or raise r_max")


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
    if must_exist and path.is_dir():
        fail(name, str(value), "is a folder; give a file")
    if must_exist and not path.is_file():
        raise FileNotFoundError(f"{name}={str(value)!r}: no such file")
    if not must_exist and path.exists():
        fail(name, str(value), "already exists; choose a new folder (nothing is overwritten)")
    return path


def is_model_folder(folder: Path) -> bool:
    """True if ``folder`` holds a model (a ``config.json`` or weights): never written into."""
    folder = Path(folder)
    return folder.is_dir() and ((folder / "config.json").is_file() or any(folder.glob("*.safetensors"))
                                or any(folder.glob("pytorch_model*.bin")))


def new_folder(name: str, value: object, *, source: Path | None = None) -> Path:
    """``value`` as an absolute path where a new output folder can be made (missing parents are
    created): nothing there yet, its nearest existing parent a writable folder, and not inside
    ``source`` (the model's own folder, never written into). Checked before any work."""
    given = Path(value).expanduser()
    if given.is_symlink():      # a link, even a dangling one, is the user's: never written through
        fail(name, str(value), "is a symbolic link; choose a new folder (nothing is overwritten)")
    path = given.resolve()
    if path.exists() or path.is_symlink():
        fail(name, str(value), "already exists; choose a new folder (nothing is overwritten)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        fail(name, str(value), f"{parent} is a file, not a folder; choose a folder whose parents are folders")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(name, str(value), f"folder {parent} is not writable; choose another folder")
    if source is not None:
        source = Path(source).resolve()
        if path == source or source in path.parents:
            fail(name, str(value), f"inside the source model's folder {source}; the source is never touched: "
                 "choose a folder outside it")
    return path


def output_file(value: object, name: str, suffixes: tuple[str, ...] = (), *, overwrite: bool = False) -> Path:
    """``value`` as an absolute path a command's output file can be written to, checked before
    the work that produces it: one of ``suffixes`` (when given), not a folder, in an existing
    writable folder that is not a model's folder, not an existing file or link unless ``overwrite``
    (``config.writable_file``: a link itself is replaced, never its target). ``name`` (e.g.
    ``--out``) starts the error."""
    from .config import writable_file

    path = writable_file(Path(str(value)).expanduser(), name, overwrite=overwrite)   # a folder is named first
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"cannot write {name} {path}: use a {' or '.join(suffixes)} file name")
    if is_model_folder(path.parent):
        raise ValueError(f"cannot write {name} {path}: {path.parent} is a model folder, never written into; "
                         "choose another folder")
    return path


def table_files(stem: object, names: tuple[str, ...], formats: tuple[str, ...], *,
                overwrite: bool = False) -> dict[tuple[str, str], Path]:
    """``(name, format) -> STEM-name.format`` for tables written as .csv and/or .parquet, each
    checked as ``--out`` (``output_file``) before the work that produces them."""
    from .choices import TABLE_FORMATS

    bad = [f for f in formats if f not in TABLE_FORMATS]
    if bad or not formats:
        raise ValueError(f"--format {','.join(formats)!r}: use csv, parquet or csv,parquet")
    return {(name, fmt): output_file(f"{stem}-{name}.{fmt}", "--out", overwrite=overwrite)
            for name in names for fmt in formats}


def html_file(value: object, *, overwrite: bool = False) -> Path:
    """``value`` checked as ``--html`` before any work: a .html name that can be written."""
    return output_file(value, "--html", (".html", ".htm"), overwrite=overwrite)


def model_source(value: object, name: str = "model") -> str:
    """A model source as given (``demo``, a folder, a file or a hub id), stripped; an empty or
    blank one is refused, never read as the demo in disguise. Cheap: checked before any import."""
    text = str(value).strip() if value is not None else "demo"
    if not text:
        raise ValueError(f"{name} {str(value)!r}: empty; give demo, a Hugging Face folder, a .gguf or .safetensors "
                         "file or a hub id")
    return text
