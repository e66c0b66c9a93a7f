"""The autoscaling policy file: decide() parameters per model, validated at the edge with pydantic.

```yaml
default:                  # optional; applies to every model without its own entry
  target_queue_depth: 4
models:                   # optional; keys are model names as in the cluster file
  demo-small:
    max_replicas: 4
    scale_down_window_s: 60
    ttft_slo_s: 1.0
```
A model's parameters are its own entry over `default` over the built-in defaults (decide.Params).
Errors read ``FILE:LINE: FIELD: what is wrong (what is allowed)``.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoscaling.decide import Params
from cluster.yaml_source import compose_mapping, format_problems, locate

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


class PolicyError(ValueError):
    """A policy file that can't be used. ``errors``: (line or None, field path, message)."""

    def __init__(self, path: str, errors: list[tuple[int | None, str, str]]):
        self.path = path
        self.errors = errors
        super().__init__(format_problems(path, errors))


class ParamsSpec(BaseModel):
    """decide() parameters; a field left out inherits from `default`, then from the built-ins."""

    model_config = ConfigDict(extra="forbid")

    target_queue_depth: float | None = Field(
        None, gt=0, description="Waiting + running requests per replica to aim for (> 0)."
    )
    min_replicas: int | None = Field(
        None, ge=1, description="Fewest replicas while the model has traffic (>= 1)."
    )
    max_replicas: int | None = Field(None, ge=1, description="Most replicas (>= min_replicas).")
    scale_up_window_s: float | None = Field(
        None, ge=0, description="Load must want more replicas this long before adding (s)."
    )
    scale_down_window_s: float | None = Field(
        None, ge=0, description="Load must want fewer replicas this long before removing (s)."
    )
    scale_up_cooldown_s: float | None = Field(
        None, ge=0, description="No scale-up this soon after the last scale-up (s)."
    )
    scale_down_cooldown_s: float | None = Field(
        None, ge=0, description="No scale-down this soon after any scaling action (s)."
    )
    max_step_up: int | None = Field(None, ge=1, description="Most replicas added per decision.")
    max_step_down: int | None = Field(None, ge=1, description="Most replicas removed per decision.")
    ttft_slo_s: float | None = Field(
        None, gt=0, description="Recent TTFT above this adds a replica (s); null: no SLO."
    )
    scale_to_zero_after_s: float | None = Field(
        None, ge=0, description="Idle this long -> 0 replicas (s); null: never."
    )

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class PolicySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: ParamsSpec = Field(default_factory=ParamsSpec, description="Every model's base.")
    models: dict[str, ParamsSpec] = Field(default_factory=dict, description="Per model name.")


class Policy:
    """A validated policy: the parameters given explicitly, and the Params each model runs with."""

    def __init__(self, default: dict[str, Any], models: dict[str, dict[str, Any]]):
        self.default = default
        self.models = models

    def params_for(self, model: str | None) -> Params:
        given = {**self.default, **self.models.get(model or "", {})}
        return Params(**given)

    def to_dict(self) -> dict[str, Any]:
        """The explicit values only (what the file said); the store keeps this form."""
        return {
            "default": dict(self.default),
            "models": {k: dict(v) for k, v in self.models.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<policy>") -> Policy:
        return _validate(d, None, source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def effective(self) -> dict[str, dict[str, Any]]:
        """Every model's full parameter set, and `default`'s, for display."""
        out = {"default": asdict(self.params_for(None))}
        for m in self.models:
            out[m] = asdict(self.params_for(m))
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()


def parse_policy(text: str, path: str = "<string>") -> Policy:
    """Validate YAML text; errors name `path`, the line and the field, and say what is allowed."""
    data, root = compose_mapping(text, path, PolicyError, "a mapping with 'default'/'models'")
    return _validate(data, root, path)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PolicyError(str(path), [(None, "(file)", f"can't read: {e.strerror}")]) from None
    return parse_policy(text, str(path))


def _validate(data: dict[str, Any], root: yaml.Node | None, path: str) -> Policy:
    try:
        spec = PolicySpec.model_validate(data)
    except ValidationError as e:
        errs = [_describe(err, root) for err in e.errors()]
        raise PolicyError(path, sorted(errs, key=lambda e: e[0] or 0)) from None
    errors = []
    for name in spec.models:
        if not _NAME_RE.match(name):
            line, fld = locate(root, ("models", name))
            errors.append((line, fld, f"model name must match {_NAME_RE.pattern}, got {name!r}"))
    policy = Policy(spec.default.given(), {k: v.given() for k, v in spec.models.items()})
    # Cross-field rules (min <= max, ...) hold for each model's merged parameters.
    for scope, own, given in [(("default",), policy.default, policy.default)] + [
        (("models", m), g, {**policy.default, **g}) for m, g in policy.models.items()
    ]:
        try:
            Params(**given)
        except ValueError as e:
            msg = str(e)
            named = sorted((msg.find(f.name), f.name) for f in fields(Params) if f.name in msg)
            names = [n for _, n in named]
            # Point at a named field written in this scope, else at the scope's own key.
            fld = next((n for n in names if n in own), names[0] if names else None)
            line, where = locate(root, scope + ((fld,) if fld else ()))
            errors.append((line, where, msg))
    if errors:
        raise PolicyError(path, sorted(errors, key=lambda e: e[0] or 0))
    return policy


def _describe(err: Any, root: yaml.Node | None) -> tuple[int | None, str, str]:
    loc = tuple(err["loc"])
    line, fld = locate(root, loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        allowed = list(ParamsSpec.model_fields) if len(loc) > 1 else list(PolicySpec.model_fields)
        msg = f"unknown field; allowed: {', '.join(allowed)}"
    elif loc and loc[-1] in ParamsSpec.model_fields:
        desc = ParamsSpec.model_fields[str(loc[-1])].description
        msg = f"{msg} ({desc})"
    return line, fld or "(top level)", msg
