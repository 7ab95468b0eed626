"""Errors a user can cause. Each carries one line that names the file, row, field or key at fault.

tasks/base.py installs a log filter so Luigi prints these as that one line, not a traceback.
"""


class SelfplayError(Exception):
    """Base class: a problem with the user's inputs, not a bug in selfplay."""


class RecipeError(SelfplayError):
    """A recipe key, type or value is wrong, or a run directory was made by another recipe."""


class DataError(SelfplayError):
    """A dataset or artifact file has a missing column, a wrong type or a bad row."""


class ModelError(SelfplayError):
    """A model path is not a model, or a checkpoint does not match its base."""


class TrainingError(SelfplayError):
    """Training cannot go on (a NaN or inf loss); the last good checkpoint is kept."""


class RunLockedError(SelfplayError):
    """Another command is writing the same run directory (see tasks/lock.py)."""


class Interrupted(SelfplayError):
    """A SIGTERM or SIGINT stopped the command; what was saved is kept and the next command resumes."""


class DiskFullError(SelfplayError):
    """A write ran out of space; nothing partial was left behind, and the same command can be rerun."""
