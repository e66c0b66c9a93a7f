"""The one block-hash function shared by the engine's prefix cache and the router.

A block's hash chains its parent's: ``h_i = hash((h_{i-1}, tuple(tokens_i), extra))``. Only *full*
blocks are hashed. Python's hash of a tuple of ints is deterministic across processes
(PYTHONHASHSEED only salts str/bytes), so the ingress process and every replica compute identical
values. ``extra`` must therefore hold ints only; strings (e.g. an adapter name) go through
:func:`stable_int` first. Collisions are possible (64-bit), so the block pool also compares stored
tokens on a hit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

NONE_HASH = 0  # parent hash of a request's first block


def stable_int(text: str) -> int:
    """A process-independent 63-bit int for a string, for use inside ``extra`` keys."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def hash_block(parent_hash: int, token_ids: Sequence[int], extra: tuple[int, ...] = ()) -> int:
    return hash((parent_hash, tuple(token_ids), extra))


def block_hashes(
    token_ids: Sequence[int], block_size: int, extra: tuple[int, ...] = ()
) -> list[int]:
    """Chained hashes of every full block of ``token_ids`` (a trailing partial block is skipped)."""
    out: list[int] = []
    parent = NONE_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra)
        out.append(parent)
    return out
