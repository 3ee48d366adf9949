"""Seconds per pipeline phase: compute, transfers, overlap — each term carries its equation.

compute(call)  = FLOPs / (peak bf16 FLOP/s * efficiency)   (or the device profile's measured time on that device)
transfer(x)    = bytes(x) / bandwidth(pinned | pageable | disk)
no streams:      T_call = compute + sum_g (h2d(g) + d2h(g)) + n_groups * sync   (disk: h2d += read, d2h = 0)
streams:         T_call = h2d(g_0) + sum_g max(compute(g), h2d(g+1)) + n_groups * sync
model offload:   T_run  = calls * compute + h2d(component) + d2h(component)   (once per pipeline call)
"""

from __future__ import annotations

from cost_models.hardware import HardwareSpec
from cost_models.memory import PHASES, block_groups, kept_bytes, stored_bytes, unit_bytes
from planner.profile_data import ComponentProfile
from planner.strategy import BLOCK_LEVEL, MODEL_OFFLOAD, RESIDENT, SEQUENTIAL_OFFLOAD, Choice, ComponentPlan

# Bytes of memory traffic per byte saved by fp8 storage on each call, per element of an eligible bf16 layer
# (1 byte saved): the pre-forward upcast reads fp8 (1) and writes bf16 (2), the post-forward downcast back to
# the storage dtype reads bf16 (2) and writes fp8 (1) — 6 bytes per saved byte.
FP8_CAST_TRAFFIC_PER_SAVED_BYTE = 6.0
# accelerate's sequential offload runs an AlignDevicesHook per module with weights: more Python per move
# than a diffusers group hook.
SEQUENTIAL_HOOK_SYNCS = 3
# Pinning on every onload (low_cpu_mem_usage=True) copies through host memory first: a pageable-speed pass.
PIN_ON_ONLOAD_USES_PAGEABLE = True


def compute_s(flops: float, hw: HardwareSpec) -> float:
    return flops / (hw.bf16_flops * hw.compute_efficiency)


def measured_here(comp: ComponentProfile, hw: HardwareSpec) -> bool:
    """A device-backend profile's timings price a plan only on that device: a calibrated spec made on the
    device the profile ran on (calibrate() writes source "calibrate() on <device name>"; exact match, so an
    "H100" profile is not priced with an "H100 PCIe" calibration)."""
    return bool(comp.measured_call_s is not None and comp.measured_on and hw.calibrated
                and hw.source == f"calibrate() on {comp.measured_on}")


def call_compute_s(comp: ComponentProfile, hw: HardwareSpec, flops: float) -> float:
    """One call's compute: measured when the profile ran on this device (scaled by FLOPs, e.g. for tiling),
    else FLOPs / (peak * efficiency)."""
    if measured_here(comp, hw):
        return comp.measured_call_s * (flops / comp.flops_per_call if comp.flops_per_call else 1.0)
    return compute_s(flops, hw)


def _group_compute_s(comp: ComponentProfile, group, hw: HardwareSpec, scale: float) -> float:
    if measured_here(comp, hw) and all(u.measured_s is not None for u in group):
        return scale * sum(u.measured_s for u in group)
    return compute_s(scale * sum(u.flops for u in group), hw)


def _h2d_s(n_bytes: float, plan: ComponentPlan, hw: HardwareSpec) -> float:
    pinned = plan.use_stream and not (plan.low_cpu_mem_usage and PIN_ON_ONLOAD_USES_PAGEABLE)
    rate = hw.h2d_pinned_bytes_per_s if pinned else hw.h2d_pageable_bytes_per_s
    disk = n_bytes / hw.disk_read_bytes_per_s if plan.offload_to_disk else 0.0
    return n_bytes / rate + disk


def _d2h_s(n_bytes: float, plan: ComponentPlan, hw: HardwareSpec) -> float:
    """Offloading without streams copies back to the CPU; a disk-offloaded group was written once at setup
    and is only dropped (replaced by an empty CPU tensor): no copy."""
    return 0.0 if plan.offload_to_disk else n_bytes / hw.d2h_bytes_per_s


def _call_flops(comp: ComponentProfile, choice: Choice) -> float:
    if comp.role == "vae" and choice.vae_tiling and comp.tiled_flops_per_call is not None:
        return comp.tiled_flops_per_call
    return comp.flops_per_call


