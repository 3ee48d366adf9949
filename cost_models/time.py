"""Seconds per pipeline phase: compute, transfers, overlap — each term carries its equation.

Compute, per traced call (a roofline over its ops, `CallProfile.ops`):
    op(o)      = max(flops_o / (peak(kind, dtype) * efficiency(kind)), bytes_o / (mem_bw * mem_efficiency), launch_s)
    compute(c) = sum_o count_o * op(o)
  efficiency(kind): compute_efficiency (GEMMs), attention_efficiency, conv_efficiency; peak: bf16/fp16 tensor cores; fp32 convolutions TF32 (cuDNN's default; half the bf16 rate on Ampere and later);
  fp32 matmuls and attention on CUDA cores (fp32_flops). A call without ops: flops / (bf16 peak * efficiency).
  On a spec calibrated on the device a device profile ran on, the measured seconds replace the roofline.

Transfers (h2d_x(b) = b / h2d_x_bytes_per_s, x = pinned | pageable; d2h(b) = b / d2h_bytes_per_s):
    resident:        T_run = sum_calls (compute + fp8_cast)
    model offload:   T_run = h2d_pageable(W) + d2h(W) + sum_calls compute          (accelerate: once per pipeline call)
    sequential:      T_call = compute + h2d_pageable(W) + n_modules * module_hook_s (weights go back to meta: no d2h)
    group, no stream T_call = compute + sum_g [h2d_pageable(g) + d2h(g) + sync_s]   (both blocking: they never overlap,
                     so the two directions never share the link)
    group, stream    T_call = h2d_pinned(g_0) + sum_i [sync_s + pin(g_i+1) + max(compute(g_i), h2d_pinned(g_i+1))]
                     + unmatched group (no stream: pageable, blocking, both ways; see streamed_groups_s)
    fp8 storage      fp8_cast = saved_bytes * 6 / (mem_bw * mem_efficiency) + 2 * n_layers * launch_s per call
    disk offload     onload adds page_cache_read(g) (steady state: the OS page cache holds the files when host RAM
                     does; the first call of a process reads them from disk); offload is a pointer swap (no d2h)
    low_cpu_mem_usage / disk with streams: pin(g) = g / pin_bytes_per_s, on the CPU thread before the copy is issued.
"""

from __future__ import annotations

from collections.abc import Sequence

from cost_models.hardware import HardwareSpec
from cost_models.memory import PHASES, block_groups, kept_bytes, stored_bytes, unit_bytes
from planner.profile_data import CallProfile, ComponentProfile, OpStat
from planner.strategy import BLOCK_LEVEL, MODEL_OFFLOAD, RESIDENT, SEQUENTIAL_OFFLOAD, Choice, ComponentPlan

# Bytes of memory traffic per byte saved by fp8 storage on each call, per element of an eligible bf16 layer
# (1 byte saved): the pre-forward upcast reads fp8 (1) and writes bf16 (2), the post-forward downcast back to
# the storage dtype reads bf16 (2) and writes fp8 (1) — 6 bytes per saved byte.
FP8_CAST_TRAFFIC_PER_SAVED_BYTE = 6.0
# Kernels per fp8-stored layer per call: the cast up before the forward and the cast down after it.
FP8_CAST_KERNELS_PER_LAYER = 2
HALF_DTYPES = ("bfloat16", "float16")
MATMUL_KINDS = ("matmul", "attention", "conv")


# ---------------------------------------------------------------- compute

def peak_flops(kind: str, dtype: str, hw: HardwareSpec) -> float:
    """Peak FLOP/s of one op class in one dtype (see the module docstring)."""
    if dtype in HALF_DTYPES:
        return hw.bf16_flops
    if kind == "conv":
        return hw.bf16_flops / 2  # TF32
    return hw.fp32_peak_flops


def efficiency(kind: str, hw: HardwareSpec) -> float:
    """Fraction of peak a kernel family reaches: attention and convolutions have their own, GEMMs (and the few
    FLOPs of other ops) compute_efficiency."""
    return {"attention": hw.attention_efficiency, "conv": hw.conv_efficiency}.get(kind, hw.compute_efficiency)


def op_s(op: OpStat, hw: HardwareSpec) -> float:
    """One launch: max(flops / achieved peak, bytes / achieved bandwidth, launch floor)."""
    compute = op.flops / (peak_flops(op.kind, op.dtype, hw) * efficiency(op.kind, hw)) if op.flops else 0.0
    memory = op.bytes_moved / (hw.mem_bytes_per_s * hw.mem_efficiency)
    return max(compute, memory, hw.launch_s)


def roofline_s(ops: Sequence[OpStat], hw: HardwareSpec) -> float:
    return sum(op.count * op_s(op, hw) for op in ops)


