"""Console/file logging that plays well with tqdm, and a meter for interval averages."""
from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

LOGGER_NAME = "seg_accel"


class _TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so log lines do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # logging must never kill training; let logging report it
            self.handleError(record)


class _LogFileHandler(logging.FileHandler):
    """The run's log file. When it cannot be written any more (a full disk), it stops trying:
    the console keeps every line, and the error that ends the run says what happened, instead
    of a logging traceback per line."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        try:
            super().emit(record)
            self.flush()
        except OSError:
            self.broken = True

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True


def setup_logging(work_dir: str | Path | None, is_main: bool, timestamp: str | None = None) -> str:
    """INFO on the main process (console + ``<work_dir>/<timestamp>.log``), WARNING elsewhere.
    Returns the timestamp that names the log files."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(console)
    timestamp = timestamp or datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    if is_main and work_dir is not None:
        file_handler = _LogFileHandler(Path(work_dir) / f"{timestamp}.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
    return timestamp


class IntervalMeter:
    """Sums scalars over a log interval; ``averages`` returns the interval means.

    Tensors stay on their device until ``averages`` (no device sync per iteration).
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def update(self, values: dict[str, float | torch.Tensor]) -> None:
        import torch  # here: error reporting imports this module and must stay light

        for key, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def averages(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.counts[k] for k in self.sums}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def record_in_log_file(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the run's log file only (the console already shows it): why a run
    ended stays in its log."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logger.makeRecord(LOGGER_NAME, level, __file__, 0, message, None, None))
