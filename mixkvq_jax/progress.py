"""Progress a person sees on a terminal: phase spinners with elapsed time, tqdm bars.

Everything goes to stderr and only when stderr is a terminal (and the caller did not
turn it off, e.g. ``--quiet``); otherwise every method is a no-op, so logs and pipes
stay clean. This module does not import JAX.

    progress = Progress.for_terminal(enabled=not quiet)
    with progress.phase("loading model"):      # spinner, then "done ... 2.1 s"
        ...
    bar = progress.bar("prefill", total=n_tokens, unit="tok")
    bar.update(k); bar.close()

`LineStream` lets generated text stream to stdout while a bar is drawn on the same
terminal: finished lines go above the bar (``tqdm.write``), the unfinished line is
shown inside the bar, and is printed when the bar closes.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

SPINNER = "|/-\\"
REFRESH_S = 0.1


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _NoBar:
    """What `Progress.bar` returns when progress is off."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """Phase spinners and bars on ``stream`` (stderr), or nothing when disabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.active_bar: Any = None  # the bar streamed text must go around

    @classmethod
    def for_terminal(cls, enabled: bool = True) -> Progress:
        """On when ``enabled`` and stderr is a terminal."""
        return cls(enabled and is_terminal(sys.stderr))

    @contextlib.contextmanager
    def phase(self, desc: str) -> Iterator[None]:
        """A spinner with the elapsed time while the block runs (a thread redraws it, so
        it moves while the main thread waits in native code), then one ``done`` line.
        On an exception the spinner line is erased, so an error stays one line."""
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        stop = threading.Event()
        lock = threading.Lock()

        def draw(mark: str, end: str = "") -> None:
            with lock:
                self.stream.write(f"\r\x1b[K{mark} {desc} {time.perf_counter() - t0:5.1f} s{end}")
                self.stream.flush()

        def spin() -> None:
            i = 0
            while not stop.wait(REFRESH_S):
                i += 1
                draw(SPINNER[i % len(SPINNER)])

        draw(SPINNER[0])
        thread = threading.Thread(target=spin, daemon=True, name="mixkvq-spinner")
        thread.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            thread.join()
            if ok:
                draw("done", "\n")
            else:
                with lock:
                    self.stream.write("\r\x1b[K")
                    self.stream.flush()

    def bar(self, desc: str, total: int | None, unit: str, *, leave: bool = True,
            bar_format: str | None = None) -> Any:
        """A tqdm bar (or a no-op stand-in when progress is off)."""
        if not self.enabled:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=leave,
                    dynamic_ncols=True, mininterval=REFRESH_S, bar_format=bar_format)


class LineStream:
    """A text stream for generated text that coexists with ``progress.active_bar``.

    With no active bar, or when ``out`` is not a terminal (so the bar on stderr cannot
    collide with it), text goes straight to ``out``. Otherwise complete lines are
    written above the bar and the unfinished line is shown in the bar's postfix.
    """

    def __init__(self, out: TextIO, progress: Progress, *, shown_chars: int = 48) -> None:
        self.out, self.progress, self.shown_chars = out, progress, shown_chars
        self.pending = ""

    def _around_bar(self) -> Any:
        bar = self.progress.active_bar
        return bar if bar is not None and is_terminal(self.out) else None

    def write(self, text: str) -> None:
        bar = self._around_bar()
        if bar is None:
            self.release()
            self.out.write(text)
            return
        from tqdm.auto import tqdm

        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            tqdm.write(line, file=self.out)
        tail = self.pending[-self.shown_chars:].replace("\r", " ")
        bar.set_postfix_str(("…" if len(self.pending) > len(tail) else "") + tail)

    def flush(self) -> None:
        if self._around_bar() is None:
            self.release()
            self.out.flush()

    def release(self) -> None:
        """Print the held unfinished line (call once the bar is closed)."""
        if self.pending:
            self.out.write(self.pending)
            self.pending = ""
        self.out.flush()
