"""Partial residency applied (planner.apply, `resident_blocks`) on tiny real pipelines, on CPU.

What CPU can check, and how:
- Output: every mechanism that runs on CPU (block_level n=1 / n=2, fp8 storage, disk) gives exactly the output of
  the unmodified pipeline (fp8: of fp8 storage alone).
- Placement: on CPU the onload and offload devices are the same, so "on the device" is checked two ways: applied
  with onload device `meta` (no forward), kept blocks' tensors are on meta and the others on the CPU; and during a
  real call, `WeightPlacement` (a TorchFunctionMode plus spies on diffusers' `ModuleGroup.onload_/offload_`) fails
  any op that reads an offloaded weight, and records that no group ever moves a kept block's tensor.
- Streams: CUDA streams cannot run here. `cpu_streams()` runs diffusers' own stream code path with a CPU stream
  object (it builds the config `apply_group_offloading` would build, minus its refusal of CPU streams; pinning and
  record_stream are recorded instead of done). That checks what diffusers does with the hooks: the prefetch chain
  recorded on the first forward, which tensors are pinned, which get record_stream, and the output. It cannot
  check real asynchrony, overlap or when CUDA frees memory: the GPU check measures those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from unittest import mock

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from conftest import build_tiny, run_tiny
from planner.apply import apply_plan, remove_hooks
from planner.grouping import layout
from planner.plan import Plan
from planner.strategy import BLOCK_LEVEL, GROUP_OFFLOAD, ComponentPlan, PlanError
from test_apply import DENOISER, E4M3, group_offloading_spy, hook_names, make_plan, modules, pipe_state, reference

BLOCK1 = ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1)
BLOCK2 = ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 2)
_GROUP_HOOKS = {"group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"}
# Tensor methods that read metadata only (e.g. `module.dtype` walks the parameters with is_floating_point):
# allowed on an offloaded weight, as they are on a CPU one.
_METADATA = {"__get__", "__set__", "is_floating_point", "is_complex", "size", "dim", "numel", "element_size"}


def kept_sets(pipe) -> dict[str, tuple[str, ...]]:
    """Every other block of every component (the first of each pair): kept blocks between offloaded ones,
    in the denoiser, the VAE and the text encoders' nested layers."""
    return {n: layout(m).block_names[::2] for n, m in modules(pipe).items()}


def residency_plan(pipe, base: ComponentPlan, kept: dict[str, tuple[str, ...]] | None = None, **kw) -> Plan:
    kept = kept_sets(pipe) if kept is None else kept
    return make_plan(pipe, **{n: dataclasses.replace(base, resident_blocks=kept.get(n, ()), **kw)
                              for n in modules(pipe)})


def tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def group_hooks_in(module: torch.nn.Module) -> set[str]:
    """Offloading hooks anywhere in `module`'s tree (layerwise casting hooks do not count)."""
    return {h for sub in module.modules() if hasattr(sub, "_diffusers_hook")
            for h in sub._diffusers_hook.hooks if h in _GROUP_HOOKS}


def all_groups(module: torch.nn.Module) -> list:
    found = {}
    for sub in module.modules():
        hook = sub._diffusers_hook.get_hook("group_offloading") if hasattr(sub, "_diffusers_hook") else None
        if hook is not None:
            found[id(hook.group)] = hook.group
    return list(found.values())


def group_tensors(group) -> list[torch.Tensor]:
    if group.offload_to_disk_path:
        return list(group.tensor_to_key)
    return [t for m in group.modules for t in tensors_of(m)] + list(group.parameters) + list(group.buffers)


class WeightPlacement(TorchFunctionMode):
    """Fails any op that reads a weight of a group-offloaded component (those named in `kept`) while its group is
    offloaded (kept blocks' weights are always on the device); records every tensor a group moves."""

    def __init__(self, pipe, kept: dict[str, tuple[str, ...]]):
        super().__init__()
        comps = modules(pipe)
        self.watched = {id(t): f"{c}.{n}" for c, m in comps.items() if c in kept
                        for n, t in [*m.named_parameters(), *m.named_buffers()]}
        self.kept = {id(t) for c, names in kept.items() for b in names for t in tensors_of(comps[c].get_submodule(b))}
        self.onloaded: Counter = Counter()
        self.moved: set[int] = set()
        self.offloaded_reads: list[str] = []
        self._in_group = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._in_group and getattr(func, "__name__", "") not in _METADATA:
            for arg in tree_flatten((args, kwargs))[0]:
                key = id(arg)
                if key in self.watched and key not in self.kept and self.onloaded[key] <= 0:
                    self.offloaded_reads.append(self.watched[key])
        return func(*args, **kwargs)

    def _spy(self, original, step: int):
        def moving(group):
            self._in_group += 1
            try:
                original(group)
            finally:
                self._in_group -= 1
            for t in group_tensors(group):
                self.moved.add(id(t))
                self.onloaded[id(t)] = max(self.onloaded[id(t)] + step, 0)
        return moving

    @contextlib.contextmanager
    def watching(self):
        from diffusers.hooks.group_offloading import ModuleGroup

        with mock.patch.object(ModuleGroup, "onload_", self._spy(ModuleGroup.onload_, +1)), \
                mock.patch.object(ModuleGroup, "offload_", self._spy(ModuleGroup.offload_, -1)), self:
            yield self


