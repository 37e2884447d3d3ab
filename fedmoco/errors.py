"""User-facing errors. The CLI prints these as one line, without a traceback."""


class FedmocoError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class DataError(FedmocoError, ValueError):
    """A data folder, file or data option is missing or wrong. The message names it."""


class ConfigError(FedmocoError, ValueError):
    """A hyper-parameter is out of range. The message names the option."""


class CheckpointError(FedmocoError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the requested model."""
