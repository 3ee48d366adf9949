"""Tensor-lifetime and FLOP tracing of one module call, on `meta` (no GPU, no weights) or on a real device.

`trace_call(module, fn)` runs `fn()` under a TorchDispatchMode that counts every new storage (keyed by storage
identity, released through a weakref callback), so the live-bytes curve above the weights is known, with its peak
and the block that was running then. FLOPs come from torch's own flop formulas. On meta, ops that make fresh
tensors are memoized by their inputs' metadata (see `_memo_entry`), which makes repeated per-frame / per-tile work
cheap without changing the curve.

Attention: on meta, `scaled_dot_product_attention` would take the math path and materialize B*H*L*S scores; the
flash / memory-efficient kernels a GPU (and torch's CPU flash kernel) use do not. While tracing, SDPA is replaced by
a stand-in that allocates only what those kernels allocate (the output and a B*H*L fp32 logsumexp) and counts the
same FLOPs (4*B*H*L*S*D).

Per op, the trace also keeps what a roofline needs: each kernel launch's kind (matmul, attention, conv, other), the
dtype it computes in, its FLOPs and the bytes it reads and writes (`CallTrace.ops`). Views launch no kernel and
are not counted.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from planner.grouping import block_names


@dataclass
class CallTrace:
    """What one traced call allocated above what existed before it (weights and inputs are not counted)."""

    peak_bytes: int = 0
    peak_module: str = ""
    flops: float = 0.0
    block_flops: dict[str, float] = field(default_factory=dict)
    output_bytes: int = 0
    # (kind, dtype, flops, bytes_moved) of one kernel launch -> how many launches had exactly that
    ops: dict[tuple[str, str, float, int], int] = field(default_factory=dict)


aten = torch.ops.aten
_MATMUL = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten._scaled_mm, aten._int_mm}
_CONV = {aten.convolution, aten._convolution, aten.convolution_overrideable, aten.mkldnn_convolution}
_ATTENTION = {aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
              aten._scaled_dot_product_attention_math, aten._scaled_dot_product_flash_attention_for_cpu,
              aten._scaled_dot_product_cudnn_attention, aten._flash_attention_forward,
              aten._efficient_attention_forward}
# ops that allocate or reinterpret without a kernel touching the data
_NO_KERNEL = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided,
              aten._unsafe_view, aten.lift_fresh, aten._local_scalar_dense, aten.set_, aten.resize_}


def _op_kind(packet) -> str:
    if packet in _MATMUL:
        return "matmul"
    if packet in _CONV:
        return "conv"
    return "attention" if packet in _ATTENTION else "other"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _op_stat(func, args, kwargs, out, flops: float):
    """(kind, dtype, flops, bytes read + written) of one kernel launch, or None for ops that launch none."""
    if func.is_view or func.overloadpacket in _NO_KERNEL:
        return None
    inputs = _input_tensors([*args, *kwargs.values()])
    floats = [t for t in inputs if t.is_floating_point()] or [t for t in _tensors(out) if t.is_floating_point()]
    dtype = str(floats[0].dtype).removeprefix("torch.") if floats else "none"
    return _op_kind(func.overloadpacket), dtype, flops, _nbytes(inputs) + _nbytes(_tensors(out))


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of an op's result (a tensor, or a tuple/list holding tensors and non-tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


# ---------------------------------------------------------------- meta shape memo
# On meta an op's result depends only on its inputs' metadata, yet many meta kernels are Python decompositions
# (torch._refs / _prims) costing ~0.1-1 ms a call; a VAE decoded per frame and per tile repeats the same few
# hundred signatures thousands of times. So the first call of each (op, input metadata, other args) runs the
# kernel and records its fresh outputs (shape, stride, dtype) and FLOPs; later calls make empty meta tensors
# of that layout. An op whose output shares storage with an input (views, in-place, out=) or that returns
# anything else is never memoized: it always runs, so aliasing and storage lifetimes stay exact.

class _NotMeta(Exception):
    pass


_TENSOR = object()  # marks a tensor's metadata inside a signature
_UNMEMOIZABLE = object()
_META_MEMO: dict = {}
_MEMO_LIMIT = 200_000  # entries (a few hundred bytes each); a long-lived process starts over past it


_SCALARS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format})


def _sig(x):
    if isinstance(x, torch.Tensor):
        if not x.is_meta:
            raise _NotMeta
        return (_TENSOR, x.dtype, x.shape, x.stride(), x.storage_offset())
    if isinstance(x, (tuple, list)):
        types = tuple(map(type, x))
        if _SCALARS.issuperset(types):  # sizes, paddings: keyed flat, with each element's type
            return (type(x), types, tuple(x))
        return (type(x), *map(_sig, x))
    return (type(x), x)  # type too: add(t, 1) and add(t, 1.0) differ in dtype


def _signature(func, args, kwargs):
    """A hashable key of the call, or None when an input is on a real device or an argument is unhashable."""
    try:
        # the default dtype: factory ops called without a dtype get theirs from it
        key = [func, torch.get_default_dtype()]
        for a in args:  # tensors inline: this runs once per op
            if isinstance(a, torch.Tensor):
                if not a.is_meta:
                    return None
                key.append((_TENSOR, a.dtype, a.shape, a.stride(), a.storage_offset()))
            else:
                key.append(_sig(a))
        if kwargs:
            key.append(_sig(tuple(kwargs.items())))
        key = tuple(key)
        hash(key)
        return key
    except (_NotMeta, TypeError):
        return None


def _fresh_storage_bytes(t: torch.Tensor) -> int:
    """The storage `torch.empty_strided(t.shape, t.stride())` would get."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _memo_entry(out, args, kwargs, flops: float, stat):
    """(container, [(shape, stride, dtype)], flops, op stat) if `out` is fresh meta tensors only, else
    _UNMEMOIZABLE."""
    if not isinstance(out, (torch.Tensor, tuple, list)):
        return _UNMEMOIZABLE  # a Python scalar (a value read)
    outs = _tensors(out)
    if not isinstance(out, torch.Tensor) and len(outs) != len(out):
        return _UNMEMOIZABLE  # None / ints among the outputs
    inputs = {_storage_key(t) for t in _input_tensors([*args, *kwargs.values()])}
    keys = [_storage_key(t) for t in outs]
    if len(set(keys)) != len(keys) or inputs.intersection(keys):
        return _UNMEMOIZABLE
    for t in outs:
        if not t.is_meta or t.storage_offset() or t.untyped_storage().nbytes() != _fresh_storage_bytes(t):
            return _UNMEMOIZABLE
    kind = "tensor" if isinstance(out, torch.Tensor) else type(out)
    return kind, [(t.shape, t.stride(), t.dtype) for t in outs], flops, stat


