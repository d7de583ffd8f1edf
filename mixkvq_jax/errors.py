"""`UserError` and how the CLIs end: one ``error:`` line (exit 2) or Ctrl-C (exit 130).

The CLI prints ``error: <message>`` to stderr and exits with status 2, without a
traceback. Library code raises `UserError` (or a subclass) for mistakes a user can fix;
bugs stay ordinary exceptions.

Ctrl-C: a plain ``KeyboardInterrupt`` unwinds the stack and lets the interpreter shut
down while XLA's own threads may still be compiling. XLA compiles on a worker thread
(``PjRtCompiler::CompileAndLoad`` on a tsl thread pool); interpreter finalization tears
down the PjRt client under it and that worker then calls through a freed object
(``SingleDeviceSharding::Create``, a jump to address 0): exit 139 instead of 130.
`exit_on_interrupt` therefore ends the process without finalization: on SIGINT it
flushes stdout, prints one line and calls ``os._exit(130)``. A watcher thread woken
through ``signal.set_wakeup_fd`` does it at once, even while the main thread sits in
native code (loading, compiling, waiting for the device), where Python-level signal
handlers only run when that call returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

INTERRUPTED_EXIT = 130
FLUSH_TIMEOUT_S = 1.0
_exit_lock = threading.Lock()
_installed: list[str] = []  # the message of the active `exit_on_interrupt`, if any
_process_wide: list[contextlib.AbstractContextManager[None]] = []


class UserError(Exception):
    """A user-fixable problem; the message says what is wrong and what would be right."""


def _flush(stream: object) -> None:
    try:
        stream.flush()  # type: ignore[attr-defined]
    except (OSError, ValueError, RuntimeError, AttributeError):  # closed, reentrant, None
        pass


def exit_now(status: int, message: str | None = None) -> None:
    """Flush stdout/stderr, write ``message`` (one line) to fd 2 and ``os._exit(status)``:
    no interpreter finalization, so XLA threads cannot crash the exit. Only one thread
    gets to exit; a second caller waits for the process to end."""
    if not _exit_lock.acquire(blocking=False):
        threading.Event().wait()
    # Flushing can block (a full pipe nobody reads): give it a second, then exit anyway.
    flusher = threading.Thread(target=lambda: (_flush(sys.stdout), _flush(sys.stderr)),
                               daemon=True)
    flusher.start()
    flusher.join(FLUSH_TIMEOUT_S)
    if message is not None:
        # On a terminal a progress bar or "^C" may hold the cursor mid-line.
        try:
            start = "\n" if sys.stderr.isatty() else ""
        except (AttributeError, ValueError):
            start = ""
        with contextlib.suppress(OSError):
            os.write(2, f"{start}{message}\n".encode())
    os._exit(status)


def _watch(read_fd: int, message: str) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data or 0 in data:  # closed, or the stop byte of `exit_on_interrupt`
            return
        if signal.SIGINT in data:
            exit_now(INTERRUPTED_EXIT, message)


@contextlib.contextmanager
def exit_on_interrupt(message: str = "interrupted") -> Iterator[None]:
    """While active, SIGINT (Ctrl-C) prints ``message`` and exits with status 130 at
    once, from any state, via `exit_now`. Main thread only (elsewhere, and when already
    active, it does nothing); the previous handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread() or _installed:
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    old_handler = signal.signal(signal.SIGINT, lambda *_: exit_now(INTERRUPTED_EXIT, message))
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_fd, message), daemon=True,
                               name="mixkvq-sigint")
    watcher.start()
    _installed.append(message)
    try:
        yield
    finally:
        _installed.clear()
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old_handler)
        os.write(write_fd, b"\0")
        watcher.join()
        os.close(read_fd)
        os.close(write_fd)


def install_exit_on_interrupt(message: str = "interrupted") -> None:
    """`exit_on_interrupt` for the rest of the process (a CLI's ``__main__`` calls it
    before its heavy imports, so Ctrl-C during them exits 130 too)."""
    manager = exit_on_interrupt(message)
    manager.__enter__()
    _process_wide.append(manager)  # held, so it is never finalized (which would uninstall)


def run_cli(command: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """Run a CLI body: user mistakes (`UserError`, `KVConfigError`) print one line on
    stderr and give exit status 2; Ctrl-C prints ``interrupted`` and exits 130 (see
    `exit_on_interrupt`)."""
    from mixkvq_jax.config import KVConfigError  # config does not import this module

    with exit_on_interrupt(interrupted):
        try:
            return command()
        except (UserError, KVConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # raised by hand, or the handler was not ours
            print(interrupted, file=sys.stderr)
            return INTERRUPTED_EXIT


def cli_exit(status: int) -> None:
    """End a CLI process with ``status`` after flushing, skipping interpreter
    finalization (see the module docstring): ``cli_exit(main())`` in ``__main__``."""
    exit_now(status)
