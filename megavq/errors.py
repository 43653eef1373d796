"""The exceptions megavq raises for bad user input. Scripts print their message on one line and exit non-zero.

They live apart from the modules that raise them, so that importing an error class imports nothing else.
"""


class MegavqError(Exception):
    """An error in user input (a config, a file, a data source); the message names the bad value."""


class ConfigError(MegavqError):
    """A configuration key with a wrong type or value, or a combination of keys that cannot run."""


class DataError(MegavqError):
    """A missing, incomplete or corrupt data source or tokenized data directory."""


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok: the one-line checks of configuration values."""
    if not ok:
        raise ConfigError(message)


def check_positive(pairs: list) -> None:
    """Every (key, value) of pairs has value >= 1."""
    for key, value in pairs:
        check(value >= 1, f"{key} must be >= 1, got {value}")


class TrainingError(MegavqError):
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be resumed)."""


# ---- how a script ends: the exit codes a requeue loop reads (megavq.train.launch.user_errors) -------------------
EXIT_USAGE = 2  # bad input (config, data, command line) and a first non-finite loss: fix something, do not retry
EXIT_FATAL = 3  # cannot go on and retrying will not help (a checkpoint that cannot be written or read, NaN again)
EXIT_RETRY = 75  # stopped in a state that a requeue continues with `--resume auto` (EX_TEMPFAIL)


class FatalError(TrainingError):
    """Training cannot go on, and a retry would end the same way (exit EXIT_FATAL)."""


class CheckpointError(FatalError):
    """A checkpoint that cannot be written (no space) or read (missing, truncated or altered file)."""


class RetryableError(MegavqError):
    """The run stopped in a state a requeue continues with `--resume auto` (exit EXIT_RETRY): pre-empted after
    saving, a lost rank, a collective that timed out."""
