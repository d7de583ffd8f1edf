"""`UserError`: bad input from a user (paths, names, sizes), reported as one line.

The CLI prints ``error: <message>`` to stderr and exits with status 2, without a
traceback. Library code raises it (or a subclass) for mistakes a user can fix; bugs
stay ordinary exceptions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A user-fixable problem; the message says what is wrong and what would be right."""


def run_cli(command: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """Run a CLI body: user mistakes (`UserError`, `KVConfigError`) print one line on
    stderr and give exit status 2, Ctrl-C prints ``interrupted`` and gives 130."""
    from mixkvq_jax.config import KVConfigError  # config does not import this module

    try:
        return command()
    except (UserError, KVConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
