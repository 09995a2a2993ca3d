"""Errors a person can act on: the CLI prints the one-line message, exits with ``exit_code``."""

from __future__ import annotations


class FedwsError(Exception):
    """Base of every error the CLI reports as one line instead of a traceback."""

    exit_code = 1


class ConfigError(FedwsError, ValueError):
    """A bad config value: names the field (dotted path) and what is allowed. Exit code 2."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DatasetNotFoundError(FedwsError, FileNotFoundError):
    """A dataset is not on disk: the message names the paths tried and how to get the data.
    Exit code 2: the input (the config's dataset and paths) has to change."""

    exit_code = 2


class DataError(FedwsError, ValueError):
    """The data is present but unusable with this config (bad format, a partition impossible
    for its size). Exit code 2."""

    exit_code = 2
