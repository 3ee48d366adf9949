"""Profile: what each component of a pipeline weighs, how diffusers would split it, and what one call allocates.

`profile(source, **knobs)` runs the pipeline's own call on weightless twins (`planner.discovery`) to learn every
component's calls, then walks every nn.Module component for its weights and groups: no table keyed by pipeline
class or component name. With `backend="device"` (components loaded on a real device) each recorded call is also
run for real there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

import torch

from torch.utils._pytree import tree_flatten, tree_map

from planner.call_args import call_kwargs, resolved_workload, workload_knobs
from planner.discovery import DECODE, DENOISE, ENCODE, Discovery, RecordedCall, discover, retrace
from planner.grouping import group_of, layout
from planner.profile_data import PROFILE_VERSION, CallProfile, ComponentProfile, OpStat, Profile, Unit
from planner.sources import PipelineSource, compute_dtype, config_hash, meta_twin
from planner.tracing import CallTrace, device_name, measure_call
from planner.progress import bar
from planner.workload import Workload, split_knobs

logger = logging.getLogger(__name__)

# The layers diffusers' group offloading (leaf_level) and layerwise casting act on.
SUPPORTED_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                    torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Embedding)
# diffusers.hooks.layerwise_casting.DEFAULT_SKIP_MODULES_PATTERN (matched with re.search on module FQNs).
DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
FP8_ELEMENT_BYTES = 1


# ---------------------------------------------------------------- weights

def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _bytes_by_dtype(module: torch.nn.Module) -> dict[str, int]:
    counts: Counter = Counter()
    for p in module.parameters():
        counts[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
    return dict(counts)


def fp8_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers `enable_layerwise_casting` would store in fp8, by diffusers' rules: supported layer types,
    minus the default skip patterns, the class's `_skip_layerwise_casting_patterns` and `_keep_in_fp32_modules`."""
    patterns = list(DEFAULT_SKIP_PATTERNS) + list(getattr(module, "_skip_layerwise_casting_patterns", None) or [])
    patterns += list(getattr(module, "_keep_in_fp32_modules", None) or [])
    found: list[tuple[str, torch.nn.Module]] = []

    def walk(mod: torch.nn.Module, prefix: str) -> None:
        if prefix and any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(mod, SUPPORTED_LAYERS):
            found.append((prefix, mod))
            return
        for child_name, child in mod.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    walk(module, "")
    return found


def _fp8_saving(layers, prefix: str = "") -> int:
    """Bytes saved by storing the floating weights of `layers` (under `prefix`) in fp8."""
    saving = 0
    for name, layer in layers:
        if prefix and not (name == prefix or name.startswith(prefix + ".")):
            continue
        for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]:
            if t.is_floating_point():
                saving += t.numel() * (t.element_size() - FP8_ELEMENT_BYTES)
    return saving


def _units(module: torch.nn.Module, layers) -> tuple[tuple[Unit, ...], Unit, dict[str, int]]:
    groups = layout(module)
    names = groups.block_names
    blocks = []
    for name in names:
        sub = module.get_submodule(name)
        blocks.append(Unit(name, _tensor_bytes([*sub.parameters(), *sub.buffers()]), _fp8_saving(layers, name)))
    total = _tensor_bytes([*module.parameters(), *module.buffers()])
    fp8_total = _fp8_saving(layers)
    unmatched = Unit("unmatched", total - sum(b.n_bytes for b in blocks),
                     fp8_total - sum(b.fp8_saving_bytes for b in blocks))
    return tuple(blocks), unmatched, {fqn: len(blocks_) for fqn, blocks_ in groups.lists.items()}


def _leaves(module: torch.nn.Module) -> list[int]:
    return [_tensor_bytes([*m.parameters(recurse=False), *m.buffers(recurse=False)])
            for m in module.modules() if isinstance(m, SUPPORTED_LAYERS)]


# ---------------------------------------------------------------- calls

def layerwise_casting_works(module: torch.nn.Module) -> bool:
    """fp8 storage needs a diffusers model (its `.dtype` reports the compute dtype under casting). A fp16 VAE with
    `force_upcast` is excluded: SD/SDXL pipelines move it to fp32 for decoding, while the casting hook keeps
    casting its weights to fp16, and the decode fails on mixed dtypes."""
    if not hasattr(module, "enable_layerwise_casting"):
        return False
    config = getattr(module, "config", None)
    upcasts = bool(getattr(config, "force_upcast", False))
    return not (upcasts and any(p.dtype == torch.float16 for p in module.parameters()))


