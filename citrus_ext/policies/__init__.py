"""Eviction policies, one per file; :func:`make_policy` builds one by name."""
from __future__ import annotations

import dataclasses

from .base import Policy
from .citrus_individual import CitrusIndividual
from .citrus_shared import CitrusShared
from .cse import CSE
from .full import Full
from .h2o import H2O
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (CSE, CitrusShared, CitrusIndividual, Full, StreamingLLM, H2O, TOVA, SnapKV)
}


def make_policy(method: str, budget: int, **options) -> Policy:
    """The policy ``method`` with ``budget`` and its options; clear errors for unknown ones."""
    if method not in POLICIES:
        raise ValueError(f"citrus: unknown `method` {method!r}; choose one of {sorted(POLICIES)}")
    cls = POLICIES[method]
    known = {f.name for f in dataclasses.fields(cls)}
    for option in options:
        if option not in known:
            raise ValueError(f"citrus: unknown option `{option}` for method {method!r}; known: {sorted(known)}")
    return cls(budget=budget, **options)


__all__ = ["Policy", "POLICIES", "make_policy"] + [cls.__name__ for cls in POLICIES.values()]