def compute_s(flops: float, hw: HardwareSpec) -> float:
    """A call known only by its FLOPs (no traced ops): all of them at the achieved bf16 rate."""
    return flops / (hw.bf16_flops * hw.compute_efficiency)


def measured_here(comp: ComponentProfile, hw: HardwareSpec) -> bool:
    """A device-backend profile's timings price a plan only on that device: a calibrated spec made on the
    device the profile ran on (calibrate() writes source "calibrate() on <device name>"; exact match, so an
    "H100" profile is not priced with an "H100 PCIe" calibration)."""
    return bool(comp.measured_call_s is not None and comp.measured_on and hw.calibrated
                and hw.source == f"calibrate() on {comp.measured_on}")


def _priced_calls(comp: ComponentProfile, choice: Choice) -> list[tuple[int, float, Sequence[OpStat]]]:
    """(calls per run, FLOPs per call, ops) of each call the component makes under `choice`'s VAE flags: the
    tiled variant replaces the plain call when tiling is on and the trace has one."""
    if not comp.calls:
        flops = comp.flops_per_call
        if comp.role == "vae" and choice.vae_tiling and comp.tiled_flops_per_call is not None:
            flops = comp.tiled_flops_per_call
        return [(comp.calls_per_run, flops, ())]
    tiled = {(c.method, c.phase, c.args): c for c in comp.calls if c.variant == "tiled"}
    out = []
    for call in (c for c in comp.calls if c.variant == ""):
        use: CallProfile = tiled.get((call.method, call.phase, call.args), call) if choice.vae_tiling else call
        out.append((call.calls_per_run, use.flops, use.ops))
    return out


def call_compute_s(comp: ComponentProfile, hw: HardwareSpec, flops: float, ops: Sequence[OpStat] = ()) -> float:
    """One call's compute: measured when the profile ran on this device (scaled by FLOPs, e.g. for tiling),
    else the roofline over its ops, else FLOPs / (peak * efficiency)."""
    if measured_here(comp, hw):
        return comp.measured_call_s * (flops / comp.flops_per_call if comp.flops_per_call else 1.0)
    return roofline_s(ops, hw) if ops else compute_s(flops, hw)


# ---------------------------------------------------------------- transfers

def _pin_s(n_bytes: float, plan: ComponentPlan, hw: HardwareSpec) -> float:
    """Pinning on each onload: low_cpu_mem_usage=True, and disk offload with streams (load_file, then
    pin_memory); without streams nothing is pinned."""
    pins = plan.use_stream and (plan.low_cpu_mem_usage or plan.offload_to_disk)
    return n_bytes / hw.pin_bytes_per_s if pins else 0.0


def _h2d_s(n_bytes: float, plan: ComponentPlan, hw: HardwareSpec) -> float:
    """Host to device: pinned with streams (copies pinned at setup, or pinned on the fly), pageable without;
    disk offload first reads the group's file (page cache)."""
    rate = hw.h2d_pinned_bytes_per_s if plan.use_stream else hw.h2d_pageable_bytes_per_s
    read = n_bytes / hw.page_cache_bytes_per_s if plan.offload_to_disk else 0.0
    return n_bytes / rate + read


def _d2h_s(n_bytes: float, plan: ComponentPlan, hw: HardwareSpec) -> float:
    """Offloading without streams copies back to the CPU (blocking `.to(cpu)`); with streams the CPU copy is
    kept and the offload is a pointer swap; a disk-offloaded group is only dropped: no copy either way."""
    return 0.0 if plan.offload_to_disk or plan.use_stream else n_bytes / hw.d2h_bytes_per_s


def streamed_groups_s(onload_s: Sequence[float], compute_s_: Sequence[float], pin_s: Sequence[float],
                      sync_s: float) -> float:
    """Groups onloaded on a side stream, one prefetched ahead, as diffusers 0.42 schedules it (steady state:
    the first forward of a process records the order without prefetching and is not priced per call).

    Group i's pre-forward waits for its own copy, pins group i+1 (if pinning on the fly), issues its copy, then
    launches group i's kernels; the post-forward synchronises the compute stream. So
        T = onload(g_0) + sum_i [sync_s + pin(g_i+1) + max(compute(g_i), onload(g_i+1))]
    with g_0 onloaded synchronously (nothing before it prefetches it). A function of each group's onload and
    compute seconds, so partial residency can call it with the blocks it keeps left out."""
    if not onload_s:
        return 0.0
    ahead = list(onload_s[1:]) + [0.0]
    pin_ahead = list(pin_s[1:]) + [0.0]
    steps = (sync_s + p + max(c, t) for c, t, p in zip(compute_s_, ahead, pin_ahead))
    return pin_s[0] + onload_s[0] + sum(steps)


