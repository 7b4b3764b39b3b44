"""Exceptions raised by lmeval for invalid input, with a message a user can act on.

The command line prints ``str(error)`` as one line and exits with status 2; a
traceback is shown only with ``-v``.
"""


class LmevalError(Exception):
    """Base class of errors caused by input, configuration or environment."""


class ConfigError(LmevalError):
    """An option or config file has an invalid value."""


class ModelError(LmevalError):
    """A model or tokenizer is missing, unreachable or cannot be loaded."""


class DataError(LmevalError):
    """A dataset or task is missing, unreadable or lacks the expected field."""


class ScoringError(LmevalError):
    """Scoring could not produce a valid number, e.g. the model returned NaN."""


class VocabularyError(ConfigError):
    """Two tokenizers map a token id to different tokens, so their models cannot be compared."""
