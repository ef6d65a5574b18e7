"""Console and log-file output that plays well with tqdm progress bars, for every command."""
from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

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


def record_in_log_file(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the run's log file only (the console already shows it): why a run
    ended stays in its log."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logger.makeRecord(LOGGER_NAME, level, __file__, 0, message, None, None))