def tied_weights_split(module: torch.nn.Module, offload_type: str | None) -> list[str] | None:
    """Names of one parameter shared by several modules that group offloading would split into different groups
    (leaf_level: always; block_level: when memplan's layout puts the names in different groups)."""
    groups = layout(module) if offload_type == "block_level" else None
    names: dict[int, list[str]] = {}
    for n, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(n)
    for shared in (ns for ns in names.values() if len(ns) > 1):
        if groups is None or len({group_of(groups, n) for n in shared}) > 1:
            return shared
    return None


def _upcast_weight_bytes(module: torch.nn.Module, calls: list[RecordedCall]) -> int:
    """Extra weight bytes while the pipeline runs the component in a wider dtype than it stores (SDXL moves its
    fp16 VAE to fp32 for the decode, `force_upcast`): the widest cast any recorded call ran under."""
    widths = [torch.empty((), dtype=c.cast).element_size() for c in calls
              if c.cast is not None and c.cast.is_floating_point]
    if not widths:
        return 0
    wide = max(widths)
    return sum(p.numel() * (wide - p.element_size()) for p in module.parameters()
               if p.is_floating_point() and p.element_size() < wide)


def _call_profile(call: RecordedCall, trace: CallTrace | None = None, variant: str = "") -> CallProfile:
    trace = trace or call.trace
    ops = tuple(OpStat(kind, dtype, count, flops, nbytes)
                for (kind, dtype, flops, nbytes), count in sorted(trace.ops.items()))
    given = sum(t.numel() * t.element_size() for t in tree_flatten((call.args, call.kwargs))[0]
                if isinstance(t, torch.Tensor))
    return CallProfile(call.method, call.phase, call.count, call.args_text, trace.peak_bytes, trace.peak_module,
                       trace.flops, ops, variant, io_bytes=given + trace.output_bytes)


@contextlib.contextmanager
def _vae_flags(module, tiling: bool, slicing: bool):
    """The VAE's use_tiling / use_slicing set for one trace, and restored after it."""
    flags = (getattr(module, "use_tiling", False), getattr(module, "use_slicing", False))
    module.use_tiling, module.use_slicing = tiling, slicing
    try:
        yield
    finally:
        module.use_tiling, module.use_slicing = flags


@contextlib.contextmanager
def _tiled_paths_watched(module):
    """Yields a list that gets an entry whenever one of the VAE's tiled code paths runs: diffusers names them
    `tiled_decode`, `_temporal_tiled_decode`, ... and `_decode` calls them only when the latents exceed a tile."""
    used: list[str] = []
    names = [n for n in dir(type(module)) if "tiled" in n and callable(getattr(type(module), n, None))]
    shadowed = {n: module.__dict__[n] for n in names if n in module.__dict__}  # the user's own patches
    for name in names:
        method = getattr(module, name)

        def watched(*args, _method=method, _name=name, **kwargs):
            used.append(_name)
            return _method(*args, **kwargs)

        object.__setattr__(module, name, watched)  # an instance attribute shadows the method
    try:
        yield used
    finally:
        for name in names:
            module.__dict__.pop(name, None)
        module.__dict__.update(shadowed)


def _variants(module: torch.nn.Module, call: RecordedCall) -> list[CallProfile]:
    """A VAE call traced again on the same arguments with tiling, and with slicing, where they change it: tiling
    only when a tiled code path runs (the latents exceed one tile), slicing only for a batch above one."""
    found = []
    method = getattr(module, call.method)
    if hasattr(module, "enable_tiling"):
        with _vae_flags(module, tiling=True, slicing=False), _tiled_paths_watched(module) as used:
            tiled = retrace(call, module, method)
        if used:
            found.append(_call_profile(call, tiled, "tiled"))
    if hasattr(module, "enable_slicing") and (call.batch or 1) > 1:
        with _vae_flags(module, tiling=False, slicing=True):
            found.append(_call_profile(call, retrace(call, module, method), "sliced"))
    return found


