"""Apply a Plan to a loaded pipeline with diffusers' own hooks, in diffusers' order, all-or-nothing.

Order: validate everything → remove a previous plan's hooks → fp8 layerwise casting → group offloading /
model / sequential offload → resident components to the device → VAE tiling and slicing.
fp8 layerwise casting cannot be undone in process: a plan needing another storage dtype asks to reload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile

import torch

from planner.devices import check_device_available, check_not_meta
from planner.grouping import layout
from planner.plan import weights_dtype
from planner.profiler import _bytes_by_dtype, layerwise_casting_works, tied_weights_split
from planner.sources import compute_dtype, config_hash
from planner.strategy import (BLOCK_LEVEL, FP8_DTYPES, GROUP_OFFLOAD, MODEL_OFFLOAD, RESIDENT, SEQUENTIAL_OFFLOAD,
                              Choice, ComponentPlan, PlanError)

logger = logging.getLogger(__name__)

_APPLIED_ATTR = "_memplan_plan"
_MISSING = object()
_GROUP_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker")
_CASTING_HOOKS = ("layerwise_casting", "peft_autocast_disable")


# ---------------------------------------------------------------- validation (touches nothing)

def _components(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _fp8_dtype_of(module: torch.nn.Module) -> str | None:
    for p in module.parameters():
        name = str(p.dtype).removeprefix("torch.")
        if name in FP8_DTYPES:  # the storage dtypes a plan can name
            return name
    return None


def validate_plan(plan, pipe, device: str) -> None:
    """Raise PlanError if `plan` cannot be applied to `pipe` on `device` exactly as written."""
    if not hasattr(pipe, "components"):
        raise PlanError(f"{type(pipe).__name__} is not a diffusers pipeline")
    comps = _components(pipe)
    check_device_available(device)
    check_not_meta(comps)
    plan.check_fits(type(pipe).__name__, {n: (type(m).__name__, config_hash(m)) for n, m in comps.items()},
                    {n: weights_dtype(_bytes_by_dtype(m)) for n, m in comps.items()})
    for name, module in comps.items():
        _check_component(name, module, plan.choice.components[name])
    _check_device(plan.choice, device)
    _check_vae(plan.choice, comps)


def _check_component(name: str, module: torch.nn.Module, cplan: ComponentPlan) -> None:
    _check_kept_blocks(name, module, cplan)
    if cplan.fp8 and not hasattr(module, "enable_layerwise_casting"):
        raise PlanError(f"{name}: fp8 storage needs a diffusers model ({type(module).__name__} has no "
                        "enable_layerwise_casting); set its storage_dtype to null")
    if cplan.fp8 and not layerwise_casting_works(module):
        raise PlanError(f"{name}: an fp16 VAE with force_upcast is decoded in fp32, which fp8 casting breaks; "
                        "set its storage_dtype to null")
    tied = tied_weights_split(module, cplan.offload_type) if cplan.offload_to_disk else None
    if tied:
        raise PlanError(f"{name}: offload_to_disk with {cplan.offload_type} would put the tied weights "
                        f"{' = '.join(tied)} in different groups, and diffusers' disk offload then frees one group's "
                        "copy under the other (garbage weights); set offload_to_disk to false for it")
    current = _fp8_dtype_of(module)
    if current is not None and current != cplan.storage_dtype:
        raise PlanError(f"{name}: its weights are already stored in {current} (layerwise casting cannot be undone "
                        f"in process) and the plan needs {cplan.storage_dtype or 'the compute dtype'}: reload {name}")


def _check_kept_blocks(name: str, module: torch.nn.Module, cplan: ComponentPlan) -> None:
    if not cplan.resident_blocks:
        return
    known = set(layout(module).block_names)
    unknown = [b for b in cplan.resident_blocks if b not in known]
    if unknown:
        raise PlanError(f"{name}: resident_blocks {unknown} are not blocks of {type(module).__name__} (its blocks: "
                        f"{', '.join(sorted(known)[:4]) or 'none'}{', ...' if len(known) > 4 else ''}); re-plan or "
                        "name blocks from `memplan show`")
    tied = _tied_outside(module, cplan.resident_blocks)
    if tied:
        raise PlanError(f"{name}: the kept block's weight {' = '.join(tied)} is shared with an offloaded module, and "
                        "offloading it would move the kept copy too; leave that block out of resident_blocks")


def _tied_outside(module: torch.nn.Module, kept: tuple[str, ...]) -> list[str] | None:
    """Names of one tensor held both by a kept block and by a module outside the kept blocks."""
    names: dict[int, list[str]] = {}
    for n, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
    inside = lambda n: any(n.startswith(b + ".") for b in kept)  # noqa: E731
    return next((ns for ns in names.values() if any(map(inside, ns)) and not all(map(inside, ns))), None)


def _check_device(choice: Choice, device: str) -> None:
    needs_accelerator = [n for n, p in choice.components.items()
                         if p.use_stream or p.strategy in (MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD)]
    if needs_accelerator and torch.device(device).type == "cpu":
        raise PlanError(f"{', '.join(needs_accelerator)}: streams and model/sequential offload need an accelerator, "
                        f"the device is {device!r}; apply on a GPU or re-plan with device='cpu'")


def _check_vae(choice: Choice, comps: dict) -> None:
    vae = comps.get("vae")
    for flag, method in ((choice.vae_tiling, "enable_tiling"), (choice.vae_slicing, "enable_slicing")):
        if flag and (vae is None or not hasattr(vae, method)):
            raise PlanError(f"plan asks for vae.{method}() but the pipeline's VAE does not offer it; re-plan")


# ---------------------------------------------------------------- snapshot / restore

class _Snapshot:
    """What a failed apply must put back: every parameter's and buffer's data, accelerate hooks, the VAE flags."""

    def __init__(self, pipe):
        self.tensors = [(t, t.data) for m in _components(pipe).values() for t in [*m.parameters(), *m.buffers()]]
        vae = _components(pipe).get("vae")
        self.vae_flags = (getattr(vae, "use_tiling", None), getattr(vae, "use_slicing", None)) if vae else None
        self.fp8 = {n: _fp8_dtype_of(m) for n, m in _components(pipe).items()}
        modules = [m for c in _components(pipe).values() for m in c.modules()]
        self.hf_hooks = [(m, m._hf_hook) for m in modules if hasattr(m, "_hf_hook")]
        self.registries = [(m, m._diffusers_hook) for m in modules if hasattr(m, "_diffusers_hook")]
        self.attrs = {a: pipe.__dict__.get(a, _MISSING) for a in (_APPLIED_ATTR, "_all_hooks")}

    def restore(self, pipe) -> None:
        _remove_offload_hooks(pipe)
        for name, module in _components(pipe).items():
            if self.fp8[name] is None:  # casting added by the failed apply; the tensors below undo its cast
                _remove_diffusers_hooks(module, _CASTING_HOOKS, force=True)
        known = {id(registry) for _, registry in self.registries}
        for sub in (m for c in _components(pipe).values() for m in c.modules()):
            registry = getattr(sub, "_diffusers_hook", None)
            if registry is not None and id(registry) not in known and not registry.hooks:
                _drop_registry(sub)  # made by the failed apply, which was stopped before it got its hook
        for module, registry in self.registries:  # emptied and dropped above; diffusers makes some at run time
            if not hasattr(module, "_diffusers_hook"):
                module._diffusers_hook = registry
        if self.hf_hooks:  # accelerate offload that was on before (the user's or a previous plan's)
            from accelerate.hooks import add_hook_to_module

            for module, hook in self.hf_hooks:
                if not hasattr(module, "_hf_hook"):
                    add_hook_to_module(module, hook)
        for tensor, data in self.tensors:
            tensor.data = data
        vae = _components(pipe).get("vae")
        if vae is not None and self.vae_flags is not None:
            vae.use_tiling, vae.use_slicing = self.vae_flags
        for attr, value in self.attrs.items():
            if value is _MISSING:
                pipe.__dict__.pop(attr, None)
            else:
                setattr(pipe, attr, None if attr == _APPLIED_ATTR else value)  # apply_plan re-applies a previous plan


def remove_hooks(pipe) -> None:
    """Remove memplan's offloading hooks (diffusers group offloading, accelerate model/sequential offload), with
    disk-offloaded weights read back into RAM. Layerwise-casting hooks stay: fp8 storage cannot be undone in process."""
    _reload_disk_groups(pipe)
    _remove_offload_hooks(pipe)


def _reload_disk_groups(pipe) -> None:
    """Read disk-offloaded groups back into RAM (offload device): while a group is on disk diffusers leaves
    `torch.empty_like` placeholders in its modules, and removing its hook does not load the weights back."""
    groups = {}
    for module in _components(pipe).values():
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            group = getattr(registry.get_hook("group_offloading"), "group", None) if registry is not None else None
            if group is not None and group.offload_to_disk_path and os.path.exists(group.safetensors_file_path):
                groups[id(group)] = group
    if not groups:
        return
    import safetensors.torch

    for group in groups.values():
        loaded = safetensors.torch.load_file(group.safetensors_file_path, device=str(group.offload_device))
        for key, tensor in group.key_to_tensor.items():
            tensor.data = loaded[key]


def _remove_offload_hooks(pipe) -> None:
    if getattr(pipe, "_all_hooks", None) or any(hasattr(m, "_hf_hook") for m in _components(pipe).values()):
        pipe.remove_all_hooks()
    for module in _components(pipe).values():
        _remove_diffusers_hooks(module, _GROUP_HOOKS)
        _release_kept_blocks(module)


def _remove_diffusers_hooks(module: torch.nn.Module, names: tuple[str, ...], force: bool = False) -> None:
    """Remove hooks `names` from every registry in `module`'s tree, then drop the registries this left empty.

    Every submodule is visited: group offloading may hook only blocks (e.g. a VAE whose `encoder`/`decoder`
    are its block modules), so the top module's registry, when there is one, does not reach them all.
    `force` skips the hook's `deinitalize_hook` (layerwise casting raises there): the caller restores the weights."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is None:
            continue
        removed = [name for name in names if registry.get_hook(name) is not None]
        for name in removed:
            if force:
                registry.get_hook(name).deinitalize_hook = lambda m: m
            registry.remove_hook(name, recurse=False)
        if removed and not registry.hooks:
            _drop_registry(sub)


