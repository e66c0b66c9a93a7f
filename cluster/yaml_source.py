"""YAML files whose errors point at a line: parse text keeping the node tree, and map a validation
error's location (pydantic's ``loc``) back to the file's line and dotted field path.

Ray-free and import-light: the cluster file (cluster/config.py) and the autoscaling policy file
(autoscaling/policy_file.py) both use it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

Problem = tuple[int | None, str, str]  # (1-based line or None, field path, message)


def format_problems(path: str, problems: list[Problem]) -> str:
    """``path:line: field: message``, one per line (``path: field: message`` with no line)."""
    return "\n".join(
        f"{path}:{line}: {fld}: {msg}" if line else f"{path}: {fld}: {msg}"
        for line, fld, msg in problems
    )


def compose_mapping(
    text: str, path: str, error: type[Exception], expected: str
) -> tuple[dict[str, Any], yaml.Node | None]:
    """Parse YAML text that must hold a mapping (empty text: ``{}``). Returns (data, node tree).

    ``error(path, problems)`` is raised for invalid YAML (with the line of the problem) and for a
    top level that isn't a mapping (``expected`` says what it should be)."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise error(path, [(line, "(yaml)", f"invalid YAML: {problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(path, [(1, "(top level)", f"must be {expected}")])
    return data, root


def locate(root: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[int | None, str]:
    """Walk an error location through the YAML node tree: (1-based line, dotted field path).

    The line is that of the deepest node reached (a mapping entry's key line). Parts of ``loc``
    that aren't YAML keys are pydantic's union-member tags (e.g. 'function-after[...]') and are
    skipped, except an identifier-like part naming an absent (missing) field, which ends the path.
    """
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    path = ""
    for part in loc:
        if isinstance(part, int):
            if not isinstance(node, yaml.SequenceNode) or part >= len(node.value):
                path += f"[{part}]"
                break
            node = node.value[part]
            line = node.start_mark.line + 1
            path += f"[{part}]"
            continue
        entry = None
        if isinstance(node, yaml.MappingNode):
            entry = next((kv for kv in node.value if getattr(kv[0], "value", None) == part), None)
        if entry is None:
            if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(part)):
                path += f".{part}" if path else str(part)
                break
            continue  # a union tag, not a key
        key, node = entry
        line = key.start_mark.line + 1
        path += f".{part}" if path else str(part)
    return line, path
