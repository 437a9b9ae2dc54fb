"""The error types every layer raises: a leaf module that imports nothing of ours.

Programs map them to exit codes: the ``ValueError`` kinds are mistakes a user can fix (one line on
stderr, exit code 2); ``DataError`` and ``Diverged`` end a run whose checkpoints are intact (exit 1);
``Preempted`` is a SIGTERM answered with a save (exit 143).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config: reported as one line, exit code 2, before any compilation."""


class CheckpointMismatch(ConfigError):
    """A stored step whose tree or shapes differ from what the config builds (one line, exit code 2)."""


class UsageError(ValueError):
    """Bad input from the command line: reported in one line, exit code 2."""


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why in one line."""


class PlanError(ValueError):
    """A request that cannot be planned (bad target, mesh or batch): one line, exit code 2."""


class BadExample(ValueError):
    """An input example that cannot be used (unreadable image, malformed record, too long, ...).

    Input pipelines skip and count these by ``reason`` instead of crashing a long run on one bad file.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class DataError(ValueError):
    """The data is unusable (too many bad records): the run stops with this one-line message."""


class Preempted(Exception):
    """Raised after the state was saved in response to SIGTERM."""


class Diverged(Exception):
    """Raised after ``max_bad_steps`` non-finite steps in a row; the last checkpoint is left intact."""