def _drop_registry(sub: torch.nn.Module) -> None:
    """Delete an empty HookRegistry, and the `forward` attribute its last removed hook left on the instance."""
    del sub._diffusers_hook
    forward = sub.__dict__.get("forward")
    if getattr(forward, "__self__", None) is sub and getattr(forward, "__func__", None) is type(sub).forward:
        del sub.forward


# ---------------------------------------------------------------- the knobs

def _apply_storage(module: torch.nn.Module, plan: ComponentPlan) -> None:
    if not plan.fp8 or _fp8_dtype_of(module) == plan.storage_dtype:
        return
    # Irreversible in process: the weights are stored in fp8 from here on (re-casting loses precision).
    module.enable_layerwise_casting(storage_dtype=getattr(torch, plan.storage_dtype),
                                    compute_dtype=compute_dtype(module))


def _apply_group(module: torch.nn.Module, name: str, plan: ComponentPlan, device: str, offload_dir: str | None) -> None:
    from diffusers.hooks import apply_group_offloading

    module.to("cpu")
    disk = None
    if plan.offload_to_disk:
        # A fresh directory each time: diffusers reuses a group's file when it exists, so a directory written for
        # another pipeline (or other weights) would be loaded in place of this module's weights.
        if offload_dir is not None:
            os.makedirs(offload_dir, exist_ok=True)
        disk = tempfile.mkdtemp(prefix=f"{name}-" if offload_dir else f"memplan-{name}-", dir=offload_dir)
    block_modules = layout(module).block_modules if plan.offload_type == BLOCK_LEVEL else None
    with _kept_blocks_hidden(module, plan.resident_blocks):
        apply_group_offloading(
            module, onload_device=torch.device(device), offload_device=torch.device("cpu"),
            offload_type=plan.offload_type, num_blocks_per_group=plan.num_blocks_per_group,
            use_stream=plan.use_stream, record_stream=plan.record_stream,
            low_cpu_mem_usage=plan.low_cpu_mem_usage, offload_to_disk_path=disk,
            block_modules=list(block_modules) if block_modules is not None else None,
        )
    _keep_on_device(module, plan.resident_blocks, device)