@contextlib.contextmanager
def cpu_streams():
    """diffusers' stream path on CPU (module docstring). Yields the tensors pinned and those given record_stream."""
    from diffusers.hooks import group_offloading as go

    seen = {"pinned": [], "recorded": []}

    def apply(module, onload_device, offload_device, offload_type, num_blocks_per_group=None, non_blocking=False,
              use_stream=False, record_stream=False, low_cpu_mem_usage=False, offload_to_disk_path=None,
              block_modules=None, exclude_kwargs=None):
        config = go.GroupOffloadingConfig(
            onload_device=onload_device, offload_device=offload_device, offload_type=go.GroupOffloadingType(offload_type),
            non_blocking=non_blocking, record_stream=record_stream, low_cpu_mem_usage=low_cpu_mem_usage,
            num_blocks_per_group=num_blocks_per_group, offload_to_disk_path=offload_to_disk_path,
            stream=torch.cpu.Stream() if use_stream else None,
            block_modules=block_modules if block_modules is not None else getattr(module, "_group_offload_block_modules", None),
            exclude_kwargs=getattr(module, "_skip_keys", None))
        go._apply_group_offloading(module, config)

    def pin(tensor, *args, **kwargs):
        seen["pinned"].append(tensor.data_ptr())
        return tensor.clone()  # a separate host copy, as pinning makes

    with mock.patch("diffusers.hooks.apply_group_offloading", apply), mock.patch("planner.apply._check_device"), \
            mock.patch.object(torch.Tensor, "pin_memory", pin), \
            mock.patch.object(torch.Tensor, "record_stream", lambda t, s: seen["recorded"].append(t.data_ptr())), \
            mock.patch.object(torch.cpu.Stream, "synchronize", lambda s: None, create=True):
        yield seen


# ---------------------------------------------------------------- output and placement

# SDXL (slow here under WeightPlacement) once, with n=2: its groups span kept blocks in the UNet and the VAE.
@pytest.mark.parametrize(("tiny_kind", "base"), [("flux", BLOCK1), ("flux", BLOCK2), ("sdxl", BLOCK2),
                                                 ("flux", dataclasses.replace(BLOCK1, offload_to_disk=True))],
                         ids=["flux-n1", "flux-n2", "sdxl-n2", "flux-disk"])
def test_kept_blocks_give_the_same_output_and_are_never_moved(tiny_kind, base, tmp_path):
    pipe = build_tiny(tiny_kind)
    kept = kept_sets(pipe)
    plan = residency_plan(pipe, base, kept)
    if base.offload_to_disk:  # T5 ties shared.weight across groups: disk is refused for it (test_apply); resident
        kept.pop("text_encoder_2", None)
        plan = make_plan(pipe, **{n: p for n, p in plan.choice.components.items() if n in kept})
    apply_plan(plan, pipe, "cpu", offload_dir=str(tmp_path))
    with WeightPlacement(pipe, kept).watching() as placement:
        out = run_tiny(pipe)
        again = run_tiny(pipe)
    assert torch.equal(out, reference(tiny_kind)) and torch.equal(again, reference(tiny_kind))
    assert placement.offloaded_reads == []
    assert placement.moved and not placement.moved & placement.kept
    for name, module in modules(pipe).items():
        for block in layout(module).block_names if name in kept else ():
            hooks = group_hooks_in(module.get_submodule(block))
            assert hooks == (set() if block in kept.get(name, ()) else {"group_offloading"}), (name, block, hooks)


def test_kept_blocks_are_placed_on_the_onload_device():
    """Onload device `meta` (a device other than the CPU that needs no accelerator): kept blocks end there, the
    offloaded groups and the unmatched modules on the CPU. (memplan refuses a meta target and diffusers asks torch
    for a `torch.meta` backend module, only used for streams: both stubbed.)"""
    pipe = build_tiny("flux")
    kept = kept_sets(pipe)
    with mock.patch("diffusers.hooks.group_offloading.TorchDeviceBackend"), \
            mock.patch("planner.apply.check_device_available"):
        apply_plan(residency_plan(pipe, BLOCK1, kept), pipe, "meta")
    for name, module in modules(pipe).items():
        kept_ids = {id(t) for b in kept[name] for t in tensors_of(module.get_submodule(b))}
        devices = {id(t): t.device.type for t in tensors_of(module)}
        assert kept_ids and {devices[i] for i in kept_ids} == {"meta"}, name
        assert {d for i, d in devices.items() if i not in kept_ids} == {"cpu"}, name


