"""Errors the engine raises for bad input, typed so the HTTP edge never reads messages."""

from __future__ import annotations


class RequestError(ValueError):
    """Bad input: ``param`` names the request field at fault, ``code`` is OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def __reduce__(self):  # crosses the engine-core process boundary intact
        return (RequestError, (str(self), self.param, self.code))
