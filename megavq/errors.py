"""The exceptions megavq raises for bad user input. Scripts print their message on one line and exit non-zero.

They live apart from the modules that raise them, so that importing an error class imports nothing else.
"""


class MegavqError(Exception):
    """An error in user input (a config, a file, a data source); the message names the bad value."""


class ConfigError(MegavqError):
    """A configuration key with a wrong type or value, or a combination of keys that cannot run."""


class DataError(MegavqError):
    """A missing, incomplete or corrupt data source or tokenized data directory."""


class TrainingError(MegavqError):
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be resumed)."""
