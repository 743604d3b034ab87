"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits non-zero, so `dvc repro`
stops with the reason in view."""


class CptError(Exception):
    """Base: a problem with the user's input, params or data, with a message that names what and where."""


class ConfigError(CptError):
    """A param is missing, unknown or out of range."""


class DataError(CptError):
    """Input data that cannot be used (missing file, unknown format, empty corpus...)."""


class ValidationFailed(CptError):
    """The data-quality gate failed."""
