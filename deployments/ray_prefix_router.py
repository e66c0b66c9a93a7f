"""Ray Serve's own PrefixCacheAffinityRouter (Ray 2.60), on fleetlm's replicas: the routing peer.

``router.policy: ray_prefix_affinity`` deploys this class. Its algorithm is Ray's, unchanged, with
Ray's defaults (``imbalanced_threshold`` inf unless ``router.ray_imbalanced_threshold`` is set):
a character prefix tree of the prompts sent to each replica, kept in a detached Ray actor, the
longest match wins while replica queue lengths stay within the threshold, the replica with the
fewest characters in the tree takes a prompt matching under 10%, and Ray's power of two choices
otherwise. Ray's class imports without Ray's LLM extras.

Only the glue is ours:
- Ray reads the prompt from a ``prompt`` or ``messages`` attribute of the call's argument. A
  fleetlm replica call is a dict holding the prompt's token ids (``prompt_token_ids``); it is given
  to Ray as text with one character per token (routing_text), so a prefix of the text is exactly a
  prefix of the tokens. Calls with a ``prompt``/``messages`` attribute go through Ray's own reader.
- An output-channel call (``{"target_replica": id}``) is not a request: it goes to the replica it
  names, is not inserted into the tree and does not reach Ray's reader (which would raise on it).
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

# The CJK block: 20,992 printable code points with no surrogates; ids beyond wrap into the planes
# above the BMP's surrogates (any vocabulary up to about 1.1M ids maps one to one).
_BASE = 0x4E00
_SURROGATES = range(0xD800, 0xE000)


def routing_text(token_ids: list[int]) -> str:
    """Token ids -> text with one character per token, distinct ids to distinct characters."""
    out = []
    for t in token_ids:
        c = _BASE + t
        if c >= _SURROGATES.start:
            c += len(_SURROGATES)
        out.append(chr(c))
    return "".join(out)


def _first_arg(pending_request: PendingRequest | None) -> Any:
    if pending_request is None or not pending_request.args:
        return None
    return pending_request.args[0]


def _channel_target(pending_request: PendingRequest | None) -> str | None:
    obj = _first_arg(pending_request)
    if isinstance(obj, dict) and isinstance(obj.get("target_replica"), str):
        return obj["target_replica"]
    return None


class RayPrefixAffinityRouter(PrefixCacheAffinityRouter):
    """Ray's PrefixCacheAffinityRouter with fleetlm's call format (module docstring)."""

    def _extract_text_from_request(self, pending_request: PendingRequest) -> str:
        obj = _first_arg(pending_request)
        if isinstance(obj, dict) and isinstance(obj.get("prompt_token_ids"), list):
            return routing_text(obj["prompt_token_ids"])
        return super()._extract_text_from_request(pending_request)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = _channel_target(pending_request)
        if target is not None:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            return [[by_id[target]]] if target in by_id else [candidate_replicas]
        return await super().choose_replicas(candidate_replicas, pending_request)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        if _channel_target(pending_request) is None:
            super().on_request_routed(pending_request, replica_id, result)
