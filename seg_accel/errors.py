"""Errors meant for people: each names what was wrong and where."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(Exception):
    """A mistake in the user's configuration.

    ``key`` is the dotted config path (``optimizer.lr``, ``data.train.pipeline.1``),
    ``file`` the config file (or ``--cfg-options``) the value came from. Scripts
    turn it into one line on stderr and exit code 2.
    """

    def __init__(self, message: str, key: str | None = None, file: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.file = file

    def located(self, key: str | None = None, file: str | None = None) -> ConfigError:
        """Fill in the location if it is not known yet."""
        if self.key is None and key is not None:
            self.key = key
        if self.file is None and file is not None:
            self.file = file
        return self

    def within(self, prefix: str | None, names: Iterable[str]) -> ConfigError:
        """Make a key relative to a component (a constructor argument such as ``crop_size``)
        a full config path under ``prefix``; otherwise fill in ``prefix`` if no key is known."""
        if self.key and prefix and self.key.split(".")[0] in set(names):
            self.key = f"{prefix}.{self.key}"
        return self.located(key=prefix)

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.key:
            where.append(self.key)
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class TrainingError(Exception):
    """Training cannot go on (e.g. non-finite gradients); the message says where and why."""


class StorageError(TrainingError):
    """A file seg-accel writes could not be written (a full disk, no permission, a read-only
    folder); the message names the file and what was being written."""


class UntrustedExportError(ImportError):
    """An export (a folder or Hub repo: data from elsewhere) names code to run that is not
    registered here; loading it needs the user's opt-in (``trust_remote_code``)."""


class DataError(Exception):
    """A problem with a sample or a dataset on disk (names the dataset, index and file)."""


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[f] for f in found]


def did_you_mean(name: str, choices: Iterable[str], list_all: bool = True, max_list: int = 40) -> str:
    """' Did you mean: X? Choices: a, b, c' (the part after the main message)."""
    choices = sorted(set(choices))
    text = ""
    matches = close_matches(name, choices)
    if matches:
        text += " Did you mean: " + ", ".join(matches) + "?"
    if list_all and choices:
        shown = choices[:max_list]
        more = f", ... ({len(choices) - max_list} more)" if len(choices) > max_list else ""
        text += " Choices: " + ", ".join(shown) + more + "."
    return text
