"""One error type whose message is one line: what is wrong, where, and what to do."""

from __future__ import annotations


class BinllmError(Exception):
    """A user-facing error. ``str(err)`` is a single line meant to be printed as is."""

    def __init__(self, what: str, where: str = "", todo: str = "") -> None:
        parts = [what]
        if where:
            parts.append(f"at {where}")
        message = " ".join(parts)
        if todo:
            message = f"{message}; {todo}"
        super().__init__(" ".join(message.split()))


class ConfigError(BinllmError):
    """A config file or a --set override that does not fit the config schema."""


class DataError(BinllmError):
    """Source data that cannot be read or does not fit the expected layout."""


class StageError(BinllmError):
    """A stage that cannot run: missing upstream output, an empty split, an unreachable URI."""
