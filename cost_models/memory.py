"""Peak VRAM and host RAM of a plan, from the profile. Each term reads like the hooks it models.

Peak VRAM while component c runs (every call of the pipeline is one such moment):
    peak(c) = sum_{d != c} resident_bytes(d) + on_device_in_call(c) + activation(c)
Phase peak = max over the components called in that phase; the plan's peak = max over phases.
"""

from __future__ import annotations

from planner.profile_data import ComponentProfile, Unit
from planner.strategy import (BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, RESIDENT,
                              SEQUENTIAL_OFFLOAD, Choice, ComponentPlan, PlanError)

PHASES = {"text_encoder": "encode", "denoiser": "denoise", "vae": "decode"}
# With record_stream, a group's memory returns to the allocator only once the compute stream has passed it,
# so one more group than the two in flight can still be held.
RECORD_STREAM_EXTRA_GROUPS = 1


def unit_bytes(unit: Unit, plan: ComponentPlan) -> int:
    return unit.n_bytes - (unit.fp8_saving_bytes if plan.fp8 else 0)


def stored_bytes(comp: ComponentProfile, plan: ComponentPlan) -> int:
    """Bytes of the component's weights as stored (fp8 halves only the eligible layers)."""
    return comp.total_bytes - (comp.fp8_saving_bytes if plan.fp8 else 0)


def kept_blocks(comp: ComponentProfile, plan: ComponentPlan) -> tuple[Unit, ...]:
    """Partial residency: the blocks named in `resident_blocks` stay on the device for the whole call."""
    if not plan.resident_blocks:
        return ()
    unknown = set(plan.resident_blocks) - {b.name for b in comp.blocks}
    if unknown:
        raise PlanError(f"{comp.name}: resident_blocks {sorted(unknown)} are not blocks of {comp.class_name} "
                        f"(its blocks: {_some_names(comp.blocks)}); name blocks from the profile")
    kept = set(plan.resident_blocks)
    return tuple(b for b in comp.blocks if b.name in kept)


def _some_names(blocks: tuple[Unit, ...], shown: int = 4) -> str:
    names = [b.name for b in blocks]
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "") or "none"


def kept_bytes(comp: ComponentProfile, plan: ComponentPlan) -> int:
    return sum(unit_bytes(u, plan) for u in kept_blocks(comp, plan))


def block_groups(comp: ComponentProfile, plan: ComponentPlan) -> list[list[Unit]]:
    """diffusers' block_level groups: each ModuleList chunked by num_blocks_per_group, in call order
    (blocks kept resident by partial residency are left out of the groups)."""
    n = plan.num_blocks_per_group or 1
    kept = {u.name for u in kept_blocks(comp, plan)}
    groups: list[list[Unit]] = []
    for list_name in comp.block_lists:
        units = [b for b in comp.blocks if b.name.rsplit(".", 1)[0] == list_name and b.name not in kept]
        groups.extend(units[i:i + n] for i in range(0, len(units), n))
    return groups


def _largest_group_bytes(comp: ComponentProfile, plan: ComponentPlan) -> int:
    if plan.offload_type == LEAF_LEVEL:
        return _fp8_scaled(comp.largest_leaf_bytes, comp, plan)
    return max((sum(unit_bytes(u, plan) for u in g) for g in block_groups(comp, plan)), default=0)


def _fp8_scaled(n_bytes: int, comp: ComponentProfile, plan: ComponentPlan) -> int:
    # A largest fp8 leaf smaller than the largest leaf means the largest leaf is skipped by layerwise casting
    # (e.g. proj_out) and keeps its size. Otherwise the largest leaf is fp8-eligible; its stored size is
    # approximated by the component's stored/total ratio (exact when every weight is eligible).
    if not plan.fp8 or comp.largest_fp8_leaf_bytes < comp.largest_leaf_bytes:
        return n_bytes
    return int(n_bytes * stored_bytes(comp, plan) / max(comp.total_bytes, 1))


def groups_in_flight(plan: ComponentPlan) -> int:
    """Groups on the device at once: one without streams; with streams the next is prefetched."""
    if not plan.use_stream:
        return 1
    return 2 + (RECORD_STREAM_EXTRA_GROUPS if plan.record_stream else 0)


def resident_bytes(comp: ComponentProfile, plan: ComponentPlan) -> int:
    """Bytes on the device for the whole pipeline call, whatever runs."""
    if plan.strategy == RESIDENT:
        return stored_bytes(comp, plan)
    return kept_bytes(comp, plan) if plan.strategy == GROUP_OFFLOAD else 0