# ---------------------------------------------------------------- partial residency
#
# Mechanism: group offloading is applied to the other blocks only. While diffusers builds its groups, each block
# list that holds kept blocks is swapped for a list of its other blocks (`_kept_blocks_hidden`); afterwards the
# original list is put back and the kept blocks are moved to the device (`_keep_on_device`). diffusers never sees
# the kept blocks, so they get no hook, no group, no pinned CPU copy and no disk file, and nothing ever moves them.
# Why this is right for every path:
# - Groups: the other blocks are chunked by num_blocks_per_group in list order, so a group may span a kept block
#   (its members are onloaded at the first's pre-forward and offloaded after the last's forward) — the cost
#   model prices the same chunks (cost_models.memory.block_groups).
# - The unmatched group: diffusers gathers it from `named_parameters()` of the level being walked; with the kept
#   blocks hidden it holds exactly the non-block tensors, as without partial residency.
# - Streams, prefetch order: LazyPrefetchGroupOffloadingHook records the execution order on the first forward from
#   `layer_execution_tracker` hooks, which it registers at apply time only on modules carrying a group hook. Kept
#   blocks carry none, so the recorded chain links each offloaded group to the next offloaded one, skipping kept
#   blocks: group i+1's copy, issued at group i's pre-forward, overlaps group i's compute and every kept block's
#   between them. The kept blocks are placed before the first forward, so that forward runs as every later one.
# - record_stream marks the offloaded groups' onloaded copies as used by the compute stream; kept blocks are
#   never copied or freed, so there is nothing to record.
# - fp8 storage: layerwise casting was applied before (it stays on the kept blocks, which live on the device in
#   the storage dtype and are cast per forward, as everywhere). Disk offload writes only the offloaded groups.
# - Undo: the kept blocks' names are recorded on the component; removing the hooks puts them back on the offload
#   device with the rest of the component (`_release_kept_blocks`), and a failed apply's snapshot restores every
#   tensor anyway. A later `_maybe_remove_and_reapply_group_offloading` (diffusers re-applies after fusing QKV or
#   loading LoRA) would offload the kept blocks too: re-apply the plan after such edits.

