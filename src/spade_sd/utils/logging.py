"""The package's logger, its timed start/finish lines and its progress bars.

Info-level messages say what starts, how long it took and what was added (as scanpy's ``logg.info(..., time=start)``
does); they are shown by default (:attr:`sd.settings.verbosity <spade_sd.utils.settings.Settings.verbosity>`).
Details go to debug. Progress bars follow :attr:`sd.settings.progress <spade_sd.utils.settings.Settings.progress>`.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from spade_sd.utils.settings import DEFAULT_VERBOSITY, settings

logger = logging.getLogger("spade_sd")


class _StderrUnlessConfigured(logging.StreamHandler):
    """Writes to the current ``sys.stderr``, unless the application configured logging (a handler on the root).

    This is :data:`logging.lastResort` at spade_sd's own level: with no logging set up (a plain script, a notebook)
    spade_sd's info lines are shown, as scanpy's are; once the root logger has a handler (``logging.basicConfig``,
    a framework, pytest) the records go there, formatted as the application chose, and are not shown twice.
    """

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        # looked up at each record: notebooks and test captures replace sys.stderr after import
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # StreamHandler.__init__ sets it; the current sys.stderr is always used

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


class _Formatter(logging.Formatter):
    """Info lines as they are; warnings and errors prefixed with their level, as scanpy prints them."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


if not any(isinstance(handler, _StderrUnlessConfigured) for handler in logger.handlers):  # once, even if reloaded
    _handler = _StderrUnlessConfigured()
    _handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(_handler)
if logger.level == logging.NOTSET:
    logger.setLevel(DEFAULT_VERBOSITY)


def format_duration(seconds: float) -> str:
    """``0:00:12`` for 12.3 s: hours, minutes and whole seconds, as scanpy writes durations."""
    return str(datetime.timedelta(seconds=round(seconds)))


class Timer:
    """What :func:`timed` yields: the seconds since the start, and details added to the finish line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.details: list[str] = []

    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start

    def add(self, detail: str, *args: Any) -> None:
        """Add ``detail % args`` to the finish line (e.g. what was added, a rate)."""
        self.details.append(detail % args if args else detail)


@contextmanager
def timed(message: str, *args: Any, level: int = logging.INFO) -> Iterator[Timer]:
    """Log ``message % args`` on entering and ``    finished (0:00:12)`` with the timer's details on leaving.

    For steps that take more than a few seconds (encoding features, training, fine-tuning); nothing is logged on
    leaving through an error, which says what happened itself.

    Parameters
    ----------
    message, args
        What starts, as for :meth:`logging.Logger.info`.
    level
        Level of both lines.

    Yields
    ------
    A :class:`Timer`; :meth:`Timer.add` appends details to the finish line.
    """
    logger.log(level, message, *args)
    timer = Timer()
    yield timer
    details = f": {'; '.join(timer.details)}" if timer.details else ""
    logger.log(level, "    finished (%s)%s", format_duration(timer.elapsed), details)


def _tqdm_class():
    # tqdm.auto draws widgets in notebooks, but fails there without ipywidgets: then the console bar (as Lightning)
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
):
    """A ``tqdm`` progress bar, drawn where it can be seen (a terminal or a notebook), unless switched off.

    Drawn if :attr:`sd.settings.progress <spade_sd.utils.settings.Settings.progress>` and ``enabled``, and then
    only where a terminal or a notebook shows it (tqdm's ``disable=None``), not into a log file or a pipe. The bar is removed when it closes (``leave=False``): the finish line of :func:`timed` says what was done.

    Parameters
    ----------
    iterable
        What to iterate over, or ``None`` to call ``update`` by hand.
    total
        The expected number of steps (``len(iterable)`` by default).
    desc
        What is being done.
    unit
        What a step is (e.g. ``"patch"``).
    enabled
        ``False`` for a call asked to be quiet.

    Returns
    -------
    The :class:`tqdm.tqdm` (a context manager; close it, or iterate through it, to remove it).
    """
    disable = None if settings.progress and enabled else True
    return _tqdm_class()(iterable, total=total, desc=desc, unit=unit, leave=False, disable=disable, dynamic_ncols=True)