def role_from_calls(calls: tuple[CallProfile, ...]) -> str:
    """The phase a component works in, as the cost model's summary role: called in the loop, a denoiser; after
    it, a decoder (the VAE); only before it, an encoder; never, unused."""
    phases = {c.phase for c in calls}
    for phase, role in ((DENOISE, "denoiser"), (DECODE, "vae"), (ENCODE, "text_encoder")):
        if phase in phases:
            return role
    return "unused"


def _summary(calls: tuple[CallProfile, ...]) -> dict:
    """The per-component summary fields, consistent with `calls` (kept while the cost model migrates to calls):
    calls per run summed, the largest activation peak, FLOPs per call averaged over the calls made, the decode's
    tiled / sliced variants."""
    plain = [c for c in calls if not c.variant]
    n_calls = sum(c.calls_per_run for c in plain)
    top = max(plain, key=lambda c: c.activation_peak_bytes, default=None)
    fields = dict(role=role_from_calls(calls), calls_per_run=n_calls,
                  activation_peak_bytes=top.activation_peak_bytes if top else 0,
                  activation_peak_module=top.activation_peak_module if top else "",
                  flops_per_call=sum(c.flops * c.calls_per_run for c in plain) / n_calls if n_calls else 0.0)
    for variant in ("tiled", "sliced"):
        got = [c for c in calls if c.variant == variant]
        if got:
            fields[f"{variant}_activation_peak_bytes"] = max(c.activation_peak_bytes for c in got)
    tiled = [c for c in calls if c.variant == "tiled"]
    if tiled:
        fields["tiled_flops_per_call"] = max(c.flops for c in tiled)
    return fields


def _with_block_flops(blocks, unmatched, calls: list[RecordedCall]) -> tuple[tuple[Unit, ...], Unit]:
    """Per-block FLOPs of the call that does most of the component's work (the denoiser's loop call)."""
    if not calls:
        return blocks, unmatched
    trace = max(calls, key=lambda c: c.count * c.trace.flops).trace
    blocks = tuple(dataclasses.replace(b, flops=trace.block_flops.get(b.name, 0.0)) for b in blocks)
    rest = trace.flops - sum(b.flops for b in blocks)
    return blocks, dataclasses.replace(unmatched, flops=rest)


def materialized(tree, device: torch.device):
    """Real tensors on `device` in place of meta ones: random floats, zero ids and masks."""
    def real(t):
        if not (isinstance(t, torch.Tensor) and t.is_meta):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, dtype=t.dtype, device=device)
        return torch.zeros(t.shape, dtype=t.dtype, device=device)
    return tree_map(real, tree)


def _measure(module, calls: list[RecordedCall], blocks) -> tuple[dict, tuple[Unit, ...]]:
    """The device backend: each distinct call run for real on the module's device on arguments of the recorded
    shapes (seconds per call and per block of the main call); on CUDA the allocator's peak replaces the traced
    activation peak, as what the target really allocates (workspaces included)."""
    device = next(module.parameters()).device
    seconds, peaks, main = 0.0, [], max(calls, key=lambda c: c.count * c.trace.flops)
    block_s: dict = {}
    with _vae_flags(module, tiling=False, slicing=False) if hasattr(module, "use_tiling") else contextlib.nullcontext():
        for call in calls:
            args, kwargs = materialized((call.args, call.kwargs), device)
            got = measure_call(module, lambda: getattr(module, call.method)(*args, **kwargs))
            seconds += got.call_s * call.count
            peaks.append(got.allocator_peak_bytes)
            block_s = got.block_s if call is main else block_s
    blocks = tuple(dataclasses.replace(b, measured_s=block_s.get(b.name)) for b in blocks)
    fields = {"measured_call_s": seconds / sum(c.count for c in calls), "measured_on": got.device_name}
    if None not in peaks:
        fields["activation_peak_bytes"] = max(peaks)
    return fields, blocks


