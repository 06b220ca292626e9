"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or environment, described by a message naming the file, key or value."""


class ConfigError(UserError):
    """A configuration file or override that does not fit the stage's typed config."""
