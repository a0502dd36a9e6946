"""Errors the command line reports as a one-paragraph refusal (no traceback): wrong flags, files or combinations,
detected before anything heavy loads."""

from __future__ import annotations

__all__ = ["ConfigurationError"]


class ConfigurationError(ValueError):
    """A flag, file or combination the run cannot use; the message names the flag, the expected and the received
    value. Subclasses ``ValueError`` so callers that caught the old errors still do."""
