"""User-facing errors: bad input gets one line naming the problem and the fix, never a traceback."""

import os
import sys
from collections.abc import Callable
from functools import wraps


class UserError(Exception):
    """A problem with the user's input or environment; its message names the problem and the fix."""


def report_user_errors(func: Callable) -> Callable:
    """Turn a UserError into one line on stderr and exit code 2 (full traceback with HYDRA_FULL_ERROR=1)."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"llmtune: error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
