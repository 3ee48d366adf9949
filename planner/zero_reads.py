"""Run a pipeline's own code on `meta` tensors: every value read from a meta tensor is taken as zero.

A weightless twin computes shapes, never values; the pipeline code around it (scheduler, glue) sometimes reads a
value (`.item()` in an attention-mask check, `nonzero` in a scheduler's timestep lookup, `sigmas.to("cpu")`,
`torch.equal`, a bool mask as an index). `ZeroReads` is a TorchDispatchMode that lets those ops fail on meta
first and only then answers them as if every meta value were zero, with one exception, the safe bound: where a
value would pick a *size* (a bool mask as an index, `nonzero`, `masked_select`), every element counts as
selected, so a data-dependent size is never smaller than the real one. Python-level reads that never reach the
dispatcher (`Tensor.numpy`, `torch.autocast("meta")`) are patched for the duration and restored on exit.

Real integer and bool tensors the glue moves to meta (token ids, attention masks from a real tokenizer) stay real
on the CPU, so lengths the glue reads from them (`mask.sum(1).tolist()`) are the real ones; a component receives
them on meta like every input.

What this assumes: control flow that depends on values takes the zero branch (MoE routing sends every token to
one expert, a glyph encoder runs only for quoted text); the traced calls are then those of that branch.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)

aten = torch.ops.aten


def _has_meta(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_flatten((args, kwargs))[0])


def _zero_scalar(tensor: torch.Tensor):
    if tensor.dtype == torch.bool:
        return False
    return 0.0 if tensor.is_floating_point() or tensor.is_complex() else 0


def _copy_out(tensor: torch.Tensor, dtype=None, device=None, **_):
    """A meta tensor copied to a real device: zeros of its shape there."""
    return torch.zeros(tensor.shape, dtype=dtype or tensor.dtype, device=device or "cpu")


def _select_all(mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The long indices of a bool mask with every element selected (the safe bound on the selected size)."""
    n = mask.numel()
    return tuple(torch.empty(n, dtype=torch.long, device="meta") for _ in range(mask.dim()))


def _index(tensor, indices):
    expanded: list = []
    for index in indices:
        if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
            expanded.extend(_select_all(index))
        else:
            expanded.append(index)
    return aten.index.Tensor(tensor, expanded)


def _unique(tensor, sorted=True, return_inverse=False, return_counts=False, dim=None):
    """All values are zero: one unique value, every element maps to it."""
    one = torch.empty(1, dtype=tensor.dtype, device="meta")
    return (one, torch.empty(tensor.shape, dtype=torch.long, device="meta"), torch.empty(1, dtype=torch.long,
                                                                                          device="meta"))


_ANSWERS: dict[object, Callable] = {
    aten._local_scalar_dense.default: lambda t: _zero_scalar(t),
    aten._to_copy.default: _copy_out,
    aten.equal.default: lambda a, b: tuple(a.shape) == tuple(b.shape),
    aten.nonzero.default: lambda t: torch.empty((t.numel(), t.dim()), dtype=torch.long, device="meta"),
    aten.bincount.default: lambda t, weights=None, minlength=0: torch.empty(
        max(1, minlength), dtype=torch.long if weights is None else weights.dtype, device="meta"),
    aten.masked_select.default: lambda t, mask: torch.empty(
        torch.broadcast_shapes(t.shape, mask.shape).numel(), dtype=t.dtype, device="meta"),
    aten.index.Tensor: _index,
    aten._unique2.default: _unique,
    aten.index_put_.default: lambda t, *a, **k: t,  # x[mask] = v: no data to write
}


ANSWERED: dict[str, int] = {}  # op name -> reads answered as zero since the last `zero_reads()` began


def run_reading_zeros(func, args, kwargs):
    """`func(*args, **kwargs)`; if it fails on meta for want of values, the answer it would give on zeros."""
    try:
        return func(*args, **kwargs)
    except (NotImplementedError, RuntimeError):
        answer = _ANSWERS.get(func)
        if answer is None or not _has_meta(args, kwargs):
            raise
    name = str(func.overloadpacket.__name__)
    ANSWERED[name] = ANSWERED.get(name, 0) + 1
    return answer(*args, **kwargs)


def _keeps_values(func, args, kwargs) -> bool:
    """A real integer/bool tensor (token ids, an attention mask) the glue moves to meta stays real: the glue reads
    lengths from masks (`mask.sum(1).tolist()`), and a component's inputs go to meta when it is called."""
    if func is not aten._to_copy.default or kwargs.get("device") is None:
        return False
    tensor = args[0]
    return (torch.device(kwargs["device"]).type == "meta" and not tensor.is_meta
            and not tensor.is_floating_point() and kwargs.get("dtype") in (None, tensor.dtype))


class ZeroReads(TorchDispatchMode):
    """Answers the data-dependent ops that fail on meta as if every meta value were zero (see the module doc)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _keeps_values(func, args, kwargs):
            return args[0]
        return run_reading_zeros(func, args, kwargs)


def _numpy(original):
    def numpy(self, *args, **kwargs):
        if self.is_meta:
            dtype = torch.float32 if self.dtype == torch.bfloat16 else self.dtype
            return np.zeros(tuple(self.shape), dtype=torch.empty((), dtype=dtype).numpy().dtype)
        return original(self, *args, **kwargs)
    return numpy


def _autocast_init(original):
    def __init__(self, device_type, *args, **kwargs):
        if device_type == "meta":  # no autocast on meta: the call runs in the dtypes it was given
            device_type, kwargs["enabled"] = "cpu", False
        original(self, device_type, *args, **kwargs)
    return __init__


@contextlib.contextmanager
def patched(owner, name: str, make: Callable):
    """`owner.name` replaced by `make(original)` inside the block, restored on exit (errors included)."""
    own = name in owner.__dict__  # else inherited (torch.Tensor.numpy lives on the C base class)
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def zero_reads():
    """Yields the `ZeroReads` mode, active with the Python-level patches until the block exits; `ANSWERED` then
    counts the reads it answered."""
    ANSWERED.clear()
    mode = ZeroReads()
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(torch.Tensor, "numpy", _numpy))
        stack.enter_context(patched(torch.autocast, "__init__", _autocast_init))
        stack.enter_context(mode)
        yield mode
