"""The errors every layer raises for its user: printed without a traceback."""


class ConfigError(ValueError):
    """A configuration that cannot work (the schema's checks, or a cross-reference)."""


class CommandError(RuntimeError):
    """An error whose message is for the user: printed without a traceback."""