def _input_tensors(args) -> list[torch.Tensor]:
    """The tensors among the arguments, including those inside list arguments (cat, stack, index)."""
    found = []
    for a in args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (tuple, list)):
            found.extend(_input_tensors(a))
    return found


def _from_memo(entry):
    kind, layouts, _, _ = entry
    outs = [torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in layouts]
    return outs[0] if kind == "tensor" else kind(outs)


class _LiveBytesMode(TorchDispatchMode):
    """Counts bytes of storages created inside the mode; a storage's bytes are released when it is freed."""

    def __init__(self, known: set[int], where: Callable[[], str]):
        # `known`: storages that exist before the call (weights, inputs): never counted as allocated by it
        super().__init__()
        self.known = known
        self.where = where
        self.live_bytes = 0
        self.trace = CallTrace()
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = _signature(func, args, kwargs)
        entry = _META_MEMO.get(key) if key is not None else None
        if entry is None or entry is _UNMEMOIZABLE:
            out = self.run(func, args, kwargs)
            flops = self._flops(func, out, args, kwargs)
            stat = _op_stat(func, args, kwargs, out, flops)
            if key is not None and entry is None:
                if len(_META_MEMO) >= _MEMO_LIMIT:
                    _META_MEMO.clear()
                _META_MEMO[key] = _memo_entry(out, args, kwargs, flops, stat)
        else:
            out, flops, stat = _from_memo(entry), entry[2], entry[3]
        if flops:
            self.add_flops(flops)
        if stat is not None:
            self.add_op(stat)
        for tensor in _tensors(out):
            self._track(tensor, args, kwargs)
        return out

    def run(self, func, args, kwargs):
        """The op itself (a subclass may answer ops that cannot run on meta)."""
        return func(*args, **kwargs)

    def add_op(self, stat) -> None:
        self.trace.ops[stat] = self.trace.ops.get(stat, 0) + 1

    def _track(self, tensor: torch.Tensor, args=(), kwargs=None) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.known:
            return
        self.known.add(key)
        if key in {_storage_key(t) for t in _input_tensors([*args, *(kwargs or {}).values()])}:
            # a view of a tensor that existed before the call (one not registered as known): not allocated here
            self._refs[key] = weakref.ref(storage, lambda ref, k=key: self._release(ref, k, 0))
            return
        n_bytes = storage.nbytes()
        self.live_bytes += n_bytes
        # a plain weakref (kept alive here) is ~10x cheaper than weakref.finalize; its callback is the release
        self._refs[key] = weakref.ref(storage, lambda ref, k=key, n=n_bytes: self._release(ref, k, n))
        if self.live_bytes > self.trace.peak_bytes:
            self.trace.peak_bytes = self.live_bytes
            self.trace.peak_module = self.where()

    def _release(self, ref: weakref.ref, key: int, n_bytes: int) -> None:
        if self._refs.get(key) is ref:  # not a newer storage at the same address
            del self._refs[key]
            self.known.discard(key)
        self.live_bytes -= n_bytes

    @staticmethod
    def _flops(func, out, args, kwargs) -> float:
        formula = flop_registry.get(func._overloadpacket)
        return float(formula(*args, **kwargs, out_val=out)) if formula is not None else 0.0

    def add_op(self, op: tuple[str, str, float, int]) -> None:
        self.trace.ops[op] = self.trace.ops.get(op, 0) + 1

    def add_flops(self, flops: float) -> None:
        self.trace.flops += flops
        block = self.where()
        self.trace.block_flops[block] = self.trace.block_flops.get(block, 0.0) + flops


