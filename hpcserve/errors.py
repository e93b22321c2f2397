"""Errors that reach users. Each carries a message that names what is wrong and how to fix it.

The CLI prints these as one line (no traceback); library callers can catch them by type.
"""


class HpcserveError(Exception):
    """Base class for errors shown to users as a single line."""


class ModelError(HpcserveError):
    """The model directory or file is missing, incomplete or unsupported."""


class RequestError(HpcserveError, ValueError):
    """A request or one of its parameters is invalid. `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.field = field
        self.code = code