def in_call_weight_bytes(comp: ComponentProfile, plan: ComponentPlan) -> int:
    """Weight bytes on the device while this component runs."""
    if plan.strategy in (RESIDENT, MODEL_OFFLOAD):
        weights = stored_bytes(comp, plan)
    elif plan.strategy == SEQUENTIAL_OFFLOAD:
        weights = comp.largest_leaf_bytes
    elif plan.offload_type == BLOCK_LEVEL:
        unmatched = unit_bytes(comp.unmatched, plan)  # onloaded for the whole forward
        weights = unmatched + kept_bytes(comp, plan) + groups_in_flight(plan) * _largest_group_bytes(comp, plan)
    else:  # leaf_level: one leaf (+ prefetched ones) at a time
        weights = groups_in_flight(plan) * _largest_group_bytes(comp, plan)
    weights = min(weights, stored_bytes(comp, plan))
    fp8_upcast = comp.largest_fp8_leaf_bytes if plan.fp8 else 0  # the layer being computed, cast up
    return weights + fp8_upcast + _pipeline_upcast_bytes(comp, plan, weights)


def _pipeline_upcast_bytes(comp: ComponentProfile, plan: ComponentPlan, weights: int) -> int:
    """A component the pipeline runs upcast (SDXL's fp16 VAE decoding in fp32): the weights on the device while
    it runs are the fp32 copies, upcast_weight_bytes more for the whole component, pro rata for a part of it."""
    if not comp.upcast_weight_bytes:
        return 0
    return int(comp.upcast_weight_bytes * weights / max(stored_bytes(comp, plan), 1))


def activation_bytes(comp: ComponentProfile, choice: Choice) -> int:
    if comp.role == "vae":
        candidates = [comp.activation_peak_bytes]
        # With a flag on, diffusers runs that path (tiled_decode / per-sample decode): its traced peak replaces
        # the plain one, even where it is larger. Both on: each slice is tiled, bounded by the smaller of the two.
        if choice.vae_tiling and comp.tiled_activation_peak_bytes is not None:
            candidates.append(comp.tiled_activation_peak_bytes)
        if choice.vae_slicing and comp.sliced_activation_peak_bytes is not None:
            candidates.append(comp.sliced_activation_peak_bytes)
        return min(candidates[1:] or candidates)
    return comp.activation_peak_bytes


def phase_peaks(comps: dict[str, ComponentProfile], choice: Choice) -> dict[str, int]:
    """Allocator peak (bytes) per phase: encode, denoise, decode."""
    always = {n: resident_bytes(c, choice.components[n]) for n, c in comps.items()}
    base = sum(always.values())
    peaks: dict[str, int] = {}
    for name, comp in comps.items():
        phase = PHASES.get(comp.role)
        if phase is None or comp.calls_per_run == 0:
            continue
        plan = choice.components[name]
        running = base - always[name] + in_call_weight_bytes(comp, plan) + activation_bytes(comp, choice)
        peaks[phase] = max(peaks.get(phase, 0), running)
    return peaks or {"idle": base}


def host_terms(comp: ComponentProfile, plan: ComponentPlan) -> tuple[int, int]:
    """(held, setup_extra) of one component: the host RAM its offloaded weights hold, and what it needs on top
    for a moment at setup (see host_ram_bytes)."""
    if not plan.offloaded:
        return 0, 0
    if plan.offload_to_disk:  # only the groups being moved pass through host RAM
        return _largest_group_bytes(comp, plan) * groups_in_flight(plan), 0
    stored = stored_bytes(comp, plan) - kept_bytes(comp, plan)  # kept blocks live on the device
    if plan.use_stream and not plan.low_cpu_mem_usage:
        return stored, stored
    if plan.use_stream:  # pinned on each onload: one group's temporary pinned copy
        return stored, groups_in_flight(plan) * _largest_group_bytes(comp, plan)
    return stored, 0


def host_ram_bytes(comps: dict[str, ComponentProfile], choice: Choice) -> int:
    """Host RAM holding offloaded weights, at its peak: sum held + max setup_extra (components are set up one at
    a time).

    Offloaded weights live on the CPU (disk offload: only the group being moved). With streams and
    low_cpu_mem_usage=False, diffusers pins a copy of every offloaded tensor at setup while the original is
    still referenced, so that component briefly needs twice its bytes (the diffusers docs' "~2x")."""
    terms = [host_terms(comp, choice.components[name]) for name, comp in comps.items()]
    return sum(held for held, _ in terms) + max((extra for _, extra in terms), default=0)
