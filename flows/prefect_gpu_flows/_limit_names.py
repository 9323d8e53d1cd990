# Generated from operator/prefect_gpu_operator/api/limit_names.py by `make generate`: do not edit.

"""The limit-name grammar shared by the operator and the flows: ``{node}`` in a template.

A policy's ``limitNameTemplate`` names each node's global concurrency limit; ``gpu_slot()`` names
the same limit from ``WORKER_ID`` with the same template. Prefect rejects ``/ % & > <`` in names.
This file is the one definition: the flows package ships a generated copy (``make generate``),
and a unit test fails when the two differ. Standard library only.
"""

from __future__ import annotations

import re

__all__ = [
    "DEFAULT_LIMIT_NAME_TEMPLATE",
    "FORBIDDEN_NAME_CHARACTERS",
    "NODE_PLACEHOLDER",
    "LimitNameError",
    "is_valid_limit_name",
    "limit_name",
    "template_of",
    "template_problems",
]

NODE_PLACEHOLDER = "{node}"
DEFAULT_LIMIT_NAME_TEMPLATE = "gpu:{node}"
# Prefect's name rule (prefect.types.names): client and server reject these characters.
FORBIDDEN_NAME_CHARACTERS = "/%&><"

_NAME_RULE = re.compile(rf"^[^{re.escape(FORBIDDEN_NAME_CHARACTERS)}]+$")


class LimitNameError(ValueError):
    """A template or limit name that Prefect would reject."""


def template_problems(template: str) -> list[str]:
    """What is wrong with ``template``, in words; empty when it is valid."""
    problems = []
    if NODE_PLACEHOLDER not in template:
        problems.append(f"it must contain {NODE_PLACEHOLDER}")
    if bad := sorted(set(template) & set(FORBIDDEN_NAME_CHARACTERS)):
        problems.append(f"it must not contain {' '.join(bad)}")
    return problems


def is_valid_limit_name(name: str) -> bool:
    """Prefect's name rule ``^[^/%&><]+$``."""
    return bool(_NAME_RULE.match(name))


def limit_name(template: str, node: str) -> str:
    """The limit name for ``node``: every ``{node}`` replaced (other braces stay literal)."""
    name = template.replace(NODE_PLACEHOLDER, node)
    if problems := template_problems(template):
        raise LimitNameError(f"limit name template {template!r} is invalid: {'; '.join(problems)}")
    if not is_valid_limit_name(name):
        raise LimitNameError(
            f"limit name {name!r} from template {template!r} is invalid: Prefect rejects "
            f"empty names and / % & > <"
        )
    return name


def template_of(name: str, node: str) -> str | None:
    """A template that makes ``name`` for ``node`` (each occurrence of the node replaced by
    ``{node}``), or None when there is none: how a status ledger tells which names it may leave
    out."""
    if node not in name:
        return None
    template = name.replace(node, NODE_PLACEHOLDER)
    try:
        return template if limit_name(template, node) == name else None
    except LimitNameError:
        return None
