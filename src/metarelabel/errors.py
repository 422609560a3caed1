"""User-facing errors: the CLI prints them in one line and exits non-zero, no traceback."""


class MetaRelabelError(Exception):
    """Base class for errors caused by user input or the run's files, not by a bug."""


class ConfigError(MetaRelabelError):
    """A config field, preset, family or strategy name is invalid."""


class CheckpointError(MetaRelabelError):
    """A checkpoint is missing, unreadable, corrupt or belongs to another run."""


class RunDirError(MetaRelabelError):
    """The run directory cannot be used (exists, unwritable, incomplete)."""


class TrainingDiverged(MetaRelabelError):
    """A loss or utility became NaN/inf; a checkpoint marked as failed was written."""


class NonFiniteError(Exception):
    """Internal: a named quantity (loss, utility, log Z) became NaN or inf."""

    def __init__(self, quantity: str, value: float = float("nan")):
        super().__init__(f"{quantity} became {value}")
        self.quantity, self.value = quantity, value
