"""Progress bars for dwk's long stages in a terminal: extraction by checkpoint, training by epoch.

Off unless a program turns it on. The CLI calls :func:`enable` when stderr is a terminal (not with
``--no-progress``, never under pytest); library code only marks its loops, with :func:`track` (one
line: ``for x in progress.track(xs, "what")``) or :func:`task`, and these cost nothing while
progress is off: in flows on a Prefect worker, in tests, in notebooks, in piped output.

While bars show (one rich display on stderr, started by the first open task and stopped by the
last), log handlers that write to the terminal are routed through the display's console, so log
lines scroll above the bars instead of tearing them. Finished bars stay on screen as a record of
each stage. Thread-safe: Prefect runs tasks in threads of the flow's process.
"""
from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

_lock = threading.RLock()
_console: Any = None  # the rich Console that enable() was given; None while progress is off
_display: Any = None  # the rich Progress showing now (None when no task is open)
_n_open = 0  # open tasks of _display
_rerouted: list[tuple[logging.Handler, IO[str], Any]] = []  # (handler, its stream, its own console's file)


def enable(console: Any = None) -> None:
    """Show progress bars from now on (``console``: a rich Console; default: one on stderr)."""
    global _console
    from rich.console import Console

    with _lock:
        _console = console if console is not None else Console(file=sys.stderr)


def disable() -> None:
    """Stop showing bars: the display still showing (a stage that raised) ends, log handlers are restored."""
    global _console
    with _lock:
        _console = None
        _stop_display()


def is_enabled() -> bool:
    """Whether a program turned progress bars on (:func:`enable`)."""
    return _console is not None


class Task:
    """One bar: ``advance()`` as work finishes; it closes itself when it reaches ``total``, or on
    ``close()`` / the end of a ``with`` block. A no-op while progress is off."""

    def __init__(self, description: str, total: int | None):
        global _n_open
        self._progress: Any = None
        self._id: Any = None
        self._total = total
        self._done = 0
        with _lock:
            if _console is None:
                return
            from rich.markup import escape

            self._progress = _start_display()
            self._id = self._progress.add_task(escape(description), total=total)
            _n_open += 1

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units of work done (checkpoints, epochs, chunks)."""
        if self._id is None:
            return
        self._progress.advance(self._id, n)
        self._done += n
        if self._total is not None and self._done >= self._total:
            self.close()

    def close(self) -> None:
        """End this bar (it stays on screen); the display stops when no other bar is open."""
        global _n_open
        with _lock:
            if self._id is None:
                return
            self._id = None
            if self._progress is _display:
                _n_open -= 1
                if _n_open <= 0:
                    _stop_display()

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def task(description: str, total: int | None = None) -> Task:
    """A bar for ``total`` units of work (None: a count without an end)."""
    return Task(description, total)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` and advance a bar after each one's loop body (``total``: default ``len(items)``)."""
    if _console is None:  # the common case: no bar, no wrapper around the loop's items
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Task(description, total) as bar:
        for item in items:
            yield item
            bar.advance()


# ----------------------------------------------------------------------------- the display
def _start_display() -> Any:
    """The rich Progress showing now, started (with log handlers rerouted) if none is."""
    global _display, _n_open
    if _display is not None:
        return _display
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    _display = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=_console, transient=False,
                        refresh_per_second=4, redirect_stdout=False, redirect_stderr=True)
    _n_open = 0
    _reroute_log_handlers(_console)
    _display.start()
    return _display


def _stop_display() -> None:
    """End the display (its last frame stays on screen) and give log handlers their streams back."""
    global _display, _n_open
    if _display is None:
        return
    display, _display, _n_open = _display, None, 0
    try:
        display.stop()
    finally:
        _restore_log_handlers()


def _terminal_streams() -> list[Any]:
    """The streams a log handler may hold that write to the display's terminal (stderr)."""
    return [s for s in (sys.stderr, sys.__stderr__) if s is not None]


def _all_handlers() -> list[logging.Handler]:
    """Every handler of every logger (each once): the root's, Prefect's console handler, ..."""
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    seen: dict[int, logging.Handler] = {}
    for lg in loggers:
        for h in list(lg.handlers):
            seen.setdefault(id(h), h)
    return list(seen.values())


def _reroute_log_handlers(console: Any) -> None:
    """Send what terminal log handlers write through ``console``, which prints it above the bars."""
    from rich.file_proxy import FileProxy

    terminal = _terminal_streams()
    for h in _all_handlers():
        stream = getattr(h, "stream", None)
        if not isinstance(h, logging.StreamHandler) or not any(stream is s for s in terminal):
            continue
        proxy = FileProxy(console, stream)
        own = getattr(h, "console", None)  # Prefect's console handler prints through a rich Console of its own
        own_file = getattr(own, "file", None)
        _rerouted.append((h, stream, own_file))
        h.setStream(proxy)
        if own is not None and any(own_file is s for s in terminal):
            own.file = proxy


def _restore_log_handlers() -> None:
    """Undo :func:`_reroute_log_handlers`."""
    while _rerouted:
        h, stream, own_file = _rerouted.pop()
        h.setStream(stream)
        own = getattr(h, "console", None)
        if own is not None and own_file is not None:
            own.file = own_file
