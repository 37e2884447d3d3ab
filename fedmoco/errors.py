"""User-facing errors. The CLI prints these as one line, without a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable


class FedmocoError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class DataError(FedmocoError, ValueError):
    """A data folder, file or data option is missing or wrong. The message names it.

    ``public``: the same fact in words that carry nothing read from the data (no file name or
    suffix, no header value, no decoder's text): what a site may send to the server when this
    stops its round (clients/app.py). None when the message holds only the site's own folder
    (which the site replaces), counts and option names."""

    def __init__(self, message: str = "", public: str | None = None) -> None:
        super().__init__(message)
        self.public = public

    def __reduce__(self):  # keep ``public`` across processes (DataLoader workers pickle errors)
        return (type(self), (str(self), self.public))


class NoUsableData(DataError):
    """A data folder (or a sample of it) in which nothing could be read: with the evaluation
    commands the usual cause is another kind of data than the checkpoint's domain."""


class ConfigError(FedmocoError, ValueError):
    """A hyper-parameter is out of range. The message names the option."""


class CheckpointError(FedmocoError, ValueError):
    """A checkpoint is missing, corrupt, or does not match the requested model."""


class TrainingDiverged(FedmocoError, FloatingPointError):
    """The loss became NaN or infinite: a learning rate too high, or extreme values in the
    data or the augmentation options. The message names the step."""


def os_error_line(exc: OSError) -> str:
    """``"PATH: reason"`` of an OSError (a folder that cannot be made, a full disk), for the
    one-line message a command prints instead of a traceback."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def reports_os_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main(argv) -> exit status``: an OSError it raises becomes one
    line on stderr, ``"PROG: error: PATH: reason"``, and exit status 2."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except OSError as exc:
                print(f"{prog}: error: {os_error_line(exc)}", file=sys.stderr)
                return 2
        return guarded
    return wrap


#: The end of "none of the N samples could be read" from the evaluation and fine-tuning
#: commands: where to look, and the usual cause (a --domain other than the files').
UNREADABLE_SAMPLES_HINT = ("(the warnings above name each file and why); if the files are another kind of image "
                           "than the checkpoint's, give --domain")