def profile_component(name: str, module: torch.nn.Module, calls: list[RecordedCall],
                      real: torch.nn.Module | None = None, untraced: str | None = None) -> ComponentProfile:
    """A component's weights, groups and calls. `calls`: what discovery recorded of it on its twin `module`
    (none: unused); `real`: the loaded module to measure the calls on (device backend); `untraced`: why its
    calls are unknown (only under the explicit opt-in `allow_untraced`)."""
    layers = fp8_layers(module)
    blocks, unmatched, lists = _units(module, layers)
    leaves = _leaves(module)
    profiles = tuple(p for c in calls for p in (_call_profile(c), *_variants(module, c)))
    blocks, unmatched = _with_block_flops(blocks, unmatched, calls)
    measured: dict = {}
    if real is not None and calls:
        measured, blocks = _measure(real, calls, blocks)
    summary = _summary(profiles)
    if untraced is not None:
        summary["role"] = "untraced"
    fp8_leaf = max((_tensor_bytes(l.parameters()) for _, l in layers), default=0)
    return ComponentProfile(
        name=name, class_name=type(module).__name__, config_hash=config_hash(module),
        param_bytes_by_dtype=_bytes_by_dtype(module), buffer_bytes=_tensor_bytes(module.buffers()),
        fp8_saving_bytes=_fp8_saving(layers), block_lists=lists, blocks=blocks, unmatched=unmatched,
        leaf_count=len(leaves), largest_leaf_bytes=max(leaves, default=0), largest_fp8_leaf_bytes=fp8_leaf,
        activations_known=untraced is None, supports_tiling=hasattr(module, "enable_tiling"),
        supports_slicing=hasattr(module, "enable_slicing"), supports_layerwise_casting=layerwise_casting_works(module),
        disk_unsafe_offload_types=tuple(t for t in ("block_level", "leaf_level") if tied_weights_split(module, t)),
        calls=profiles, upcast_weight_bytes=_upcast_weight_bytes(module, calls), **{**summary, **measured},
    )


# ---------------------------------------------------------------- cache and entry point

def _cache_dir() -> Path:
    return Path(os.environ.get("MEMPLAN_CACHE", Path.home() / ".cache" / "memplan")) / "profiles"


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[str, ...]:
    """A traced call runs the libraries' forward code: another version may allocate differently."""
    return tuple(importlib.metadata.version(lib) for lib in ("torch", "diffusers", "transformers"))


