"""Discovery: which components a pipeline calls, how often, in which phase and on what — from its own `__call__`.

`discover(pipe, twins, call_kwargs)` runs the pipeline's own `__call__` once, with every nn.Module component
replaced by its weightless twin on `meta` and the glue (pipeline code, scheduler, tokenizers, processors) real on
the CPU; values read from meta tensors are taken as zero (`planner.zero_reads`). Nothing here knows a pipeline
class or a component name:

- every public method of every component is wrapped (forward hooks alone miss `vae.decode`, `vae.encode`,
  `get_text_features`, ...); a call counts when the pipeline makes it (calls a component makes inside its own
  call belong to that call) and it runs tensor ops;
- the phase comes from the pipeline's own progress bar: before the denoising loop "encode", inside it "denoise",
  after it "decode";
- each distinct call (component, method, phase, argument shapes/dtypes) is traced once, in place, under the
  tensor-lifetime tracker (`planner.tracing`): activation peak, FLOPs, per-op data. An identical later call is
  counted and answered with fresh tensors of the first one's output layout, without running the module again, so
  the whole run can take the workload's real number of steps and every count is exact, not extrapolated (a
  pipeline switching denoisers at a boundary, or img2img `strength` cutting steps, is counted as it really runs);
- schedulers keep their timesteps and sigmas real, on the CPU: `set_timesteps(device=...)` is redirected to the
  CPU (patched on the class: pipelines deep-copy schedulers and compare their types), so a step-dependent branch
  (Wan 2.2 switching denoisers at a boundary timestep) takes the path it really takes, and the component's
  inputs are moved to meta as the pipeline would move them to its device;
- a component's `.to(device)` is a no-op (nothing materializes); `.to(dtype)` is applied, as the pipeline means
  it (an SDXL VAE upcast to fp32 for the decode is traced in fp32), and every dtype is restored afterwards.

Every patch is removed on exit, also when the call fails.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import _pop_mode_temporarily
from torch.utils._pytree import tree_flatten, tree_map

from planner.errors import UnsupportedError
from planner.glue import quiet_libraries
from planner.tracing import CallTrace, _LiveBytesMode, traced_call
from planner.zero_reads import ANSWERED, patched, run_reading_zeros, zero_reads

logger = logging.getLogger(__name__)

ENCODE, DENOISE, DECODE = "encode", "denoise", "decode"


class UntracedCallError(UnsupportedError):
    """A component call the pipeline makes could not be traced, so it cannot be priced."""


@dataclass
class RecordedCall:
    """One distinct call of one component method, as the pipeline made it."""

    component: str
    method: str
    phase: str
    count: int
    args_text: str
    trace: CallTrace
    args: tuple = ()  # the meta arguments, kept to trace variants (VAE tiling) and to measure on a device
    kwargs: dict = field(default_factory=dict)
    cast: torch.dtype | None = None  # the dtype the pipeline had moved the whole component to for this call

    @property
    def batch(self) -> int | None:
        """The leading dimension of the first floating tensor argument (the latents, for a denoiser)."""
        for t in tree_flatten((self.args, self.kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0:
                return int(t.shape[0])
        return None


@dataclass
class Discovery:
    """What one run of the pipeline's `__call__` did."""

    calls: list[RecordedCall]
    loop_steps: int  # denoising-loop iterations (progress-bar updates)
    output_shape: tuple[int, ...] | None  # of the pipeline's first output tensor
    answered_reads: dict[str, int]  # data-dependent ops answered as zero, by op name
    failure: str = ""  # partial runs only: why the run stopped
    failed_component: str = ""  # ... and the component whose call failed ("" when the pipeline's own code did)

    def of(self, component: str) -> list[RecordedCall]:
        return [c for c in self.calls if c.component == component]


class _ZeroReadsTrace(_LiveBytesMode):
    """The tracer, with meta reads answered as zero inside the traced call too (`.item()` in a mask check)."""

    def run(self, func, args, kwargs):
        return run_reading_zeros(func, args, kwargs)


# ---------------------------------------------------------------- arguments

def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, float):  # a float timestep or scale changes per step, never the work done
        return ("float",)
    if isinstance(x, (int, str, bool, type(None), torch.dtype)):
        return x
    return type(x).__name__


def call_signature(args, kwargs) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    return str(spec), tuple(_leaf_key(x) for x in leaves)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')}[{','.join(map(str, x.shape))}]"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_describe(v) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner})"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items()) + "}"
    return repr(x) if isinstance(x, (int, float, bool, str, type(None))) else type(x).__name__


def describe_args(args, kwargs) -> str:
    parts = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()
                                            if isinstance(v, (torch.Tensor, list, tuple, dict))]
    return ", ".join(parts)


