"""Errors raised at the edges (data, config), each naming where and what to do."""


class PrefoptError(Exception):
    """Base class: a problem the user can fix. The CLI prints its message without a traceback."""


class DataError(PrefoptError, ValueError):
    """A bad input row or file. The message names file, line and field."""

    def __init__(self, message: str, source: str | None = None, field: str | None = None, reason: str = "invalid"):
        self.source = source
        self.field = field
        self.reason = reason
        where = source or "<unknown>"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ConfigError(PrefoptError, ValueError):
    """An invalid configuration value or unknown key."""
