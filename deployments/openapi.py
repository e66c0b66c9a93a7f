"""The served app's OpenAPI document (``GET /openapi.json``): the real request models, and every
status the API sends with its body (Ray-free, FastAPI only).

FastAPI documents a 422 for every body; the ingress answers validation errors with a 400 OpenAI
error object instead, so ``openapi_schema`` drops the 422s and their component schemas. The 200 of
the generation routes is JSON, or an SSE stream (``text/event-stream``) when ``stream`` is true.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field


class ErrorObject(BaseModel):
    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error.")
    param: str | None = Field(None, description="The request field at fault, if any.")
    code: str | int | None = Field(None, description="Machine-readable code, if any.")


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorObject


def _error(description: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if headers:
        out["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return out


RATE_LIMIT_HEADERS = {
    "Retry-After": "Seconds to wait before retrying.",
    "x-ratelimit-limit-requests": "Requests per minute allowed for this API key (per-key limit).",
    "x-ratelimit-remaining-requests": "Requests left in the current window (per-key limit).",
    "x-ratelimit-reset-requests": "Time until the request budget refills, e.g. '1.5s'.",
    "x-ratelimit-limit-tokens": "Tokens per minute allowed for this API key (per-key limit).",
    "x-ratelimit-remaining-tokens": "Tokens left in the current window (per-key limit).",
    "x-ratelimit-reset-tokens": "Time until the token budget refills, e.g. '1.5s'.",
}

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _error("Missing or unknown API key (when the cluster has api_keys)."),
}
GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request: the error names the field (param)."),
    **AUTH_ERRORS,
    404: _error("Unknown model."),
    413: _error("Request body over limits.max_body_bytes."),
    429: _error(
        "Replica queues full, or the API key's requests/tokens per minute used up.",
        RATE_LIMIT_HEADERS,
    ),
    500: _error("An internal error while serving this request (the message names the request)."),
    503: _error(
        "No replica can take the request now (e.g. while one is being replaced), or the server "
        "is shutting down (code server_shutting_down)."
    ),
}


def _generation_200(example_object: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": f"A {example_object} object, or with stream=true an SSE stream of "
            "chunks ending with 'data: [DONE]'.",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    }


COMPLETION_RESPONSES = {**_generation_200("text_completion"), **GENERATION_ERRORS}
CHAT_RESPONSES = {**_generation_200("chat.completion"), **GENERATION_ERRORS}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without the 422s it adds (we answer those 400), cached on the app."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    doc.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "API key."}
    }
    for route, path in doc.get("paths", {}).items():
        if route.startswith("/v1/"):
            for op in path.values():
                op["security"] = [{"bearer": []}]
    app.openapi_schema = doc
    return doc
