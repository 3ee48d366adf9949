"""Bytes that cross cards: what one call of a component takes in and gives back.

Measured, not guessed: discovery records every call the pipeline makes on its real (meta) arguments, and the
profile keeps, per call, the bytes of the tensors passed in plus those of the result (`CallProfile.io_bytes`).
Everything returned counts (e.g. a text encoder's pooled output next to its hidden states), a bound on what the
pipeline really uses.
"""

from __future__ import annotations

from planner.profile_data import Profile


def module_order(pipeline_class: str, names: list[str]) -> list[str]:
    """The components in the order a built pipeline lists them (its `__init__` signature, which is the order the
    diffusers pipelines register their modules in): what `_execution_device` means by "the first component".
    A profile from a model folder lists them in model_index.json order instead."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    params = list(inspect.signature(cls.__init__).parameters) if cls is not None else []
    return sorted(names, key=lambda n: params.index(n) if n in params else len(params) + names.index(n))


def io_bytes(profile: Profile) -> dict[str, int]:
    """Per component, the bytes one call moves in and out, averaged over the calls one pipeline call makes
    (a component never called moves nothing)."""
    out = {}
    for name, comp in profile.components.items():
        plain = [c for c in comp.calls if not c.variant]
        n_calls = sum(c.calls_per_run for c in plain)
        out[name] = round(sum(c.io_bytes * c.calls_per_run for c in plain) / n_calls) if n_calls else 0
    return out
