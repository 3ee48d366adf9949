"""Tensor-lifetime and FLOP tracing of one module call, on `meta` (no GPU, no weights) or on a real device.

`trace_call(module, fn)` runs `fn()` under a TorchDispatchMode that counts every new storage (keyed by storage
identity, released through a weakref finalizer), so the live-bytes curve above the weights is known, with its peak
and the block that was running then. FLOPs come from torch's own flop formulas.

Attention: on meta, `scaled_dot_product_attention` would take the math path and materialize B*H*L*S scores; the
flash / memory-efficient kernels a GPU (and torch's CPU flash kernel) use do not. While tracing, SDPA is replaced by
a stand-in that allocates only what those kernels allocate (the output and a B*H*L fp32 logsumexp) and counts the
same FLOPs (4*B*H*L*S*D).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry


@dataclass
class CallTrace:
    """What one traced call allocated above what existed before it (weights and inputs are not counted)."""

    peak_bytes: int = 0
    peak_module: str = ""
    flops: float = 0.0
    block_flops: dict[str, float] = field(default_factory=dict)
    output_bytes: int = 0


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class _LiveBytesMode(TorchDispatchMode):
    """Counts bytes of storages created inside the mode; a storage's bytes are released when it is freed."""

    def __init__(self, known: set[int], where: Callable[[], str]):
        super().__init__()
        self.known = known
        self.where = where
        self.live_bytes = 0
        self.trace = CallTrace()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._count_flops(func, out, args, kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.known:
            return
        self.known.add(key)
        n_bytes = storage.nbytes()
        self.live_bytes += n_bytes
        weakref.finalize(storage, self._release, key, n_bytes)
        if self.live_bytes > self.trace.peak_bytes:
            self.trace.peak_bytes = self.live_bytes
            self.trace.peak_module = self.where()

    def _release(self, key: int, n_bytes: int) -> None:
        self.known.discard(key)
        self.live_bytes -= n_bytes

    def _count_flops(self, func, out, args, kwargs) -> None:
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.add_flops(float(formula(*args, **kwargs, out_val=out)))

    def add_flops(self, flops: float) -> None:
        self.trace.flops += flops
        block = self.where()
        self.trace.block_flops[block] = self.trace.block_flops.get(block, 0.0) + flops


_ACTIVE: list[_LiveBytesMode] = []


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stand-in for SDPA with the memory of flash/mem-efficient kernels: output + fp32 logsumexp, no L*S scores."""
    out_shape = (*query.shape[:-1], value.shape[-1])
    out = query.new_empty(out_shape)
    query.new_empty(query.shape[:-1], dtype=torch.float32)  # logsumexp, freed at once as in the kernel
    batch_heads = query.numel() // (query.shape[-1] * query.shape[-2])
    flops = 4.0 * batch_heads * query.shape[-2] * key.shape[-2] * query.shape[-1]
    if _ACTIVE:
        _ACTIVE[-1].add_flops(flops)
    return out


@contextlib.contextmanager
def _flash_attention():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_like_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def block_names(module: torch.nn.Module) -> list[str]:
    """FQNs of the blocks group offloading would see: children of top-level ModuleList / Sequential."""
    names = []
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            names.extend(f"{name}.{i}" for i in range(len(child)))
    return names


@contextlib.contextmanager
def _block_tracker(module: torch.nn.Module):
    """Yields a function that names the block running now ('' outside any block)."""
    stack: list[str] = []
    handles = []
    for name in block_names(module):
        sub = module.get_submodule(name)
        handles.append(sub.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(sub.register_forward_hook(lambda m, a, o: stack.pop() and None))  # None: keep the output
    try:
        yield lambda: stack[-1] if stack else ""
    finally:
        for handle in handles:
            handle.remove()


def trace_call(module: torch.nn.Module, fn: Callable[[], object], replace_sdpa: bool = True) -> CallTrace:
    """Run `fn()` (a call of `module` whose inputs it builds itself) and return what it allocated above the weights."""
    known = {_storage_key(t) for t in [*module.parameters(), *module.buffers()]}
    sdpa = _flash_attention() if replace_sdpa else contextlib.nullcontext()
    with _block_tracker(module) as where, sdpa, torch.no_grad():
        mode = _LiveBytesMode(known, where)
        _ACTIVE.append(mode)
        try:
            with mode:
                out = fn()
        finally:
            _ACTIVE.pop()
    mode.trace.output_bytes = sum(
        t.untyped_storage().nbytes() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
    )
    return mode.trace