def _cache_key(source: PipelineSource, knobs: dict, backend: str, allow_untraced: bool) -> str:
    parts = {n: _cache_part(m, backend) for n, m in source.components.items()}
    pipeline = type(source.pipeline).__qualname__ if source.pipeline is not None else source.pipeline_class
    blob = json.dumps([PROFILE_VERSION, _library_versions(), backend, pipeline, parts, knobs, allow_untraced,
                       source.assumptions], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_part(module: torch.nn.Module, backend: str) -> list:
    # the class too: a subclass with the same config runs other code (and traces differently)
    cls = type(module)
    part = [f"{cls.__module__}.{cls.__qualname__}", config_hash(module), sorted(_bytes_by_dtype(module).items())]
    if backend == "device":  # measured seconds and allocator peaks hold only for the card they were measured on
        part.append(device_name(next(module.parameters()).device))
    return part


_MEMORY_CACHE: dict[str, Profile] = {}


def profile(source: PipelineSource, workload: Workload | None = None, *, use_cache: bool = True,
            allow_untraced: bool = False, progress: bool = False, **knobs) -> Profile:
    """Profile every nn.Module component of `source` for one call of its pipeline (cached by config hash + knobs).

    The pipeline's own `__call__` runs once on weightless twins (`planner.discovery`): which components it calls,
    how often, in which phase, on what; each distinct call is traced for its activation peak, FLOPs and per-op
    data. `workload` (e.g. a plan's) and `knobs` (height=, num_inference_steps=, guidance_scale=, ... any argument
    of the pipeline's `__call__`, batch_size for images/videos per prompt) are passed to the call; what is not
    given takes the pipeline's own default, and the profile's `workload` is what the pipeline then ran.
    Components on a real device are also run for real on the recorded shapes (the `device` backend).

    Raises UntracedCallError naming the call that could not be traced; with `allow_untraced=True` the profile is
    made anyway, partly blind: the untraced components are marked, and a warning is logged at every use.
    `progress` shows a bar over the components."""
    backend = _backend(source)
    knobs = {**{k: v for k, v in source.workload_defaults.items() if k != "dtype"},
             **(workload_knobs(workload, _pipeline_class(source)) if workload is not None else {}), **knobs}
    # dtype: a folder's build dtype (already applied); a loaded pipeline runs in the dtypes it has
    knobs = {k: v for k, v in knobs.items() if v is not None and k != "dtype"}
    key = _cache_key(source, knobs, backend, allow_untraced)
    if use_cache:
        cached = _MEMORY_CACHE.get(key) or _read_cache(key)
        if cached is not None:
            _MEMORY_CACHE[key] = cached
            return _warned(cached)
    start = time.perf_counter()
    result = _profile(source, knobs, backend, allow_untraced, progress)
    logger.info("profiled %s (%s backend) in %.2fs", source.name, backend, time.perf_counter() - start)
    _MEMORY_CACHE[key] = result
    _write_cache(key, result)
    return _warned(result)


def _profile(source: PipelineSource, knobs: dict, backend: str, allow_untraced: bool, progress: bool) -> Profile:
    pipe_cls = _pipeline_class(source)
    twins = {n: m if _on_meta(m) else meta_twin(m) for n, m in source.components.items()}
    kwargs = call_kwargs(pipe_cls, knobs)
    found = discover(source.pipeline, twins, kwargs, partial=allow_untraced)
    blind = _blind_components(found, twins)
    comps = {n: profile_component(n, twins[n], found.of(n), real=None if backend == "meta" else m,
                                  untraced=blind.get(n))
             for n, m in bar(source.components.items(), f"profiling {source.name}", progress,
                             total=len(source.components))}
    _, extra = split_knobs(knobs)
    work = resolved_workload(pipe_cls, kwargs, found, _compute_dtype_of(comps, twins), extra)
    return Profile(source.pipeline_class, source.name, work, comps, backend,
                   assumptions=_assumptions(source, found, blind))


def _pipeline_class(source: PipelineSource) -> type:
    if source.pipeline is None:
        raise ValueError(f"{source.name or source.pipeline_class}: no pipeline to run; make the source with "
                         "from_pipeline() or load_source()")
    return type(source.pipeline)


def _on_meta(module: torch.nn.Module) -> bool:
    return all(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _blind_components(found: Discovery, twins: dict) -> dict[str, str]:
    """Components whose calls are unknown because the run stopped (allow_untraced only): the one that failed,
    and every one it had not reached yet."""
    if not found.failure:
        return {}
    reached = {c.component for c in found.calls}
    return {n: found.failure for n in twins if n not in reached or n == found.failed_component}


def _compute_dtype_of(comps: dict[str, ComponentProfile], twins: dict) -> str:
    """The compute dtype of the component doing most of the work (the denoiser), as the workload's dtype."""
    busiest = max(comps.values(), key=lambda c: c.flops_per_call * c.calls_per_run, default=None)
    if busiest is None or busiest.calls_per_run == 0:
        return Workload.dtype
    dtype = str(compute_dtype(twins[busiest.name])).removeprefix("torch.")
    return dtype if dtype in ("float32", "float16", "bfloat16") else Workload.dtype


def _assumptions(source: PipelineSource, found: Discovery, blind: dict[str, str]) -> tuple[str, ...]:
    notes = list(source.assumptions)
    if found.answered_reads:
        reads = ", ".join(f"{op} x{n}" for op, n in sorted(found.answered_reads.items()))
        notes.append(f"values read from meta tensors taken as zero (sizes: every element selected): {reads}")
    if blind:
        notes.append(f"PARTLY BLIND: {', '.join(sorted(blind))} not traced ({found.failure}); their activations "
                     "and compute are not priced")
    return tuple(notes)


def _warned(result: Profile) -> Profile:
    blind = [n for n, c in result.components.items() if not c.activations_known]
    if blind:
        logger.warning("profile of %s is partly blind: %s were not traced, their activations and compute are "
                       "not priced (allow_untraced=True)", result.source_name, ", ".join(blind))
    return result


def _backend(source: PipelineSource) -> str:
    devices = {p.device.type for m in source.components.values() for p in m.parameters()}
    return "meta" if devices == {"meta"} else "device"


def _read_cache(key: str) -> Profile | None:
    path = _cache_dir() / f"{key}.json"
    try:
        return Profile.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(key: str, result: Profile) -> None:
    try:
        _cache_dir().mkdir(parents=True, exist_ok=True)
        (_cache_dir() / f"{key}.json").write_text(json.dumps(result.to_dict()))
    except OSError as err:
        logger.warning("profile cache not written: %s", err)
