"""What every console script does with an error the user can fix: one line, non-zero exit.

A damaged store, a refused checkpoint or a full disk is not a bug in robomosaic, so a Python
traceback only hides the one line that says which file or key is wrong. `console_script` turns the
project's own errors (subclasses of `RobomosaicError`) and `OSError` into `SystemExit("<script>:
<message>")`; `--debug` on the command line or `ROBOMOSAIC_DEBUG=1` lets the traceback through.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

DEBUG_ENV = "ROBOMOSAIC_DEBUG"
DEBUG_FLAG = "--debug"

T = TypeVar("T")


class RobomosaicError(Exception):
    """Base of every error that names bad input (a file, key, parameter) rather than a bug."""


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError already names its file and errno text)."""
    text = str(error) or type(error).__name__
    return " ".join(text.split())


def console_script(name: str) -> Callable[[Callable[[list[str]], T]], Callable[[Sequence[str] | None], T]]:
    """Decorate `main(argv)` of the console script `name`; see the module docstring.

    The wrapped function takes `argv` (None: `sys.argv[1:]`) with `--debug` removed, so Hydra never
    sees the flag.
    """

    def wrap(main: Callable[[list[str]], T]) -> Callable[[Sequence[str] | None], T]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> T:
            args = list(sys.argv[1:] if argv is None else argv)
            debug = debug_enabled(args)
            try:
                return main([a for a in args if a != DEBUG_FLAG])
            except (RobomosaicError, OSError) as e:
                if debug:
                    raise
                raise SystemExit(f"{name}: {one_line(e)}") from None

        return run

    return wrap
