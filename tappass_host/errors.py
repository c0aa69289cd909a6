"""The errors tappass-host reports to its user.

Every error the CLI prints is a `TappassError`: its message is one line that
says what is wrong, and it never carries secret material.
"""


class TappassError(Exception):
    """An error with a one-line, user-facing message."""

    exit_code = 1


class ConfigError(TappassError):
    """The configuration file is unreadable or holds a bad key or value."""


class InvalidName(TappassError):
    """A sandbox name does not match the allowed pattern."""


class NotFound(TappassError):
    """A sandbox or file the command needs does not exist."""
