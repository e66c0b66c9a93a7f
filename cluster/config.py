"""ClusterConfig: the one YAML file describing a cluster (models, replicas, router, HTTP, keys).

Validated once with pydantic at the edge; everything downstream (deployments/app.py, the Serve
config renderer, the KubeRay renderer) takes the validated object or its
``model_dump(mode="json")`` dict. ``load_cluster_config(path)`` turns YAML and validation errors
into one ``ConfigError`` whose lines read
``FILE:LINE: FIELD: what is wrong (what is allowed)``.
"""

from __future__ import annotations

import hashlib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.cli import CLIError
from cluster.engine_options import EngineOptions
from cluster.yaml_source import compose_mapping, format_problems, locate
from deployments.response_cache.config import CacheConfig  # Ray-free pydantic schema
from engine.config import EngineConfig

DEMO_MODELS = ("demo", "demo-small")
# OpenAI model ids may carry an organisation ("org/name"); no spaces or shell-special characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(CLIError, ValueError):
    """A cluster file that can't be used. ``errors``: (line or None, field path, message)."""

    def __init__(self, path: str, errors: list[tuple[int | None, str, str]]):
        self.path = path
        self.errors = errors
        super().__init__(format_problems(path, errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    """Ray resources one replica asks for (all of its tensor-parallel shards together)."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (Ray logical CPUs).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (one per TP shard on GPU).")


class AutoscalingBounds(_Strict):
    """Replica-count bounds; the live policy parameters live in the autoscaling policy file."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 allows scale to zero).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at deploy time; null: min_replicas (at least 1)."
    )

    @model_validator(mode="after")
    def _order(self) -> AutoscalingBounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        init = self.initial_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({init}) must lie in [min_replicas, max_replicas] = "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class ModelConfig(_Strict):
    """One served model: its weights, engine options, replica count and placement."""

    name: str = Field(description="Model id clients send in the 'model' field, e.g. 'demo'.")
    model: str = Field(
        "demo",
        description="'demo', 'demo-small' (embedded, built locally) or a local HF model folder.",
    )
    engine: EngineOptions = Field(
        default_factory=EngineOptions,
        description="Engine options of this model's replicas (cluster/engine_options.py), e.g. "
        "{max_num_seqs: 32, num_kv_blocks: 512, dtype: float32}.",
    )
    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replica count; leave out when autoscaling is given."
    )
    autoscaling: AutoscalingBounds | None = Field(
        None, description="Replica bounds for queue-depth autoscaling instead of num_replicas."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Shards (workers) per replica.")
    engine_process: bool = Field(
        True,
        description="Run the engine loop (scheduler, model, detokenizer) in a process of its own "
        "beside each replica (one GIL each; its OpenMP threads wait passively); false runs it on "
        "a thread of the replica. On by default: served W1 on a quiet 2-core machine was 1.08x "
        "and 1.13x the thread's in two runs (BENCHMARKS.md, quiet-machine figures).",
    )
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for one replica's shards."
    )
    resources_per_replica: Resources = Field(
        default_factory=Resources, description="Ray resources per replica."
    )
    max_queued_requests: int = Field(
        64, ge=1, description="Requests one replica accepts beyond those running; then 429/503."
    )
    caches: CacheConfig = Field(
        default_factory=CacheConfig, description="Exact and semantic response caches."
    )
    tool_parser: Literal["hermes", "llama3_json"] | None = Field(
        None,
        description="Tool-call format the model emits: hermes (<tool_call>{...}</tool_call>: "
        "Hermes, Qwen2.5, the demo models) or llama3_json (Llama 3.1 JSON). Default: chosen from "
        "the model's chat template.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(
                "must start with a letter or digit and use only letters, digits, '.', '_', '-', "
                f"'/' (at most 128 characters), got {v!r}"
            )
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'demo', 'demo-small' or a local HF model folder")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> ModelConfig:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give either num_replicas or autoscaling, not both")
        if self.num_replicas is None and self.autoscaling is None:
            self.num_replicas = 1
        return self

    @model_validator(mode="after")
    def _tensor_parallel(self) -> ModelConfig:
        tp = self.tensor_parallel_size
        if tp == 1:
            return self
        gpus = self.resources_per_replica.num_gpus
        if gpus and gpus % tp:
            raise ValueError(
                f"resources_per_replica.num_gpus={gpus} must be a multiple of "
                f"tensor_parallel_size={tp} (one GPU per shard)"
            )
        from engine.tensor_parallel import check_model_layout  # heads/MLP split over the shards

        check_model_layout(self.model, tp)
        return self

    def engine_config(self) -> EngineConfig:
        """The EngineConfig one replica builds (model path as written; resolved on the replica)."""
        return self.engine.engine_config(self.model, self.tensor_parallel_size)

    def initial_replicas(self) -> int:
        if self.autoscaling is None:
            assert self.num_replicas is not None  # set by _replicas
            return self.num_replicas
        a = self.autoscaling
        return a.initial_replicas if a.initial_replicas is not None else max(1, a.min_replicas)


