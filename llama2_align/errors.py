"""The project's own error types: a request that is wrong, as opposed to a failure while doing it.

:class:`InputError` (a ``ValueError``) says the request itself is wrong: an unknown preset or field, a missing input
path, a data record that breaks its contract, a checkpoint of the wrong kind. Retrying cannot help, so the Prefect
tasks never retry it and show its message as the run's state message. Any other exception (a ``ValueError`` raised
inside transformers included) is a failure while running: it may be retried when it looks transient (see
``tasks/common.py``) and is reported as a bug otherwise.
"""

from __future__ import annotations


class InputError(ValueError):
    """The request is wrong (bad config, data or input path); the message says what to fix."""


class ConfigError(InputError):
    """A configuration value that cannot work (an unknown field, a value out of range, settings that conflict)."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input path that does not exist or is not of the expected kind."""
