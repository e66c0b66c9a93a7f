"""``response_format`` -> the engine's grammar spec (``SamplingParams.structured``), checked here.

``{"type": "text"}`` (or none): unconstrained. ``{"type": "json_object"}``: any JSON object.
``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: JSON valid against the
schema (``strict`` or not: the grammar always enforces the schema). A schema llguidance can't
compile is a 400 naming ``response_format`` before anything is queued; the check is cached per
distinct spec (a service sends the same few schemas again and again).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from deployments.protocol import bad_request
from engine.structured import GrammarError, spec_key, validate_spec

_checked: OrderedDict[str, str] = OrderedDict()  # spec key -> "" (compiles) or the error
_CHECKED_MAX = 1024


def check_grammar(spec: dict[str, Any], param: str) -> None:
    """Compile ``spec`` once (cached); a failure is a 400 naming ``param``."""
    key = spec_key(spec)
    err = _checked.get(key)
    if err is None:
        try:
            validate_spec(spec)
            err = ""
        except GrammarError as e:
            err = str(e)
        _checked[key] = err
        if len(_checked) > _CHECKED_MAX:
            _checked.popitem(last=False)
    else:
        _checked.move_to_end(key)
    if err:
        raise bad_request(f"{param}: {err}", param)


def structured_spec(response_format: Any) -> dict[str, Any] | None:
    """The grammar spec of a request's ``response_format`` (a pydantic model or None)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        spec: dict[str, Any] = {"type": "json", "schema": {"type": "object"}}
    elif response_format.type == "json_schema":
        js = getattr(response_format, "json_schema", None)
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise bad_request(
                "response_format of type json_schema needs json_schema.schema (a JSON object)",
                "response_format",
            )
        spec = {"type": "json", "schema": js["schema"]}
    else:
        raise bad_request(
            "response_format.type must be 'text', 'json_object' or 'json_schema', "
            f"got {response_format.type!r}",
            "response_format",
        )
    check_grammar(spec, "response_format")
    return spec
