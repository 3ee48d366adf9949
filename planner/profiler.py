"""Profile: what each component of a pipeline weighs, how diffusers would split it, and what one call allocates.

`profile(source, workload)` walks every nn.Module component (generic: no per-model table except the inputs of
`planner.inputs`) and traces one call of each on the component's own device — `meta` for zoo/folder sources
(no GPU, no weights), the real device for a loaded pipeline when `backend="device"`.
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

from planner.inputs import NoInputsKnown, call_builder
from planner.sources import PipelineSource, config_hash
from planner.tracing import CallTrace, block_names, device_name, measure_call, op_stats, trace_call
from planner.profile_data import PROFILE_VERSION, CallProfile, ComponentProfile, OpStat, Profile, Unit
from planner.workload import Workload

logger = logging.getLogger(__name__)

# The layers diffusers' group offloading (leaf_level) and layerwise casting act on.
SUPPORTED_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                    torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Embedding)
# diffusers.hooks.layerwise_casting.DEFAULT_SKIP_MODULES_PATTERN (matched with re.search on module FQNs).
DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
FP8_ELEMENT_BYTES = 1


# ---------------------------------------------------------------- weights

def role_of(name: str, module: torch.nn.Module) -> str:
    if name.startswith("text_encoder"):
        return "text_encoder"
    if name.startswith(("transformer", "unet", "prior")):
        return "denoiser"
    if name.startswith("vae"):
        return "vae"
    return "other"


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
    names = block_names(module)
    blocks = []
    for name in names:
        sub = module.get_submodule(name)
        blocks.append(Unit(name, _tensor_bytes([*sub.parameters(), *sub.buffers()]), _fp8_saving(layers, name)))
    total = _tensor_bytes([*module.parameters(), *module.buffers()])
    fp8_total = _fp8_saving(layers)
    unmatched = Unit("unmatched", total - sum(b.n_bytes for b in blocks),
                     fp8_total - sum(b.fp8_saving_bytes for b in blocks))
    lists = {n: len(c) for n, c in module.named_children() if isinstance(c, (torch.nn.ModuleList, torch.nn.Sequential))}
    return tuple(blocks), unmatched, lists


def _leaves(module: torch.nn.Module) -> list[int]:
    return [_tensor_bytes([*m.parameters(recurse=False), *m.buffers(recurse=False)])
            for m in module.modules() if isinstance(m, SUPPORTED_LAYERS)]


# ---------------------------------------------------------------- calls

def layerwise_casting_works(module: torch.nn.Module, role: str) -> bool:
    """fp8 storage needs a diffusers model (its `.dtype` reports the compute dtype under casting). A fp16 VAE with
    `force_upcast` is excluded: SD/SDXL pipelines move it to fp32 for decoding, while the casting hook keeps
    casting its weights to fp16, and the decode fails on mixed dtypes."""
    if not hasattr(module, "enable_layerwise_casting"):
        return False
    config = getattr(module, "config", None)
    upcasts = role == "vae" and bool(getattr(config, "force_upcast", False))
    return not (upcasts and any(p.dtype == torch.float16 for p in module.parameters()))


def tied_weights_split(module: torch.nn.Module, offload_type: str | None) -> list[str] | None:
    """Names of one parameter shared by several modules that group offloading may split into different groups
    (leaf_level: always; block_level: when one of them is inside a block). Conservative for block_level."""
    blocks = set(getattr(module, "_group_offload_block_modules", None) or ()) | {
        n for n, child in module.named_children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))}
    names: dict[int, list[str]] = {}
    for n, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(n)
    for shared in (ns for ns in names.values() if len(ns) > 1):
        if offload_type == "leaf_level" or any(n.split(".")[0] in blocks for n in shared):
            return shared
    return None


def calls_per_run(role: str, workload: Workload) -> int:
    """Calls of a component in one pipeline call. Text encoders run for the prompt and, with CFG, for the
    negative prompt; the denoiser runs steps x separate CFG passes; the VAE decodes once."""
    cfg = workload.cfg_batch > 1 or workload.cfg_passes > 1
    return {"text_encoder": 2 if cfg else 1, "denoiser": workload.num_inference_steps * workload.cfg_passes,
            "vae": 1}.get(role, 0)


def _trace(module, role, workload):
    """Trace one call; on a real device with the real attention kernels (flash on CUDA and on the CPU)."""
    fn = call_builder(module, role, workload)
    on_meta = next(module.parameters()).device.type == "meta"
    return trace_call(module, fn, replace_sdpa=on_meta)


def _measure(module, role, workload, blocks) -> tuple[dict, tuple[Unit, ...]]:
    """The device backend: time one real call (and its blocks); on CUDA the allocator's peak replaces the
    traced activation peak, as what the target really allocates (workspaces included)."""
    with _vae_flags(module, tiling=False, slicing=False) if role == "vae" else contextlib.nullcontext():
        got = measure_call(module, call_builder(module, role, workload))
    blocks = tuple(dataclasses.replace(b, measured_s=got.block_s.get(b.name)) for b in blocks)
    fields = {"measured_call_s": got.call_s, "measured_on": got.device_name}
    if got.allocator_peak_bytes is not None:
        fields["activation_peak_bytes"] = got.allocator_peak_bytes
    return fields, blocks


def _with_block_flops(blocks, unmatched, trace) -> tuple[tuple[Unit, ...], Unit]:
    blocks = tuple(dataclasses.replace(b, flops=trace.block_flops.get(b.name, 0.0)) for b in blocks)
    rest = trace.flops - sum(b.flops for b in blocks)
    return blocks, dataclasses.replace(unmatched, flops=rest)


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


def pipeline_upcasts_vae(pipeline_class: str) -> bool:
    """Whether the pipeline's own code decodes a fp16 VAE in fp32 when its config says `force_upcast` (SDXL's
    `upcast_vae`; SD 1.5's pipeline does not). Read from the pipeline class's source, not from a table."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    try:
        return cls is not None and "force_upcast" in inspect.getsource(cls)
    except (OSError, TypeError):
        return False