_ACTIVE: list[_LiveBytesMode] = []


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stand-in for SDPA with the memory of flash/mem-efficient kernels: output + fp32 logsumexp, no L*S scores."""
    out_shape = (*query.shape[:-1], value.shape[-1])
    batch_heads = query.numel() // (query.shape[-1] * query.shape[-2])
    flops = 4.0 * batch_heads * query.shape[-2] * key.shape[-2] * query.shape[-1]
    out = query.new_empty(out_shape)
    query.new_empty(query.shape[:-1], dtype=torch.float32)  # logsumexp, freed at once as in the kernel
    if _ACTIVE:
        _ACTIVE[-1].add_flops(flops)
        dtype = str(query.dtype).removeprefix("torch.")
        _ACTIVE[-1].add_op(("attention", dtype, flops, _nbytes([query, key, value, out])))
    return out


@contextlib.contextmanager
def _flash_attention():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_like_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


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
    return traced_call(module, fn, replace_sdpa=replace_sdpa)[0]


def traced_call(module: torch.nn.Module, fn: Callable[[], object], inputs=(), replace_sdpa: bool = True,
                mode_class: type = None) -> tuple[CallTrace, object]:
    """`fn()` traced, and its result. The weights' and `inputs`' storages exist before the call and are not
    counted; every storage the call creates is, while it lives (the result's too, as it is live at the end)."""
    given = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
    known = {_storage_key(t) for t in [*module.parameters(), *module.buffers(), *given]}
    sdpa = _flash_attention() if replace_sdpa else contextlib.nullcontext()
    with _block_tracker(module) as where, sdpa, torch.no_grad():
        mode = (mode_class or _LiveBytesMode)(known, where)
        _ACTIVE.append(mode)
        try:
            with mode:
                out = fn()
        finally:
            _ACTIVE.pop()
    mode.trace.output_bytes = sum(
        t.untyped_storage().nbytes() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
    )
    return mode.trace, out


@dataclass
class DeviceMeasurement:
    """One real call on the component's own device: seconds per call and per block, and, on CUDA, the
    allocator's peak above what was allocated before the call (max_memory_allocated delta)."""

    call_s: float
    block_s: dict[str, float]
    allocator_peak_bytes: int | None  # None off CUDA (the CPU has no allocator counters)
    device_name: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _block_timer(module: torch.nn.Module, device: torch.device):
    """Yields a dict filled with each block's seconds (synchronising around every block: run it apart from the
    call timing, which it would slow down)."""
    times: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []

    def pre(name):
        def hook(m, a):
            _sync(device)
            starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(m, a, o):
            _sync(device)
            times[name] = times.get(name, 0.0) + time.perf_counter() - starts[name]
        return hook

    for name in block_names(module):
        sub = module.get_submodule(name)
        handles += [sub.register_forward_pre_hook(pre(name)), sub.register_forward_hook(post(name))]
    try:
        yield times
    finally:
        for handle in handles:
            handle.remove()


def measure_call(module: torch.nn.Module, fn: Callable[[], object]) -> DeviceMeasurement:
    """Run `fn()` for real on the module's device: one warm-up call, one timed call, one call per-block timed."""
    device = next(module.parameters()).device
    with torch.no_grad():
        fn()  # warm-up: kernel selection, lazy allocations
        peak = None
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        call_s = _timed(fn, device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before
        with _block_timer(module, device) as block_s:
            fn()
    return DeviceMeasurement(call_s, dict(block_s), peak, device_name(device))