def _leaf_call_s(comp: ComponentProfile, plan: ComponentPlan, hw: HardwareSpec, compute: float) -> float:
    """leaf_level: one group per layer. Each leaf's compute is taken proportional to its bytes, so with streams
    sum_i max(c_i, h_i) = max(C, H); leaves are leaf_count groups of stored / leaf_count bytes."""
    stored = stored_bytes(comp, plan)
    n = max(comp.leaf_count, 1)
    if plan.use_stream:
        leaf = stored / n
        return _h2d_s(leaf, plan, hw) + max(compute, _h2d_s(stored, plan, hw)) + n * (hw.sync_s + _pin_s(leaf, plan, hw))
    return compute + _h2d_s(stored, plan, hw) + _d2h_s(stored, plan, hw) + n * hw.sync_s


def _block_call_s(comp: ComponentProfile, plan: ComponentPlan, hw: HardwareSpec, compute: float) -> float:
    groups = block_groups(comp, plan)
    sizes = [sum(unit_bytes(u, plan) for u in g) for g in groups]
    total_flops = sum(u.flops for u in comp.blocks) + comp.unmatched.flops
    share = [sum(u.flops for u in g) / total_flops if total_flops else 0.0 for g in groups]
    if measured_here(comp, hw) and all(u.measured_s is not None for g in groups for u in g):
        blocks_s = [sum(u.measured_s for u in g) for g in groups]
    else:
        blocks_s = [compute * f for f in share]
    rest_bytes = stored_bytes(comp, plan) - sum(sizes) - kept_bytes(comp, plan)  # kept blocks never move
    # the unmatched group has no stream (diffusers builds it with stream=None): onloaded synchronously from
    # pageable memory at the top module's pre-forward, copied back after the forward; its compute (everything
    # outside the blocks) runs unhidden
    rest = ComponentPlan(offload_to_disk=plan.offload_to_disk)
    head = _h2d_s(rest_bytes, rest, hw) + _d2h_s(rest_bytes, rest, hw) + hw.sync_s
    head += max(compute - sum(blocks_s), 0.0)
    if plan.use_stream:
        onloads = [_h2d_s(s, plan, hw) for s in sizes]
        pins = [_pin_s(s, plan, hw) for s in sizes]
        return head + streamed_groups_s(onloads, blocks_s, pins, hw.sync_s)
    moves = sum(_h2d_s(s, plan, hw) + _d2h_s(s, plan, hw) for s in sizes)  # .to(device), then .to(cpu)
    return head + sum(blocks_s) + moves + len(groups) * hw.sync_s


def _fp8_cast_s(comp: ComponentProfile, plan: ComponentPlan, hw: HardwareSpec) -> float:
    if not plan.fp8:
        return 0.0
    traffic = comp.fp8_saving_bytes * FP8_CAST_TRAFFIC_PER_SAVED_BYTE / (hw.mem_bytes_per_s * hw.mem_efficiency)
    return traffic + FP8_CAST_KERNELS_PER_LAYER * comp.leaf_count * hw.launch_s


def _call_s(comp: ComponentProfile, plan: ComponentPlan, hw: HardwareSpec, compute: float) -> float:
    """One call's seconds under the plan, except model offload's once-per-run moves."""
    if plan.strategy in (RESIDENT, MODEL_OFFLOAD):
        return compute + _fp8_cast_s(comp, plan, hw)
    if plan.strategy == SEQUENTIAL_OFFLOAD:
        return compute + stored_bytes(comp, plan) / hw.h2d_pageable_bytes_per_s + comp.leaf_count * hw.module_hook_s
    group = _block_call_s if plan.offload_type == BLOCK_LEVEL else _leaf_call_s
    return group(comp, plan, hw, compute) + _fp8_cast_s(comp, plan, hw)


def component_run_s(comp: ComponentProfile, plan: ComponentPlan, choice: Choice, hw: HardwareSpec) -> float:
    """Seconds this component costs one pipeline call (all its calls, and its transfers)."""
    calls = _priced_calls(comp, choice)
    if sum(n for n, _, _ in calls) == 0:
        return 0.0
    total = sum(n * _call_s(comp, plan, hw, call_compute_s(comp, hw, flops, ops)) for n, flops, ops in calls)
    if plan.strategy == MODEL_OFFLOAD:  # accelerate: onloaded at its first call, offloaded when the next runs
        stored = stored_bytes(comp, plan)
        total += stored / hw.h2d_pageable_bytes_per_s + stored / hw.d2h_bytes_per_s
    return total


def phase_seconds(comps: dict[str, ComponentProfile], choice: Choice, hw: HardwareSpec) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, comp in comps.items():
        phase = PHASES.get(comp.role)
        if phase is not None:
            out[phase] = out.get(phase, 0.0) + component_run_s(comp, choice.components[name], choice, hw)
    return out