def test_kept_blocks_with_fp8_storage_equal_fp8_alone():
    tiny_kind = "flux"
    denoiser = DENOISER[tiny_kind]
    fp8_only = build_tiny(tiny_kind)
    make_plan(fp8_only, **{denoiser: ComponentPlan(storage_dtype=E4M3)}).apply(fp8_only)
    both = build_tiny(tiny_kind)
    kept = {denoiser: kept_sets(both)[denoiser]}
    make_plan(both, **{denoiser: dataclasses.replace(BLOCK1, storage_dtype=E4M3, resident_blocks=kept[denoiser])}
              ).apply(both)
    kept_block = getattr(both, denoiser).get_submodule(kept[denoiser][0])
    assert E4M3 in {str(p.dtype).removeprefix("torch.") for p in kept_block.parameters()}  # stored in fp8, kept
    with WeightPlacement(both, kept).watching() as placement:
        assert torch.equal(run_tiny(both), run_tiny(fp8_only))
    assert placement.offloaded_reads == []


def test_the_block_lists_are_the_originals_after_apply():
    """The kept blocks are hidden from diffusers only while it builds its groups."""
    pipe = build_tiny("flux")
    lists = {n: [id(m.get_submodule(f)) for f in layout(m).lists] for n, m in modules(pipe).items()}
    apply_plan(residency_plan(pipe, BLOCK1), pipe, "cpu")
    assert lists == {n: [id(m.get_submodule(f)) for f in layout(m).lists] for n, m in modules(pipe).items()}
    assert len(pipe.transformer.transformer_blocks) == 2


# ---------------------------------------------------------------- the stream path (diffusers' code, CPU stream)

def _chain(module: torch.nn.Module) -> list[str]:
    """Block names in the order diffusers' prefetch chain onloads them (from the hooks' next_group links)."""
    names = {id(m): n for n, m in module.named_modules()}
    hooks = [sub._diffusers_hook.get_hook("group_offloading") for sub in module.modules()
             if hasattr(sub, "_diffusers_hook") and sub._diffusers_hook.get_hook("group_offloading") is not None]
    by_group = {id(h.group): h for h in hooks}
    targets = {id(h.next_group) for h in hooks if h.next_group is not None}
    heads = [h for h in hooks if h.next_group is not None and id(h.group) not in targets]
    chain = []
    for head in heads:
        hook = head
        while hook.next_group is not None:
            chain += [names[id(m)] for m in hook.next_group.modules] or [f"<{len(hook.next_group.parameters)} params>"]
            hook = by_group[id(hook.next_group)]
    return chain


@contextlib.contextmanager
def call_order(pipe):
    """Yields, per component, the names of its blocks in the order they run."""
    ran: dict[str, list[str]] = {n: [] for n in modules(pipe)}
    handles = [m.get_submodule(b).register_forward_pre_hook(lambda mod, args, n=n, b=b: ran[n].append(b))
               for n, m in modules(pipe).items() for b in layout(m).block_names]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("flags", [{}, {"record_stream": True}, {"low_cpu_mem_usage": True}],
                         ids=["stream", "record_stream", "low_cpu_mem_usage"])
def test_streams_chain_the_offloaded_blocks_only(flags):
    pipe = build_tiny("flux")
    kept = kept_sets(pipe)
    with cpu_streams() as seen:
        apply_plan(residency_plan(pipe, dataclasses.replace(BLOCK1, use_stream=True, **flags), kept), pipe, "cpu")
        pinned_at_setup = set(seen["pinned"])
        with WeightPlacement(pipe, kept).watching() as placement, call_order(pipe) as ran:
            out = run_tiny(pipe)
        assert torch.equal(out, reference("flux"))
        assert torch.equal(run_tiny(pipe), reference("flux"))  # the second call runs the recorded chain
    assert placement.offloaded_reads == [] and not placement.moved & placement.kept
    for name, module in modules(pipe).items():
        offloaded = [b for b in dict.fromkeys(ran[name]) if b not in kept[name]]  # the VAE encoder's never run
        # the first forward recorded the order without the kept blocks: each offloaded block prefetches the next
        assert offloaded and [b for b in _chain(module) if b in layout(module).block_names] == offloaded, name
        # the recording is over wherever a forward ran (the VAE's encoder never runs and keeps its trackers)
        assert all("layer_execution_tracker" not in module.get_submodule(b)._diffusers_hook.hooks
                   for b in offloaded), name
        kept_ptrs = {t.data_ptr() for b in kept[name] for t in tensors_of(module.get_submodule(b))}
        # host RAM: kept blocks hold no pinned copy; record_stream only on copies of offloaded groups
        assert not kept_ptrs & pinned_at_setup and not kept_ptrs & set(seen["recorded"])
        for group in all_groups(module):
            assert not {id(t) for t in group_tensors(group)} & placement.kept
    assert bool(seen["recorded"]) == bool(flags.get("record_stream"))
    assert bool(pinned_at_setup) == (not flags.get("low_cpu_mem_usage"))


