"""The one exception type the suite raises for bad input, so every entry point can print it as one clear line."""
from __future__ import annotations

import functools
import sys


class SuiteError(Exception):
    """A problem with the user's input (config, paper file, dataset), not a bug in the suite."""


class DatasetMissing(SuiteError):
    pass


class DatasetCorrupt(SuiteError):
    pass


def entry_point(main):
    """A command's `main(argv) -> int`: a SuiteError it raises becomes one `error: ...` line on stderr and exit
    status 2, never a traceback."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except SuiteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run