_KEPT_ATTR = "_memplan_kept_blocks"


def _kept_by_list(kept: tuple[str, ...]) -> dict[str, set[int]]:
    by_list: dict[str, set[int]] = {}
    for name in kept:
        list_fqn, index = name.rsplit(".", 1)
        by_list.setdefault(list_fqn, set()).add(int(index))
    return by_list


@contextlib.contextmanager
def _kept_blocks_hidden(module: torch.nn.Module, kept: tuple[str, ...]):
    """While open, each block list holding kept blocks is replaced by a ModuleList of its other blocks."""
    swapped = []
    try:
        for list_fqn, indices in _kept_by_list(kept).items():
            parent_fqn, _, attr = list_fqn.rpartition(".")
            parent = module.get_submodule(parent_fqn)
            original = parent._modules[attr]
            parent._modules[attr] = torch.nn.ModuleList(b for i, b in enumerate(original) if i not in indices)
            swapped.append((parent, attr, original))
        yield
    finally:
        for parent, attr, original in reversed(swapped):
            parent._modules[attr] = original


def _keep_on_device(module: torch.nn.Module, kept: tuple[str, ...], device: str) -> None:
    if not kept:
        return
    for name in kept:
        module.get_submodule(name).to(device)
    setattr(module, _KEPT_ATTR, tuple(kept))
    logger.debug("%s: %d blocks kept on %s", type(module).__name__, len(kept), device)


def _release_kept_blocks(module: torch.nn.Module) -> None:
    """Undo of `_keep_on_device`: the kept blocks go back to the offload device with the rest of the component."""
    for name in module.__dict__.pop(_KEPT_ATTR, ()):
        module.get_submodule(name).to("cpu")


def _apply_vae(pipe, choice: Choice) -> None:
    vae = _components(pipe).get("vae")
    if vae is None:
        return
    if hasattr(vae, "enable_tiling"):
        vae.enable_tiling() if choice.vae_tiling else vae.disable_tiling()
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing() if choice.vae_slicing else vae.disable_slicing()


def _apply_placement(pipe, choice: Choice, device: str, offload_dir: str | None) -> None:
    comps = _components(pipe)
    wide = choice.pipeline_strategy
    if wide == MODEL_OFFLOAD:
        pipe.enable_model_cpu_offload(device=device)
    elif wide == SEQUENTIAL_OFFLOAD:
        pipe.enable_sequential_cpu_offload(device=device)
    for name, module in comps.items():
        plan = choice.components[name]
        if plan.strategy == GROUP_OFFLOAD:
            _apply_group(module, name, plan, device, offload_dir)
        elif plan.strategy == RESIDENT:
            module.to(device)


def apply_plan(plan, pipe, device: str, offload_dir: str | None = None) -> None:
    """Apply `plan` to `pipe`; validated before anything is touched, restored if anything fails half-way."""
    validate_plan(plan, pipe, device)
    previous = getattr(pipe, _APPLIED_ATTR, None)
    if previous is not None and previous.choice == plan.choice and previous.device == device:
        logger.info("plan already applied on %s: nothing to do", device)
        return
    _reload_disk_groups(pipe)  # before the snapshot: it must hold weights, not a disk group's placeholders
    snapshot = _Snapshot(pipe)
    try:
        _remove_offload_hooks(pipe)
        for name, module in _components(pipe).items():
            _apply_storage(module, plan.choice.components[name])
        _apply_placement(pipe, plan.choice, device, offload_dir)
        _apply_vae(pipe, plan.choice)
    except BaseException:  # Ctrl-C too: a half-applied plan (half-offloaded, fp8-cast) must not survive
        snapshot.restore(pipe)
        if previous is not None:
            logger.warning("apply failed; re-applying the previous plan")
            apply_plan(previous, pipe, previous.device, offload_dir)
        raise
    setattr(pipe, _APPLIED_ATTR, dataclasses.replace(plan, device=device))
    logger.info("applied plan to %s on %s", plan.pipeline_class, device)