def test_t5_blocks_stream_without_nested_prefetch_hooks():
    """block_modules=["encoder"] alone gives T5 two levels with prefetch hooks and diffusers raises; memplan's
    layout makes `shared` a block module too, so each encoder layer is streamed."""
    import diffusers.hooks

    t5 = build_tiny("flux").text_encoder_2
    assert layout(t5).block_modules == ("encoder", "shared")
    with cpu_streams(), pytest.raises(ValueError, match="Hook with name layer_execution_tracker already exists"):
        diffusers.hooks.apply_group_offloading(t5, onload_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"), offload_type="block_level",
                                               num_blocks_per_group=1, use_stream=True, block_modules=["encoder"])


# ---------------------------------------------------------------- undo, failure, validation

def test_remove_hooks_puts_the_pipeline_back():
    pipe = build_tiny("flux")
    before = pipe_state(pipe)
    values = {k: t.clone() for k, t in pipe.transformer.state_dict().items()}
    apply_plan(residency_plan(pipe, BLOCK2), pipe, "cpu")
    run_tiny(pipe)
    remove_hooks(pipe)
    after = pipe_state(pipe)
    assert hook_names(pipe) == {} and after["tensors"] == before["tensors"]
    assert not any(hasattr(m, "_memplan_kept_blocks") for m in modules(pipe).values())
    assert all(torch.equal(t, values[k]) for k, t in pipe.transformer.state_dict().items())
    assert torch.equal(run_tiny(pipe), reference("flux"))


def test_a_failure_with_kept_blocks_restores_everything():
    tiny_kind = "flux"
    pipe = build_tiny(tiny_kind)
    before = pipe_state(pipe)
    with group_offloading_spy(fail_at=3), pytest.raises(RuntimeError, match="injected failure"):
        residency_plan(pipe, BLOCK1).apply(pipe)
    assert pipe_state(pipe) == before
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))


def test_a_plan_replacing_one_with_kept_blocks_offloads_them():
    tiny_kind = "flux"
    pipe = build_tiny(tiny_kind)
    residency_plan(pipe, BLOCK1).apply(pipe)
    make_plan(pipe, BLOCK1).apply(pipe)
    for name, module in modules(pipe).items():
        for block in layout(module).block_names:
            assert group_hooks_in(module.get_submodule(block)) == {"group_offloading"}, (name, block)
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))


def test_unknown_kept_blocks_are_refused_untouched():
    pipe = build_tiny("flux")
    before = pipe_state(pipe)
    bad = dataclasses.replace(BLOCK1, resident_blocks=("transformer_blocks.0", "transformer_blocks.9"))
    with pytest.raises(PlanError, match=r"transformer: resident_blocks \['transformer_blocks.9'\] are not blocks of "
                                        r"FluxTransformer2DModel \(its blocks: single_transformer_blocks.0"):
        make_plan(pipe, transformer=bad).apply(pipe)
    assert pipe_state(pipe) == before


def test_a_hand_written_plan_names_its_kept_blocks(tmp_path):
    pipe = build_tiny("flux")
    data = make_plan(pipe).to_dict()
    data["choice"]["components"]["transformer"] = {
        "strategy": "group_offload", "offload_type": "block_level", "num_blocks_per_group": 1,
        "resident_blocks": ["single_transformer_blocks.1", "transformer_blocks.0"]}
    data["choice"]["components"]["text_encoder_2"] = {
        "strategy": "group_offload", "offload_type": "block_level", "num_blocks_per_group": 1,
        "resident_blocks": ["encoder.block.1"]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    plan = Plan.load(path)
    assert plan.choice.components["transformer"].resident_blocks == ("single_transformer_blocks.1",
                                                                     "transformer_blocks.0")
    plan.apply(pipe)
    assert group_hooks_in(pipe.transformer.transformer_blocks[0]) == set()
    assert group_hooks_in(pipe.text_encoder_2.encoder.block[0]) == {"group_offloading"}
    assert group_hooks_in(pipe.text_encoder_2.encoder.block[1]) == set()
    assert torch.equal(run_tiny(pipe), reference("flux"))