def upcasts(module: torch.nn.Module, pipeline_upcasts: bool) -> bool:
    """A fp16 VAE the pipeline runs in fp32 for decoding (weights and activations twice the bytes)."""
    return (pipeline_upcasts and bool(getattr(getattr(module, "config", None), "force_upcast", False))
            and any(p.dtype == torch.float16 for p in module.parameters()))


@contextlib.contextmanager
def _in_dtype(module: torch.nn.Module, dtype: torch.dtype | None):
    """The meta module's floating tensors in `dtype` for one trace, each restored after it (meta: free)."""
    if dtype is None:
        yield
        return
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    originals = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, original in zip(tensors, originals):
            t.data = t.data.to(original)


def _vae_traces(module, workload) -> tuple[CallTrace, dict]:
    """The plain decode, and its activation peaks with tiling and with slicing when the VAE offers them.

    Tiling is traced first: when no tiled code path runs (the latents fit in one tile), that trace *is* the plain
    decode, so it is not traced twice. Slicing changes nothing for one image and is traced only for batches."""
    extra = {"supports_tiling": hasattr(module, "enable_tiling"), "supports_slicing": hasattr(module, "enable_slicing")}
    plain = None
    if extra["supports_tiling"]:
        with _vae_flags(module, tiling=True, slicing=False), _tiled_paths_watched(module) as used:
            tiled = _trace(module, "vae", workload)
        if used:  # tiled_* stay None when tiling would change nothing for this workload
            extra.update(tiled_activation_peak_bytes=tiled.peak_bytes, tiled_flops_per_call=tiled.flops)
            extra["tiled_trace"] = tiled
        plain = None if used else tiled
    if plain is None:
        with _vae_flags(module, tiling=False, slicing=False):
            plain = _trace(module, "vae", workload)
    if extra["supports_slicing"] and workload.batch_size > 1:
        with _vae_flags(module, tiling=False, slicing=True):
            extra["sliced_activation_peak_bytes"] = _trace(module, "vae", workload).peak_bytes
    return plain, extra


_METHODS = {"text_encoder": "forward", "denoiser": "forward", "vae": "decode"}
_PHASES = {"text_encoder": "encode", "denoiser": "denoise", "vae": "decode"}


def _calls(role: str, workload: Workload, trace: CallTrace | None, tiled: CallTrace | None) -> tuple[CallProfile, ...]:
    """The component's traced call (and the VAE's tiled variant) as per-call records with their ops."""
    if trace is None or role not in _PHASES:
        return ()
    plain = CallProfile(_METHODS[role], _PHASES[role], calls_per_run(role, workload), "", trace.peak_bytes,
                        trace.peak_module, trace.flops, op_stats(trace.ops))
    if tiled is None:
        return (plain,)
    return plain, dataclasses.replace(plain, activation_peak_bytes=tiled.peak_bytes,
                                      activation_peak_module=tiled.peak_module, flops=tiled.flops,
                                      ops=op_stats(tiled.ops), variant="tiled")


