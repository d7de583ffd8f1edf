"""What the project's command lines share: one-line argument errors and help text that
shows every default.

* `ArgParser`: an ``argparse.ArgumentParser`` whose mistakes raise `UserError` (printed
  as one ``error:`` line, exit status 2, by `errors.run_cli`) instead of usage + exit.
* `HelpFormatter`: ``(default: X)`` after every option that has a default worth
  showing (not None / False / empty), descriptions kept as written.
"""

from __future__ import annotations

import argparse

from mixkvq_jax.errors import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """Defaults in the help of every option that has one; descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        empty = isinstance(default, list | tuple) and not default
        if default is None or default is False or empty or action.help is None:
            return action.help
        if "%(default)" in action.help or action.default is argparse.SUPPRESS:
            return action.help
        if isinstance(action.default, list | tuple):  # as it is typed on the command line
            sep = " " if action.nargs in ("+", "*") else ","
            return f"{action.help} (default: {sep.join(map(str, action.default))})"
        return super()._get_help_string(action)


class ArgParser(argparse.ArgumentParser):
    """Argument mistakes are a `UserError` (one line, exit 2), not usage + exit."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")