RouterPolicy = Literal["prefix_aware", "pow2", "round_robin", "session", "ray_prefix_affinity"]


class RouterConfig(_Strict):
    """How the ingress picks a replica for each request."""

    policy: RouterPolicy = Field(
        "prefix_aware",
        description="prefix_aware: longest cached prompt prefix unless overloaded; pow2: power of "
        "two choices on load; round_robin; session: sticky by the x-session-id header; "
        "ray_prefix_affinity: Ray Serve's PrefixCacheAffinityRouter (a text prefix tree of the "
        "prompts sent to each replica), for comparison.",
    )
    imbalance: int = Field(
        32,
        ge=0,
        description="prefix_aware: a replica whose load exceeds the least loaded one's by more "
        "than this many requests loses its affinity.",
    )
    ray_imbalanced_threshold: int | None = Field(
        None,
        ge=0,
        description="ray_prefix_affinity: Ray's imbalanced_threshold (queue-length gap beyond "
        "which it routes by power of two choices); null: Ray's default (no limit).",
    )
    stats_period_s: float = Field(
        1.0, gt=0, description="Seconds between replica routing-stats refreshes."
    )

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, v: Any) -> Any:
        # router.output_channels chose between two token paths; output channels are the only one.
        if isinstance(v, dict) and "output_channels" in v:
            if v["output_channels"] is not True:
                raise ValueError(
                    "output_channels: removed; tokens always travel through output channels "
                    "(delete the line)"
                )
            v = {k: x for k, x in v.items() if k != "output_channels"}
        return v


class HttpConfig(_Strict):
    """Where Serve's HTTP proxy listens."""

    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 listens on every interface.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    direct_ingress: bool = Field(
        False,
        description="Ray Serve's throughput-optimized mode (experimental in Ray 2.60): the ingress "
        "replica also answers HTTP itself, on the first free port from direct_ingress_port, "
        "without the proxy hop (the proxy keeps serving `port`). Set in the environment of the "
        "Ray head that `fleetlm up` starts; rendered KubeRay manifests serve through the proxy.",
    )
    direct_ingress_port: int = Field(
        30000, ge=1, le=65000, description="First port the direct ingress tries (then +1, ...)."
    )
    ingress_replicas: int = Field(
        1,
        ge=1,
        le=64,
        description="Replicas of the OpenAI ingress. With two or more, new requests keep being "
        "served while a dead one is replaced; the streams a dying ingress carried are cut by "
        "Serve's proxy either way (RELIABILITY.md).",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Grace period of `fleetlm down` (and of SIGTERM / Ctrl-C to a foreground "
        "`fleetlm up`): new requests get a 503 'server is shutting down' while the requests in "
        "flight finish; streams still running when it ends get an SSE error event. 0: no drain.",
    )


class ApiKey(_Strict):
    """One accepted API key, never stored in clear: its SHA-256 hex digest or an env variable."""

    sha256: str | None = Field(
        None, description="Lower-case hex SHA-256 of the key (`printf %s KEY | sha256sum`)."
    )
    env: str | None = Field(None, description="Name of an environment variable holding the key.")
    requests_per_minute: int | None = Field(
        None,
        ge=1,
        description="Requests per minute this key may send; null: no limit.",
    )
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="Prompt + completion tokens per minute this key may use; null: no limit.",
    )

    @model_validator(mode="after")
    def _one(self) -> ApiKey:
        if (self.sha256 is None) == (self.env is None):
            raise ValueError("give exactly one of sha256 or env")
        if self.sha256 is not None and not _SHA256_RE.match(self.sha256):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        if self.env is not None and not _ENV_RE.match(self.env):
            raise ValueError(f"env must be an environment variable name, got {self.env!r}")
        return self

    def digest(self) -> str:
        """The key's SHA-256 hex digest; ValueError if its env variable is unset or empty."""
        if self.sha256 is not None:
            return self.sha256
        assert self.env is not None  # _one
        key = os.environ.get(self.env, "")
        if not key:
            raise ValueError(f"api_keys: environment variable {self.env} is not set")
        return hash_api_key(key)