def _fp8_cast_s(comp: ComponentProfile, plan: ComponentPlan, hw: HardwareSpec) -> float:
    return comp.fp8_saving_bytes * FP8_CAST_TRAFFIC_PER_SAVED_BYTE / hw.mem_bytes_per_s if plan.fp8 else 0.0


def _group_call_s(comp: ComponentProfile, plan: ComponentPlan, hw: HardwareSpec, flops: float) -> float:
    """One call under group offloading."""
    if plan.offload_type == BLOCK_LEVEL:
        return _block_call_s(comp, plan, hw, flops)
    # leaf_level: many small groups; with streams each leaf's copy hides behind the previous leaf's compute
    stored = stored_bytes(comp, plan)
    sync = comp.leaf_count * hw.sync_s
    if plan.use_stream:
        return max(call_compute_s(comp, hw, flops), _h2d_s(stored, plan, hw)) + sync
    return call_compute_s(comp, hw, flops) + _h2d_s(stored, plan, hw) + _d2h_s(stored, plan, hw) + sync


def _block_call_s(comp: ComponentProfile, plan: ComponentPlan, hw: HardwareSpec, flops: float) -> float:
    groups = block_groups(comp, plan)
    sizes = [sum(unit_bytes(u, plan) for u in g) for g in groups]
    scale = flops / comp.flops_per_call if comp.flops_per_call else 1.0
    compute = [_group_compute_s(comp, g, hw, scale) for g in groups]
    rest_bytes = stored_bytes(comp, plan) - sum(sizes) - kept_bytes(comp, plan)  # kept blocks never move
    # the unmatched group is synchronous (no stream, pageable) and moves on every call — from disk too with
    # offload_to_disk; its compute runs outside blocks
    rest_plan = ComponentPlan(offload_to_disk=plan.offload_to_disk)
    head = _h2d_s(rest_bytes, rest_plan, hw) + _d2h_s(rest_bytes, rest_plan, hw)
    head += max(call_compute_s(comp, hw, flops) - sum(compute), 0.0)
    sync = len(groups) * hw.sync_s
    if plan.use_stream:  # T = h2d(g0) + sum_g max(compute(g), h2d(g+1)); offload is a pointer swap
        transfers = [_h2d_s(s, plan, hw) for s in sizes]
        ahead = transfers[1:] + [0.0]
        first = transfers[0] if transfers else 0.0
        return head + first + sum(max(c, t) for c, t in zip(compute, ahead)) + sync
    moves = sum(_h2d_s(s, plan, hw) + _d2h_s(s, plan, hw) for s in sizes)  # .to(device), then .to(cpu)
    return head + sum(compute) + moves + sync


def component_run_s(comp: ComponentProfile, plan: ComponentPlan, choice: Choice, hw: HardwareSpec) -> float:
    """Seconds this component costs one pipeline call (all its calls, and its transfers)."""
    calls = comp.calls_per_run
    if calls == 0:
        return 0.0
    flops = _call_flops(comp, choice)
    cast = _fp8_cast_s(comp, plan, hw)
    if plan.strategy == RESIDENT:
        return calls * (call_compute_s(comp, hw, flops) + cast)
    stored = stored_bytes(comp, plan)
    if plan.strategy == MODEL_OFFLOAD:
        once = stored / hw.h2d_pageable_bytes_per_s + stored / hw.d2h_bytes_per_s
        return once + calls * (call_compute_s(comp, hw, flops) + cast)
    if plan.strategy == SEQUENTIAL_OFFLOAD:
        per_call = stored / hw.h2d_pageable_bytes_per_s + comp.leaf_count * SEQUENTIAL_HOOK_SYNCS * hw.sync_s
        return calls * (call_compute_s(comp, hw, flops) + per_call)
    return calls * (_group_call_s(comp, plan, hw, flops) + cast)


def phase_seconds(comps: dict[str, ComponentProfile], choice: Choice, hw: HardwareSpec) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, comp in comps.items():
        phase = PHASES.get(comp.role)
        if phase is not None:
            out[phase] = out.get(phase, 0.0) + component_run_s(comp, choice.components[name], choice, hw)
    return out