def profile_component(name: str, module: torch.nn.Module, workload: Workload,
                      pipeline_upcasts: bool = False) -> ComponentProfile:
    role = role_of(name, module)
    layers = fp8_layers(module)
    blocks, unmatched, lists = _units(module, layers)
    leaves = _leaves(module)
    extra: dict = {}
    on_meta = next(module.parameters()).device.type == "meta"
    upcast = role == "vae" and upcasts(module, pipeline_upcasts)
    try:
        if role == "vae":
            # traced in the dtype the pipeline decodes in (on meta; a real module is measured as it is)
            with _in_dtype(module, torch.float32 if upcast and on_meta else None):
                trace, extra = _vae_traces(module, workload)
        else:
            trace = _trace(module, role, workload) if role != "other" else None
    except NoInputsKnown as err:
        logger.warning("%s: %s; its activations are not profiled (weights only)", name, err)
        trace, extra = None, {}
    measured: dict = {}
    if trace is not None:
        blocks, unmatched = _with_block_flops(blocks, unmatched, trace)
        if next(module.parameters()).device.type != "meta":
            measured, blocks = _measure(module, role, workload, blocks)
    fp8_leaf = max((_tensor_bytes(l.parameters()) for _, l in layers), default=0)
    tiled = extra.pop("tiled_trace", None)
    return ComponentProfile(
        name=name, class_name=type(module).__name__, config_hash=config_hash(module), role=role,
        param_bytes_by_dtype=_bytes_by_dtype(module), buffer_bytes=_tensor_bytes(module.buffers()),
        fp8_saving_bytes=_fp8_saving(layers), block_lists=lists, blocks=blocks, unmatched=unmatched,
        leaf_count=len(leaves), largest_leaf_bytes=max(leaves, default=0), largest_fp8_leaf_bytes=fp8_leaf,
        calls_per_run=calls_per_run(role, workload),
        activation_peak_bytes=measured.pop("activation_peak_bytes", trace.peak_bytes if trace else 0),
        activation_peak_module=trace.peak_module if trace else "",
        flops_per_call=trace.flops if trace else 0.0, activations_known=trace is not None,
        supports_layerwise_casting=layerwise_casting_works(module, role),
        disk_unsafe_offload_types=tuple(t for t in ("block_level", "leaf_level") if tied_weights_split(module, t)),
        calls=_calls(role, workload, trace, tiled),
        # the fp32 copy replaces the fp16 weights: twice their bytes while decoding
        upcast_weight_bytes=_tensor_bytes(module.parameters()) if upcast else 0,
        **{**extra, **measured},
    )


# ---------------------------------------------------------------- cache and entry point

def _cache_dir() -> Path:
    return Path(os.environ.get("MEMPLAN_CACHE", Path.home() / ".cache" / "memplan")) / "profiles"


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[str, ...]:
    """A traced call runs the libraries' forward code: another version may allocate differently."""
    return tuple(importlib.metadata.version(lib) for lib in ("torch", "diffusers", "transformers"))


def _cache_key(source: PipelineSource, workload: Workload, backend: str) -> str:
    parts = {n: _cache_part(m, backend) for n, m in source.components.items()}
    blob = json.dumps([PROFILE_VERSION, _library_versions(), backend, source.pipeline_class, parts,
                       workload.to_dict()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_part(module: torch.nn.Module, backend: str) -> list:
    part = [config_hash(module), sorted(_bytes_by_dtype(module).items())]
    if backend == "device":  # measured seconds and allocator peaks hold only for the card they were measured on
        part.append(device_name(next(module.parameters()).device))
    return part


_MEMORY_CACHE: dict[str, Profile] = {}


def profile(source: PipelineSource, workload: Workload, *, use_cache: bool = True) -> Profile:
    """Profile every nn.Module component of `source` for `workload` (cached by config hash + workload).

    Components on `meta` are traced without weights; components on a real device are run for real (the
    `device` backend), which is what a loaded pipeline gets."""
    backend = _backend(source)
    key = _cache_key(source, workload, backend)
    if use_cache:
        cached = _MEMORY_CACHE.get(key) or _read_cache(key)
        if cached is not None:
            _MEMORY_CACHE[key] = cached
            return cached
    start = time.perf_counter()
    upcasts_vae = pipeline_upcasts_vae(source.pipeline_class)
    comps = {n: profile_component(n, m, workload, upcasts_vae) for n, m in source.components.items()}
    result = Profile(source.pipeline_class, source.name, workload, comps, backend)
    logger.info("profiled %s (%s backend) in %.2fs", source.name, backend, time.perf_counter() - start)
    _MEMORY_CACHE[key] = result
    _write_cache(key, result)
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
