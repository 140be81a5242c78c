"""Errors a user can cause and fix.

Each is printed by the command line as one line and ends the process with exit status 2; anything
else that escapes is a bug and keeps its traceback.
"""


class HloraError(Exception):
    """Base class: an error in the user's input, worded for that user.

    Its text is one line whatever it quotes (a key or value with a line break in it): line breaks and
    runs of spaces become one space, so the command line's one-line promise holds for every message."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


class ConfigError(HloraError):
    """A config file or override that is malformed or names an unknown key or value."""


class DataError(HloraError):
    """A data directory, file, task or split that cannot be used."""


class ModelError(HloraError):
    """A model path or hub id that does not give a sequence-classification model."""


class AggregationError(HloraError):
    """Client updates that an aggregation method cannot combine (for example unequal ranks for FedIT)."""


class RunDirError(HloraError):
    """A run directory that exists already or cannot be written."""


class ExportError(HloraError):
    """An export destination that is not a new or empty folder, or an adapter that does not fit its model."""


class CheckpointError(HloraError):
    """A run's checkpoint that is damaged or does not belong to the run's config."""