def _to_meta(x):
    """A real tensor fed to a twin (a CPU timestep from the scheduler) goes where the twin is, as the pipeline would
    move it to its execution device."""
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) and not x.is_meta else x


def _fresh(output):
    """New meta tensors with the layout of `output`'s, in the same containers (a memoized call's answer)."""
    return tree_map(lambda t: torch.empty_like(t) if isinstance(t, torch.Tensor) and t.is_meta else t, output)


def _has_tensor(output) -> bool:
    return any(isinstance(t, torch.Tensor) for t in tree_flatten(output)[0])


# ---------------------------------------------------------------- the recorder

class _Recorder:
    def __init__(self, twins: dict[str, torch.nn.Module]):
        self.twins = twins
        self.phase = ENCODE
        self.loop_steps = 0
        self.active: str | None = None  # the component whose recorded call is running
        self.calls: dict[tuple, RecordedCall] = {}
        self.outputs: dict[tuple, object] = {}
        self.failed: str = ""
        self.cast_to: dict[str, torch.dtype] = {}  # component -> dtype of its last `.to(dtype)` by the pipeline
        self.no_ops: set[tuple[str, str]] = set()  # methods that ran no tensor op (`cache_context`): not traced

    def call(self, name: str, method: str, original: Callable, args, kwargs):
        if self.active is not None or (name, method) in self.no_ops:  # part of another call / no compute
            return original(*args, **kwargs)
        args, kwargs = tree_map(_to_meta, (args, kwargs))
        key = (name, method, self.phase, call_signature(args, kwargs))
        if key in self.calls:
            self.calls[key].count += 1
            return _fresh(self.outputs[key])
        trace, out = self._trace(name, method, original, args, kwargs)
        if trace.ops and _has_tensor(out):
            self.calls[key] = RecordedCall(name, method, self.phase, 1, describe_args(args, kwargs), trace,
                                           args, dict(kwargs), self.cast_to.get(name))
            self.outputs[key] = out
        elif not trace.ops:
            self.no_ops.add((name, method))
        return out

    def _trace(self, name, method, original, args, kwargs):
        module = self.twins[name]
        self.active = name
        try:
            with _pop_mode_temporarily():  # the glue's ZeroReads mode: the tracer answers reads itself
                return traced_call(module, lambda: original(*args, **kwargs), inputs=(args, kwargs),
                                   mode_class=_ZeroReadsTrace)
        except UntracedCallError:
            raise
        except Exception as err:
            self.failed = name
            raise UntracedCallError(
                f"{name}.{method}({describe_args(args, kwargs)}) could not be traced on meta: "
                f"{type(err).__name__}: {err}") from err
        finally:
            self.active = None


# ---------------------------------------------------------------- patches on the twins and the pipeline copy

# torch.nn.Module's own methods are not calls to record (parameters(), eval(), ...); forward is wrapped on its own.
_MODULE_OWN = frozenset(dir(torch.nn.Module))
_DEVICE_MOVES = ("to", "cpu", "cuda")


def _public_methods(module: torch.nn.Module) -> list[str]:
    names = []
    for name in dir(type(module)):
        if name.startswith("_") or name in _MODULE_OWN:
            continue
        attr = inspect.getattr_static(type(module), name, None)
        if inspect.isfunction(attr):
            names.append(name)
    return ["forward", *names]


def _dtype_only_move(module: torch.nn.Module, name: str, recorder: _Recorder):
    """`.to(...)` that keeps the module on meta but applies a dtype, as the pipeline asked."""
    def move(*args, **kwargs):
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype is not None:
            torch.nn.Module.to(module, dtype=dtype)
            recorder.cast_to[name] = dtype
        return module
    return move


def _dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}


