"""User-facing errors. The CLI prints these as one line, without a traceback."""


class FedmocoError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class DataError(FedmocoError, ValueError):
    """A data folder, file or data option is missing or wrong. The message names it."""


class ConfigError(FedmocoError, ValueError):
    """A hyper-parameter is out of range. The message names the option."""


class CheckpointError(FedmocoError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the requested model."""


def os_error_line(exc: OSError) -> str:
    """``"PATH: reason"`` of an OSError (a folder that cannot be made, a full disk), for the
    one-line message a command prints instead of a traceback."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"
