"""The one exception of user errors (no heavy imports: the command line raises it before
torch is loaded)."""


class ConfigError(Exception):
    """A user error: bad flags, data or checkpoint. main.py prints it as one ``error:`` line."""