class LimitsConfig(_Strict):
    """Request limits checked at the HTTP edge before any tokenizing or queueing (each a 4xx
    OpenAI error object naming the field; see deployments/limits.py)."""

    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest request body in bytes; larger gets a 413."
    )
    prompt_chars_per_token: int = Field(
        32,
        ge=1,
        description="A prompt longer than max_model_len times this many characters can't fit the "
        "context window and is refused before it is tokenized (raise it for a tokenizer whose "
        "tokens can span more characters).",
    )
    max_n: int = Field(16, ge=1, le=16, description="Most choices (n) per request.")
    max_logprobs: int = Field(
        20, ge=0, le=20, description="Most top logprobs per token (logprobs / top_logprobs)."
    )
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request.")
    max_stop_string_chars: int = Field(256, ge=1, description="Longest stop string (characters).")
    max_stop_token_ids: int = Field(64, ge=0, description="Most stop_token_ids per request.")
    max_prompts: int = Field(
        64, ge=1, description="Most prompts in one /v1/completions request (a prompt list)."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask for; null: the context."
    )


class RayConfig(_Strict):
    """Which Ray cluster to use."""

    address: str | None = Field(
        None,
        description="Existing cluster to join ('auto', 'HOST:6379'); null: $RAY_ADDRESS or a "
        "new local head.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs a locally started head offers; null: Ray's default."
    )
    dashboard_host: str = Field(
        "127.0.0.1",
        description="Where the Ray dashboard of a locally started head listens (with `fleetlm up "
        "--dashboard`); 0.0.0.0 opens it to the network (it has no login: see SECURITY.md).",
    )


class ClusterConfig(_Strict):
    """A whole fleetlm cluster."""

    models: list[ModelConfig] = Field(min_length=1, description="Served models, at least one.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Request routing.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP listener.")
    api_keys: list[ApiKey] = Field(
        default_factory=list, description="Accepted API keys; empty: no key needed."
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster to run on.")
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="Request limits at the HTTP edge."
    )

    @model_validator(mode="after")
    def _unique(self) -> ClusterConfig:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"model names must be unique; {m.name!r} appears twice")
            seen.add(m.name)
        return self

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def api_key_digests(self) -> list[str]:
        return [k.digest() for k in self.api_keys]


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def default_config(model: str = "demo", name: str | None = None) -> ClusterConfig:
    """One model with defaults: what `fleetlm up` serves with no file (or `--model DIR`)."""
    if name is None:
        name = model if model in DEMO_MODELS else Path(model.rstrip("/")).name or "model"
    return ClusterConfig(models=[ModelConfig(name=name, model=model)])


def parse_cluster_config(text: str, path: str = "<string>") -> ClusterConfig:
    """Validate YAML text; errors name `path`, the line and the field."""
    data, root = compose_mapping(text, path, ConfigError, "a mapping with at least 'models'")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        errors = [_describe(err, root) for err in e.errors()]
        raise ConfigError(path, errors) from None


def load_cluster_config(path: str | os.PathLike[str]) -> ClusterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(path), [(None, "(file)", f"can't read: {e.strerror}")]) from None
    return parse_cluster_config(text, str(path))


def _describe(err: Any, root: yaml.Node | None) -> tuple[int | None, str, str]:
    loc = tuple(err["loc"])
    line, fld = locate(root, loc)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif ": " in msg and msg.split(": ", 1)[0].isidentifier():
        # A section's validator names the offending option first; point at that option's line.
        option, rest = msg.split(": ", 1)
        sub_line, sub_fld = locate(root, (*loc, option))
        if sub_fld.endswith(f".{option}"):
            line, fld, msg = sub_line, sub_fld, rest
    return line, fld or "(top level)", msg


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the pydantic model that `loc` points into, for 'unknown field' messages."""
    cls: Any = ClusterConfig
    for part in loc:
        cls = _unwrap(cls)
        if isinstance(part, int):
            continue
        if isinstance(cls, type) and issubclass(cls, BaseModel) and part in cls.model_fields:
            cls = cls.model_fields[part].annotation
    cls = _unwrap(cls)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    """list[X] → X, X | None → X."""
    while True:
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp
