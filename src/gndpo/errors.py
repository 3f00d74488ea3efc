"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class GndpoError(Exception):
    """A mistake in the user's input (config, data, model paths) with a message that names the fix."""


class ConfigError(GndpoError):
    """Invalid configuration: unknown key, bad value, or inconsistent fields."""


class DataError(GndpoError):
    """Dataset missing, malformed record, unreadable image."""


class ModelError(GndpoError):
    """Model path missing, unsupported architecture, student/teacher incompatibility."""


class TrainingError(GndpoError):
    """The run cannot go on sensibly (e.g. step after step of non-finite values); checkpoints stay intact."""


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped a run at a step boundary; ``signum`` gives the exit status 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
