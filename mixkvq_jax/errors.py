"""`UserError`: bad input from a user (paths, names, sizes), reported as one line.

The CLI prints ``error: <message>`` to stderr and exits with status 2, without a
traceback. Library code raises it (or a subclass) for mistakes a user can fix; bugs
stay ordinary exceptions.
"""

from __future__ import annotations


class UserError(Exception):
    """A user-fixable problem; the message says what is wrong and what would be right."""
