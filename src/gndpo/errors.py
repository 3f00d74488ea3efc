"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class GndpoError(Exception):
    """A mistake in the user's input (config, data, model paths) with a message that names the fix."""


class ConfigError(GndpoError):
    """Invalid configuration: unknown key, bad value, or inconsistent fields."""


class DataError(GndpoError):
    """Dataset missing, malformed record, unreadable image."""


class ModelError(GndpoError):
    """Model path missing, unsupported architecture, student/teacher incompatibility."""
