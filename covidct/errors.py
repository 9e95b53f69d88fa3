"""Errors that reach the user as one clear message instead of a library traceback."""

import signal

# SIGHUP: the terminal or SSH session closed; treated as SIGTERM, so a run started without nohup keeps its epoch
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class CovidCTError(Exception):
    """Base class: the CLI prints these as 'error: <message>' and exits non-zero."""


class DataError(CovidCTError):
    """The data on disk is missing, malformed or unreadable; the message names the path."""


class ConfigError(CovidCTError):
    """A configuration value is invalid; the message names the key."""


class TrainingIncomplete(CovidCTError):
    """Training ended before the epochs its config asks for: no record is written, the checkpoint is kept."""


class TrainingDiverged(CovidCTError):
    """The training loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class RunInterrupted(CovidCTError):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM once its checkpoint was saved; a rerun resumes there."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
