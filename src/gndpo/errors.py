"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


# Characters str.splitlines() breaks on: a message quoting user input (a key, a file name) stays on one line.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


class GndpoError(Exception):
    """A mistake in the user's input (config, data, model paths) with a message that names the fix; always one
    line, whatever user input it quotes."""

    def __init__(self, message: str = "", *args):
        super().__init__(str(message).translate(_LINE_BREAKS), *args)


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
