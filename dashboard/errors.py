"""User errors on the dashboard: what a page asks of ``core`` with the user's input (a path, a model
id, a table) is called inside ``shown_errors``, so that a mistake the user can fix is one message
naming what was wrong, never a traceback, and the rest of the page stays usable."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import streamlit as st
from safetensors import SafetensorError

#: what the user can fix (as the CLI's one-line refusals): core raises ValueError and
#: FileNotFoundError; OSError also covers unreadable, missing and full-disk paths;
#: SafetensorError: a weights file the user named is damaged (not a .safetensors file)
USER_ERRORS = (ValueError, OSError, ImportError, SafetensorError)


def message(exc: BaseException) -> str:
    """One line about ``exc``: an OSError names its file (as the CLI does), others their first line."""
    if isinstance(exc, OSError) and exc.filename is not None and not isinstance(exc, FileNotFoundError):
        return f"cannot use {exc.filename}: {exc.strerror or exc}; check the path"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@dataclass
class Outcome:
    """What ``shown_errors`` caught: ``error`` is the message shown, "" when the block succeeded."""
    error: str = ""

    def __bool__(self) -> bool:
        return not self.error


@contextmanager
def shown_errors(what: str, *, stop: bool = False, errors: tuple[type[BaseException], ...] = USER_ERRORS,
                 ) -> Iterator[Outcome]:
    """Run the block; a user error in it becomes one ``st.error`` "``what``: reason" (and, with
    ``stop``, the end of this run of the page: what was drawn above stays usable). The outcome is
    false after an error::

        with shown_errors("Could not add x") as ok:
            entries = entries_for(["x"])
        if ok:
            ...
    """
    outcome = Outcome()
    try:
        yield outcome
    except errors as exc:
        outcome.error = message(exc)
        st.error(f"{what}: {outcome.error}", icon=":material/error:")
        if stop:
            st.stop()
