"""What every script that prints a table shares: a closed pipe (``script | head -1``) ends it quietly."""

from __future__ import annotations

import os
import sys
from typing import Callable


def run_script(main: Callable[[], int | None]) -> None:
    """Exit with ``main()``'s status; when the reader of stdout goes away (``| head``), stop printing
    and exit 0 without a traceback, as ``cat`` and ``ls`` do for what they could not print."""
    try:
        code = main()
        sys.stdout.flush()  # (a pipe closed on the last buffered lines fails here, inside the guard)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = 0
    sys.exit(code)
