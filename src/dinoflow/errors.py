"""The errors a user can fix, each with one message that names the key, file or step.

``kedro run`` (``dinoflow.pipelines.cli``) prints a ``UserError`` as that one message and exits
non-zero; the traceback goes to the log file. Anything else is a bug and keeps its traceback.
Each class also derives from the builtin a caller would catch (ValueError, OSError...).
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can change: a parameter, a file, free space, another running job."""


class ConfigError(UserError, ValueError):
    """A parameter problem, with every offending key named."""


class DataError(UserError, ValueError):
    """Missing, unreadable or unsuitable data, naming the file or folder."""


class DiskFullError(UserError, OSError):
    """A write ran out of space; names the file and the free space. Nothing written before is lost."""


class LockedError(UserError, RuntimeError):
    """Another process holds the lock of a run directory or of the model registry."""


class CheckpointError(UserError, RuntimeError):
    """No readable checkpoint to resume from (and none to fall back to)."""


class TrainingDiverged(UserError, RuntimeError):
    """A loss term became NaN or infinite; the last good checkpoint is kept."""