def _restore_dtypes(module: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.dtype != dtypes[n]:
            t.data = t.data.to(dtypes[n])


@contextlib.contextmanager
def _wrapped(recorder: _Recorder):
    """Every public method of every twin records its calls; device moves are no-ops; dtypes restored on exit."""
    saved = {}
    for name, module in recorder.twins.items():
        saved[name] = (dict(module.__dict__), _dtypes(module))
        for method in _public_methods(module):
            original = getattr(module, method)
            wrapper = (lambda *a, _n=name, _m=method, _o=original, **k: recorder.call(_n, _m, _o, a, k))
            object.__setattr__(module, method, wrapper)
        for move in _DEVICE_MOVES:
            object.__setattr__(module, move, _dtype_only_move(module, name, recorder))
    try:
        yield
    finally:
        for name, module in recorder.twins.items():
            own, dtypes = saved[name]
            for key in set(module.__dict__) - set(own):
                del module.__dict__[key]
            module.__dict__.update({k: v for k, v in own.items() if k in ("forward", *_DEVICE_MOVES)})
            _restore_dtypes(module, dtypes)


def _on_cpu(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)  # pipelines read its signature (`"sigmas" in ...parameters`)
    def set_timesteps(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        if "device" in signature.parameters:
            bound.arguments["device"] = "cpu"
        return original(*bound.args, **bound.kwargs)
    return set_timesteps


@contextlib.contextmanager
def _schedulers_on_cpu(pipe):
    """Every scheduler-like component (one with `set_timesteps`) keeps its timesteps on the CPU, real."""
    classes = {type(v) for v in pipe.components.values() if hasattr(type(v), "set_timesteps")}
    with contextlib.ExitStack() as stack:
        for cls in classes:
            stack.enter_context(patched(cls, "set_timesteps", _on_cpu))
        yield


class _LoopBar:
    """The pipeline's progress bar, marking the denoising loop: inside it the phase is "denoise", after it
    "decode"; each update is one loop step."""

    def __init__(self, recorder: _Recorder, iterable=None):
        self.recorder, self.iterable = recorder, iterable

    def __enter__(self):
        self.recorder.phase = DENOISE
        return self

    def __exit__(self, *exc):
        self.recorder.phase = DECODE

    def update(self, n: int = 1) -> None:
        self.recorder.loop_steps += n

    def __iter__(self):
        self.recorder.phase = DENOISE
        for item in self.iterable:
            yield item
            self.recorder.loop_steps += 1
        self.recorder.phase = DECODE

    def __len__(self) -> int:
        return len(self.iterable)

    def __getattr__(self, name):  # set_postfix, close, refresh, ...: nothing to show
        return lambda *a, **k: None


def _pipeline_copy(pipe, twins: dict[str, torch.nn.Module], recorder: _Recorder):
    """A shallow copy of `pipe` with its modules replaced by the twins and its stateful glue (schedulers,
    guiders, processors: config objects) deep-copied, so the user's pipeline is left as it was."""
    from diffusers.configuration_utils import ConfigMixin

    clone = copy.copy(pipe)
    for name in pipe.components:
        value = getattr(pipe, name, None)
        if name in twins:
            object.__setattr__(clone, name, twins[name])
        elif isinstance(value, ConfigMixin):
            object.__setattr__(clone, name, copy.deepcopy(value))
    object.__setattr__(clone, "progress_bar", lambda iterable=None, total=None: _LoopBar(recorder, iterable))
    return clone


def _output_shape(output) -> tuple[int, ...] | None:
    for t in tree_flatten(output)[0]:
        if isinstance(t, torch.Tensor) and t.dim() >= 3:
            return tuple(t.shape)
    return None


def discover(pipe, twins: dict[str, torch.nn.Module], call_kwargs: dict, partial: bool = False) -> Discovery:
    """Run `type(pipe).__call__` on the twins with `call_kwargs` and record every component call (see module doc).

    Raises UntracedCallError naming the component call, or the pipeline step, that could not run on meta; with
    `partial=True` returns what was recorded until then, with the reason in `failure`."""
    recorder = _Recorder(twins)
    clone = _pipeline_copy(pipe, twins, recorder)
    output, failure = None, ""
    with _wrapped(recorder), _schedulers_on_cpu(clone), quiet_libraries(), zero_reads():
        try:
            output = clone(**call_kwargs)
        except UntracedCallError as err:
            failure = err
        except Exception as err:
            failure = UntracedCallError(
                f"{type(pipe).__name__}.__call__ failed on meta in its own code ({recorder.phase} phase): "
                f"{type(err).__name__}: {err}")
            failure.__cause__ = err
        answered = dict(ANSWERED)
    if failure and not partial:
        raise failure
    if failure:
        logger.warning("%s", failure)
    return Discovery(list(recorder.calls.values()), recorder.loop_steps, _output_shape(output), answered,
                     str(failure), recorder.failed)


def retrace(call: RecordedCall, module: torch.nn.Module, original: Callable) -> CallTrace:
    """`original(*call.args, **call.kwargs)` traced again (e.g. with the VAE's tiling on), reads as zeros, in the
    dtype the pipeline had moved the component to for that call."""
    dtypes = _dtypes(module)
    if call.cast is not None:
        torch.nn.Module.to(module, dtype=call.cast)
    try:
        with zero_reads(), _pop_mode_temporarily():
            trace, _ = traced_call(module, lambda: original(*call.args, **call.kwargs),
                                   inputs=(call.args, call.kwargs), mode_class=_ZeroReadsTrace)
    finally:
        _restore_dtypes(module, dtypes)
    return trace
