"""Bytes that cross cards: what one call of a component takes in and gives back.

Measured, not guessed: the component is called once on its recorded workload inputs (planner.inputs, on the
meta device for weightless twins, so full-size models cost seconds and no memory) with a spy on the method the
pipeline calls (`decode` for a VAE, `forward` otherwise); the spy sums the bytes of the tensors passed in, the
result's tensors are summed on the way out. Everything returned counts (e.g. a text encoder's pooled output next
to its hidden states), a bound on what the pipeline really uses.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from planner.inputs import call_builder
from planner.profile_data import Profile


def _bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def call_io_bytes(module: torch.nn.Module, role: str, workload) -> int:
    """Input + output bytes of one call of `module` as the pipeline makes it."""
    method = "decode" if role == "vae" else "forward"
    original, seen = getattr(module, method), []

    def spy(*args, **kwargs):
        seen.append(_bytes((args, kwargs)))
        return original(*args, **kwargs)

    shadowed = module.__dict__.get(method)
    object.__setattr__(module, method, spy)  # an instance attribute shadows the class's method for this call
    try:
        with torch.no_grad():
            out = call_builder(module, role, workload)()
    finally:
        if shadowed is None:
            del module.__dict__[method]
        else:
            object.__setattr__(module, method, shadowed)
    return seen[0] + _bytes(out)


def module_order(pipeline_class: str, names: list[str]) -> list[str]:
    """The components in the order a built pipeline lists them (its `__init__` signature, which is the order the
    diffusers pipelines register their modules in): what `_execution_device` means by "the first component".
    A profile from a model folder lists them in model_index.json order instead."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    params = list(inspect.signature(cls.__init__).parameters) if cls is not None else []
    return sorted(names, key=lambda n: params.index(n) if n in params else len(params) + names.index(n))


def io_bytes(profile: Profile, modules: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Per called component, the bytes one call moves in and out (components never called move nothing)."""
    return {name: call_io_bytes(modules[name], comp.role, profile.workload) if comp.calls_per_run else 0
            for name, comp in profile.components.items()}
