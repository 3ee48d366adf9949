"""Cost models on hand-computed cases, properties on random profiles, and calibrate() without a GPU.

The synthetic pipeline below is built by hand: every byte and FLOP is chosen, so every expected peak and every
expected second is worked out in the comments (in MB = 10**6 bytes), never copied from the code's output.

    text_encoder  80 MB, no block lists (all "unmatched"), fp8 saves 30, activation 5, 0.2 TFLOP, 1 call
    transformer   block lists double (2 x 100 MB, fp8 saves 40 each, 2 TFLOP each)
                              single (3 x  60 MB, fp8 saves 24 each, 1 TFLOP each)
                  unmatched 30 MB (fp8 saves 6, 0.5 TFLOP)  -> 410 MB, fp8 saves 158, 7.5 TFLOP per call
                  50 leaves, largest 20 MB (proj_out, not fp8-eligible), largest fp8 leaf 16 MB
                  activation 50 MB, 4 calls (4 steps, no CFG)
    vae           40 MB, no block lists, fp8 saves 15, activation 120 (tiled 30, sliced 70), 1 TFLOP
                  (tiled 1.2 TFLOP), 1 call
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cost_models import calibrate as cal
from cost_models.estimate import card_bytes, estimate
from cost_models.hardware import GPUS, HardwareSpec, get_gpu, save_spec
from cost_models.memory import block_groups, groups_in_flight, resident_bytes, stored_bytes, unit_bytes
from cost_models.time import component_run_s
from planner.profile_data import ComponentProfile, Profile, Unit
from planner.strategy import (BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, RESIDENT, SEQUENTIAL_OFFLOAD,
                              Choice, ComponentPlan)
from planner.workload import Workload

MB = 10**6
TFLOP = 1e12
FP8 = "float8_e4m3fn"


# ---------------------------------------------------------------- the hand-made pipeline

def _unit(name: str, mb: int, fp8_mb: int, tflop: float) -> Unit:
    return Unit(name, mb * MB, fp8_mb * MB, tflop * TFLOP)


def _component(name: str, role: str, blocks: tuple[Unit, ...], unmatched: Unit, **fields) -> ComponentProfile:
    units = (*blocks, unmatched)
    lists: dict[str, int] = {}
    for b in blocks:
        lists[b.name.split(".")[0]] = lists.get(b.name.split(".")[0], 0) + 1
    total = sum(u.n_bytes for u in units)
    return ComponentProfile(
        name=name, class_name=name.title(), config_hash="0", role=role, param_bytes_by_dtype={"bfloat16": total},
        buffer_bytes=0, fp8_saving_bytes=sum(u.fp8_saving_bytes for u in units), block_lists=lists, blocks=blocks,
        unmatched=unmatched, flops_per_call=sum(u.flops for u in units), activation_peak_module="x", **fields)


def text_encoder() -> ComponentProfile:
    return _component("text_encoder", "text_encoder", (), _unit("unmatched", 80, 30, 0.2), leaf_count=10,
                      largest_leaf_bytes=8 * MB, largest_fp8_leaf_bytes=8 * MB, calls_per_run=1,
                      activation_peak_bytes=5 * MB)


def transformer(**overrides) -> ComponentProfile:
    blocks = (_unit("double.0", 100, 40, 2), _unit("double.1", 100, 40, 2),
              _unit("single.0", 60, 24, 1), _unit("single.1", 60, 24, 1), _unit("single.2", 60, 24, 1))
    comp = _component("transformer", "denoiser", blocks, _unit("unmatched", 30, 6, 0.5), leaf_count=50,
                      largest_leaf_bytes=20 * MB, largest_fp8_leaf_bytes=16 * MB, calls_per_run=4,
                      activation_peak_bytes=50 * MB)
    return dataclasses.replace(comp, **overrides)


def vae() -> ComponentProfile:
    return _component("vae", "vae", (), _unit("unmatched", 40, 15, 1), leaf_count=20, largest_leaf_bytes=4 * MB,
                      largest_fp8_leaf_bytes=4 * MB, calls_per_run=1, activation_peak_bytes=120 * MB,
                      tiled_activation_peak_bytes=30 * MB, tiled_flops_per_call=1.2 * TFLOP,
                      sliced_activation_peak_bytes=70 * MB, supports_tiling=True, supports_slicing=True)


def synthetic(**transformer_overrides) -> Profile:
    comps = {"text_encoder": text_encoder(), "transformer": transformer(**transformer_overrides), "vae": vae()}
    return Profile("SyntheticPipeline", "synthetic", Workload(64, 64, 4), comps)


# Round numbers, so every second below is hand-computable: 100 TFLOP/s x 0.5 = 50 TFLOP/s effective.
HW = HardwareSpec(name="hand-made", vram_bytes=24 * 2**30, bf16_flops=100e12, mem_bytes_per_s=1e12, pcie_gen=4,
                  h2d_pinned_bytes_per_s=20e9, h2d_pageable_bytes_per_s=10e9, d2h_bytes_per_s=25e9, fp8=True,
                  source="test", compute_efficiency=0.5, context_bytes=0, reserved_over_allocated=1.0,
                  sync_s=1e-3, disk_read_bytes_per_s=2e9, mem_efficiency=1.0, launch_s=0.0, module_hook_s=3e-3,
                  pin_bytes_per_s=5e9, page_cache_bytes_per_s=2e9)


def block(n: int = 1, **kw) -> ComponentPlan:
    return ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, n, **kw)


def leaf(**kw) -> ComponentPlan:
    return ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL, **kw)


def choice(transformer_plan: ComponentPlan = ComponentPlan(), *, text_encoder_plan: ComponentPlan = ComponentPlan(),
           vae_plan: ComponentPlan = ComponentPlan(), **flags) -> Choice:
    return Choice({"text_encoder": text_encoder_plan, "transformer": transformer_plan, "vae": vae_plan}, **flags)


def every(plan: ComponentPlan) -> Choice:
    return choice(plan, text_encoder_plan=plan, vae_plan=plan)


def peaks_mb(prof: Profile, ch: Choice) -> dict[str, float]:
    return {k: v / MB for k, v in estimate(prof, ch, HW).phase_peak_bytes.items()}


# ---------------------------------------------------------------- peak VRAM, by hand

def test_all_resident():
    # every phase holds all three components: 80 + 410 + 40 = 530 MB, plus the running one's activation
    est = estimate(synthetic(), choice(), HW)
    assert est.phase_peak_bytes == {"encode": (530 + 5) * MB, "denoise": (530 + 50) * MB,
                                    "decode": (530 + 120) * MB}
    assert est.peak_phase == "decode" and est.allocated_peak_bytes == 650 * MB


def test_card_bytes_adds_allocator_overhead_and_context():
    # 650 MB x 1.1 = 715 MB reserved, plus a 600 MiB context = 715_000_000 + 629_145_600
    hw = dataclasses.replace(HW, reserved_over_allocated=1.1, context_bytes=600 * 2**20)
    assert card_bytes(650 * MB, hw) == 1_344_145_600
    assert estimate(synthetic(), choice(), hw).card_peak_bytes == 1_344_145_600


def test_model_offload_holds_only_the_running_component():
    # accelerate offloads the previous model before onloading the next: weights + activation of the one running
    assert peaks_mb(synthetic(), every(ComponentPlan(MODEL_OFFLOAD))) == {
        "encode": 80 + 5, "denoise": 410 + 50, "decode": 40 + 120}


def test_sequential_offload_holds_one_leaf():
    # one leaf on the device at a time: largest leaves 8, 20, 4 MB
    assert peaks_mb(synthetic(), every(ComponentPlan(SEQUENTIAL_OFFLOAD))) == {
        "encode": 8 + 5, "denoise": 20 + 50, "decode": 4 + 120}


# Transformer group-offloaded, text encoder and VAE resident (80 + 40 = 120 MB) + 50 MB activation = 170 MB,
# plus the transformer's weights on the device during its call:
@pytest.mark.parametrize("plan,weights_mb", [
    # unmatched 30 (on for the whole forward) + one group; n=1 largest group = one double block, 100
    (block(1), 30 + 100),
    # n=2 chunks each list: double [0:2] = 200, single [0:2] = 120, single [2:3] = 60 -> 200
    (block(2), 30 + 200),
    # n=3 never crosses lists: double [0:2] = 200 (only 2 blocks), single [0:3] = 180 -> 200
    (block(3), 30 + 200),
    # streams: the running group + the prefetched one = 2 x 100
    (block(1, use_stream=True), 30 + 2 * 100),
    # record_stream: one more group still held until the compute stream passes it = 3 x 100
    (block(1, use_stream=True, record_stream=True), 30 + 3 * 100),
    # low_cpu_mem_usage changes host RAM, not VRAM
    (block(1, use_stream=True, low_cpu_mem_usage=True), 30 + 2 * 100),
    # leaf_level: one leaf (largest 20 MB) at a time; with streams 2, with record_stream 3
    (leaf(), 20),
    (leaf(use_stream=True), 2 * 20),
    (leaf(use_stream=True, record_stream=True), 3 * 20),
    # disk offload moves the same groups through VRAM as memory offload
    (block(1, offload_to_disk=True), 30 + 100),
])
def test_group_offload_peaks(plan, weights_mb):
    peaks = peaks_mb(synthetic(), choice(plan))
    assert peaks["denoise"] == 120 + weights_mb + 50
    # outside its call the transformer holds nothing: encode 80 + 40 + 5, decode 80 + 40 + 120
    assert peaks["encode"] == 125 and peaks["decode"] == 240


def test_group_offload_never_holds_more_than_the_whole_component():
    # one list of 1 block + unmatched: streams would count 2 x the block, but only 30 + 100 MB exist
    prof = synthetic(blocks=(_unit("double.0", 100, 40, 2),), block_lists={"double": 1},
                     fp8_saving_bytes=46 * MB, param_bytes_by_dtype={"bfloat16": 130 * MB})
    assert peaks_mb(prof, choice(block(1, use_stream=True)))["denoise"] == 120 + 130 + 50


def test_fp8_resident_shrinks_only_eligible_bytes_and_adds_the_upcast_buffer():
    # stored 410 - 158 = 252 MB; the running layer is upcast: + largest fp8 leaf 16 MB
    peaks = peaks_mb(synthetic(), choice(ComponentPlan(storage_dtype=FP8)))
    assert peaks["denoise"] == 80 + 40 + 252 + 16 + 50
    # other phases see the stored fp8 bytes, no upcast: 80 + 252 + 40 (+5 / +120)
    assert peaks["encode"] == 372 + 5 and peaks["decode"] == 372 + 120


def test_fp8_block_level():
    # unmatched 30 - 6 = 24; groups after fp8: double 100 - 40 = 60, single 60 - 24 = 36 -> 60; + upcast 16
    assert peaks_mb(synthetic(), choice(block(1, storage_dtype=FP8)))["denoise"] == 120 + 24 + 60 + 16 + 50
    # with streams two groups: 24 + 2 x 60 + 16
    assert peaks_mb(synthetic(), choice(block(1, use_stream=True, storage_dtype=FP8)))["denoise"] == \
        120 + 24 + 120 + 16 + 50


def test_fp8_leaf_level_keeps_an_ineligible_largest_leaf():
    # the largest leaf (20 MB) is not fp8-eligible (the largest fp8 leaf is 16): it keeps its 20 MB; + upcast 16
    assert peaks_mb(synthetic(), choice(leaf(storage_dtype=FP8)))["denoise"] == 120 + 20 + 16 + 50


def test_fp8_leaf_level_scales_an_eligible_largest_leaf():
    # largest leaf 20 MB and eligible: its stored size is taken as 20 x stored/total = 20 x 252/410 MB
    # = 20e6 x 252e6 / 410e6 = 12_292_682.93 -> 12_292_682 bytes; + upcast 20 MB
    prof = synthetic(largest_fp8_leaf_bytes=20 * MB)
    assert estimate(prof, choice(leaf(storage_dtype=FP8)), HW).phase_peak_bytes["denoise"] == \
        (120 + 20 + 50) * MB + 12_292_682


def test_fp8_can_raise_the_peak_of_a_single_layer_component():
    # A component that is one 20 MB bf16 layer: fp8 stores 10 MB but computes with the 20 MB upcast copy beside
    # it: 10 + 20 = 30 MB > 20 MB. That is what layerwise casting allocates, so the model keeps it.
    one = _unit("unmatched", 20, 10, 0.1)
    tiny = _component("transformer", "denoiser", (), one, leaf_count=1, largest_leaf_bytes=20 * MB,
                      largest_fp8_leaf_bytes=20 * MB, calls_per_run=1, activation_peak_bytes=0)
    prof = Profile("P", "p", Workload(64, 64, 1), {"transformer": tiny})
    plain = estimate(prof, Choice({"transformer": ComponentPlan()}), HW).allocated_peak_bytes
    fp8 = estimate(prof, Choice({"transformer": ComponentPlan(storage_dtype=FP8)}), HW).allocated_peak_bytes
    assert (plain, fp8) == (20 * MB, 30 * MB)


@pytest.mark.parametrize("flags,decode_activation_mb", [
    ({}, 120),
    ({"vae_tiling": True}, 30),  # the tiled decode's traced peak
    ({"vae_slicing": True}, 70),  # one sample at a time
    ({"vae_tiling": True, "vae_slicing": True}, 30),  # each slice tiled: bounded by the smaller, 30
])
def test_vae_tiling_and_slicing_bound_the_decode_activation(flags, decode_activation_mb):
    assert peaks_mb(synthetic(), choice(**flags))["decode"] == 530 + decode_activation_mb


def test_vae_tiling_uses_the_tiled_peak_even_when_larger():
    # with tiling on, diffusers runs tiled_decode: its traced peak applies even if it exceeds the plain one
    prof = synthetic()
    comps = dict(prof.components, vae=dataclasses.replace(vae(), tiled_activation_peak_bytes=150 * MB))
    prof = dataclasses.replace(prof, components=comps)
    assert peaks_mb(prof, choice(vae_tiling=True))["decode"] == 530 + 150


# ---------------------------------------------------------------- host RAM, by hand

@pytest.mark.parametrize("ch,ram_mb", [
    (choice(), 0),  # everything on the GPU
    (every(ComponentPlan(MODEL_OFFLOAD)), 80 + 410 + 40),  # all weights live on the CPU
    (every(ComponentPlan(SEQUENTIAL_OFFLOAD)), 80 + 410 + 40),
    (choice(block(1)), 410),
    # streams with pre-pinning: every tensor is pinned while the original is still referenced: 2 x 410
    (choice(block(1, use_stream=True)), 410 + 410),
    (choice(block(1, use_stream=True, record_stream=True)), 410 + 410),
    (choice(leaf(use_stream=True)), 410 + 410),
    # pinned on each onload instead: the groups in flight get a temporary pinned copy, 2 x 100
    (choice(block(1, use_stream=True, low_cpu_mem_usage=True)), 410 + 2 * 100),
    # fp8 storage: the stored 252 MB is what is offloaded (and pinned twice)
    (choice(block(1, use_stream=True, storage_dtype=FP8)), 252 + 252),
    # disk: only the groups being moved pass through host RAM: 1 x 100, with streams 2 x 100
    (choice(block(1, offload_to_disk=True)), 100),
    (choice(block(1, use_stream=True, offload_to_disk=True)), 2 * 100),
    # setup is one component at a time: the duplicate is the largest one's, 80 + 410 + max(80, 410)
    (choice(block(1, use_stream=True), text_encoder_plan=leaf(use_stream=True)), 80 + 410 + 410),
])
def test_host_ram(ch, ram_mb):
    assert estimate(synthetic(), ch, HW).host_ram_bytes == ram_mb * MB


# ---------------------------------------------------------------- seconds, by hand
# compute at 50 TFLOP/s: transformer 7.5 TFLOP = 0.15 s per call (double block 0.04, single 0.02, unmatched
# 0.01); text encoder 0.2 TFLOP = 0.004 s; VAE 1 TFLOP = 0.02 s (tiled 1.2 TFLOP = 0.024 s).
# transfers: pageable H2D 10 GB/s, pinned 20 GB/s, D2H 25 GB/s, disk 2 GB/s: 1 MB costs 1e-4 s pageable,
# 5e-5 s pinned, 4e-5 s back, 5e-4 s from disk.

def seconds(ch: Choice, prof: Profile | None = None, hw: HardwareSpec = HW) -> dict[str, float]:
    return estimate(prof or synthetic(), ch, hw).phase_s


def test_resident_seconds_are_compute_only():
    assert seconds(choice()) == pytest.approx({"encode": 0.004, "denoise": 4 * 0.15, "decode": 0.02})


def test_model_offload_pays_its_transfers_once_per_run():
    # transformer: 410 MB in (pageable) 0.041 s + out 0.0164 s = 0.0574, once; + 4 calls x 0.15
    # text encoder: 80 MB: 0.008 + 0.0032 + 0.004; VAE 40 MB: 0.004 + 0.0016 + 0.02
    assert seconds(every(ComponentPlan(MODEL_OFFLOAD))) == pytest.approx(
        {"encode": 0.0152, "denoise": 0.0574 + 0.6, "decode": 0.0256})
    # twice the calls add only compute: 4 more x 0.15
    eight = synthetic(calls_per_run=8)
    assert seconds(every(ComponentPlan(MODEL_OFFLOAD)), eight)["denoise"] == pytest.approx(0.0574 + 1.2)


def test_sequential_offload_moves_everything_every_call():
    # per call: 0.15 compute + 410 MB pageable 0.041 + 50 leaves x 3 ms accelerate hook = 0.341; x 4 calls
    assert seconds(every(ComponentPlan(SEQUENTIAL_OFFLOAD)))["denoise"] == pytest.approx(4 * 0.341)


def test_block_level_without_streams_pays_every_group_every_call():
    # unmatched 30 MB in + out: 30 x (1e-4 + 4e-5) = 0.0042, + its compute 0.01
    # blocks: 380 MB in + out = 380 x 1.4e-4 = 0.0532; compute 2 x 0.04 + 3 x 0.02 = 0.14; 6 groups x 1 ms
    per_call = 0.0042 + 0.01 + 0.0532 + 0.14 + 0.006  # = 0.2134
    assert seconds(choice(block(1)))["denoise"] == pytest.approx(4 * per_call)
    assert seconds(choice(block(1)), synthetic(calls_per_run=8))["denoise"] == pytest.approx(8 * per_call)


def test_block_level_streams_hide_transfers_behind_compute():
    # pinned: blocks in 100 MB -> 0.005, 60 MB -> 0.003. T = h2d(g0) + sum_g [sync + max(compute(g), h2d(g+1))]:
    # 0.005 + max(.04,.005) + max(.04,.003) + max(.02,.003) + max(.02,.003) + max(.02, 0) = 0.005 + 0.14, + 5 syncs
    # head: the unmatched group has no stream: 30 MB pageable in + out 0.0042 + its compute 0.01 + its sync 0.001
    per_call = 0.0152 + 0.005 + 0.14 + 0.005
    assert seconds(choice(block(1, use_stream=True)))["denoise"] == pytest.approx(4 * per_call)


def test_block_level_streams_on_a_slow_link_are_transfer_bound():
    # pinned 1 GB/s: blocks in 0.1, 0.1, 0.06, 0.06, 0.06 s; 0.1 + max(.04,.1) + max(.04,.06) + max(.02,.06)
    # + max(.02,.06) + max(.02,0) = 0.1 + 0.1 + 0.06 + 0.06 + 0.06 + 0.02 = 0.4
    slow = dataclasses.replace(HW, h2d_pinned_bytes_per_s=1e9)
    per_call = 0.0152 + 0.4 + 0.005
    assert seconds(choice(block(1, use_stream=True)), hw=slow)["denoise"] == pytest.approx(4 * per_call)


def test_leaf_level_seconds():
    # no streams: 0.15 + 410 MB in 0.041 + out 0.0164 + 50 leaves x 1 ms = 0.2574 per call
    assert seconds(choice(leaf()))["denoise"] == pytest.approx(4 * 0.2574)
    # streams: the first leaf (410 / 50 MB pinned) 0.00041 synchronous, then max(0.15, 410 MB pinned 0.0205)
    # + 50 leaves x 1 ms = 0.20041 per call
    assert seconds(choice(leaf(use_stream=True)))["denoise"] == pytest.approx(4 * 0.20041)


def test_fp8_cast_costs_memory_traffic_every_call():
    # 158 MB saved x 6 bytes of traffic per saved byte (upcast 1 + 2, downcast 2 + 1) at 1 TB/s = 0.000948 s
    assert seconds(choice(ComponentPlan(storage_dtype=FP8)))["denoise"] == pytest.approx(4 * (0.15 + 0.000948))
    # with block_level, the moved bytes are the stored fp8 ones: groups 60 + 60 + 36 x 3 = 228 MB, unmatched 24
    # 24 x 1.4e-4 + 0.01 + 228 x 1.4e-4 + 0.14 + 6 syncs 0.006 + 0.000948 = 0.192228
    assert seconds(choice(block(1, storage_dtype=FP8)))["denoise"] == pytest.approx(4 * 0.192228)


def test_disk_offload_reads_every_group_and_writes_nothing_back():
    # each group (unmatched included) is read (page cache, 2 GB/s) and copied in: 1 MB = 5e-4 + 1e-4 = 6e-4 s;
    # dropping a group copies nothing. unmatched 30 x 6e-4 = 0.018 + compute 0.01; blocks 380 x 6e-4 = 0.228
    # + 0.14; + 6 syncs 0.006
    assert seconds(choice(block(1, offload_to_disk=True)))["denoise"] == pytest.approx(4 * 0.402)


def test_vae_tiling_prices_the_tiled_flops():
    assert seconds(choice(vae_tiling=True))["decode"] == pytest.approx(0.024)


# ---------------------------------------------------------------- properties on random profiles

@st.composite
def units(draw, name: str, min_leaves: int = 1) -> tuple[Unit, list[tuple[int, bool]]]:
    """A unit made of bf16 leaves (even byte counts); an fp8-eligible leaf saves half its bytes."""
    leaves = draw(st.lists(st.tuples(st.integers(1, 10**6).map(lambda x: 2 * x), st.booleans()),
                           min_size=min_leaves, max_size=5))
    flops = draw(st.floats(0, 1e12))
    return Unit(name, sum(b for b, _ in leaves), sum(b // 2 for b, e in leaves if e), flops), leaves


@st.composite
def components(draw, name: str, role: str) -> ComponentProfile:
    lists = draw(st.lists(st.integers(1, 6), max_size=2))
    blocks, leaves = [], []
    for i, length in enumerate(lists):
        for j in range(length):
            unit, ls = draw(units(f"list{i}.{j}"))
            blocks.append(unit)
            leaves += ls
    rest, ls = draw(units("unmatched", min_leaves=0 if blocks else 1))
    leaves += ls
    fields = dict(leaf_count=len(leaves), largest_leaf_bytes=max(b for b, _ in leaves),
                  largest_fp8_leaf_bytes=max((b for b, e in leaves if e), default=0),
                  calls_per_run=draw(st.integers(1, 6)), activation_peak_bytes=draw(st.integers(0, 10**7)))
    if role == "vae":
        fields.update(tiled_activation_peak_bytes=draw(st.integers(0, 10**7)), supports_tiling=True,
                      tiled_flops_per_call=draw(st.floats(0, 1e12)),
                      sliced_activation_peak_bytes=draw(st.integers(0, 10**7)), supports_slicing=True)
    return _component(name, role, tuple(blocks), rest, **fields)


@st.composite
def profiles(draw) -> Profile:
    comps = {n: draw(components(n, r)) for n, r in
             (("text_encoder", "text_encoder"), ("transformer", "denoiser"), ("vae", "vae"))}
    return Profile("P", "p", Workload(64, 64, 1), comps)


def group_plans(fp8: bool | None = None):
    """Every group_offload plan `validate` accepts (fp8 as given, or either)."""
    dtype = st.sampled_from([None, FP8]) if fp8 is None else st.just(FP8 if fp8 else None)
    streamed = st.builds(lambda lvl, rec, low, disk, d: ComponentPlan(
        GROUP_OFFLOAD, lvl, 1 if lvl == BLOCK_LEVEL else None, True, rec, low, disk, d),
        st.sampled_from([BLOCK_LEVEL, LEAF_LEVEL]), st.booleans(), st.booleans(), st.booleans(), dtype)
    plain = st.builds(lambda n, disk, d: ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL if n else LEAF_LEVEL, n or None,
                                                       offload_to_disk=disk, storage_dtype=d),
                      st.integers(0, 7), st.booleans(), dtype)
    return st.one_of(streamed, plain)


def per_component_plans():
    return st.one_of(st.builds(lambda d: ComponentPlan(storage_dtype=d), st.sampled_from([None, FP8])),
                     group_plans())


@st.composite
def choices(draw, pipeline_wide: bool = True) -> Choice:
    """A valid Choice; pipeline_wide=False: per-component strategies only (resident / group offload)."""
    names = ("text_encoder", "transformer", "vae")
    flags = dict(vae_tiling=draw(st.booleans()), vae_slicing=draw(st.booleans()))
    wide = draw(st.sampled_from([None, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD] if pipeline_wide else [None]))
    if wide is not None:
        dtypes = [None] if wide == SEQUENTIAL_OFFLOAD else [None, FP8]
        return Choice({n: ComponentPlan(wide, storage_dtype=draw(st.sampled_from(dtypes))) for n in names}, **flags)
    return Choice({n: draw(per_component_plans()) for n in names}, **flags)


def _with(ch: Choice, name: str, plan: ComponentPlan) -> Choice:
    return dataclasses.replace(ch, components={**ch.components, name: plan})


def _peaks(prof: Profile, ch: Choice) -> dict[str, int]:
    return estimate(prof, ch, HW).phase_peak_bytes


def _never_higher(lower: dict[str, int], higher: dict[str, int]) -> None:
    assert lower.keys() == higher.keys()
    assert all(lower[k] <= higher[k] for k in lower), (lower, higher)


NAMES = st.sampled_from(["text_encoder", "transformer", "vae"])
SETTINGS = settings(max_examples=100, deadline=None)


@SETTINGS
@given(profiles(), choices(pipeline_wide=False), NAMES, group_plans(), st.sampled_from([None, FP8]))
def test_group_offloading_a_resident_component_never_raises_any_phase_peak(prof, ch, name, plan, dtype):
    plan = dataclasses.replace(plan, storage_dtype=dtype)
    _never_higher(_peaks(prof, _with(ch, name, plan)), _peaks(prof, _with(ch, name, ComponentPlan(storage_dtype=dtype))))


@SETTINGS
@given(profiles(), st.booleans(), st.booleans())
def test_resident_then_model_then_sequential_offload_never_raise_a_peak(prof, tiling, slicing):
    flags = dict(vae_tiling=tiling, vae_slicing=slicing)
    resident, model, sequential = (Choice({n: ComponentPlan(s) for n in prof.components}, **flags)
                                   for s in (RESIDENT, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD))
    _never_higher(_peaks(prof, model), _peaks(prof, resident))
    _never_higher(_peaks(prof, sequential), _peaks(prof, model))


@SETTINGS
@given(profiles(), choices(pipeline_wide=False), st.integers(1, 4), st.integers(1, 4), st.booleans(), st.booleans())
def test_splitting_groups_never_raises_the_peak(prof, ch, n, k, disk, fp8):
    """What holds is divisibility: a group of n*k blocks is a union of k groups of n, so n never needs more than
    n*k. Plain "fewer blocks per group" does not hold (see the next test)."""
    dtype = FP8 if fp8 else None
    small, big = (block(m, offload_to_disk=disk, storage_dtype=dtype) for m in (n, n * k))
    _never_higher(_peaks(prof, _with(ch, "transformer", small)), _peaks(prof, _with(ch, "transformer", big)))


def test_fewer_blocks_per_group_can_raise_the_peak_when_it_does_not_divide():
    # one list of 4 blocks sized 0, 0, 10, 10 (+ a 1 MB remainder): diffusers chunks from block 0, so
    # n=2 -> [0+0], [10+10] = 20 MB, but n=3 -> [0+0+10], [10] = 10 MB
    sizes = (0, 0, 10, 10)
    blocks = tuple(_unit(f"blocks.{i}", s, 0, 0) for i, s in enumerate(sizes))
    comp = _component("transformer", "denoiser", blocks, _unit("unmatched", 1, 0, 0), leaf_count=4,
                      largest_leaf_bytes=10 * MB, largest_fp8_leaf_bytes=0, calls_per_run=1, activation_peak_bytes=0)
    prof = Profile("P", "p", Workload(64, 64, 1), {"transformer": comp})
    peak = {n: estimate(prof, Choice({"transformer": block(n)}), HW).allocated_peak_bytes for n in (2, 3)}
    assert peak == {2: 21 * MB, 3: 11 * MB}


@SETTINGS
@given(profiles(), choices(pipeline_wide=False), st.sampled_from([BLOCK_LEVEL, LEAF_LEVEL]), st.booleans())
def test_streams_and_record_stream_never_lower_the_peak(prof, ch, level, fp8):
    n, dtype = (1 if level == BLOCK_LEVEL else None), (FP8 if fp8 else None)
    plain, streamed, recorded = (ComponentPlan(GROUP_OFFLOAD, level, n, s, r, storage_dtype=dtype)
                                 for s, r in ((False, False), (True, False), (True, True)))
    peaks = [_peaks(prof, _with(ch, "transformer", p)) for p in (plain, streamed, recorded)]
    _never_higher(peaks[0], peaks[1])
    _never_higher(peaks[1], peaks[2])


@SETTINGS
@given(profiles(), choices(), NAMES)
def test_fp8_never_raises_a_phase_the_component_does_not_run_in(prof, ch, name):
    plan = ch.components[name]
    assume(plan.strategy != SEQUENTIAL_OFFLOAD)
    plain, fp8 = (_peaks(prof, _with(ch, name, dataclasses.replace(plan, storage_dtype=d))) for d in (None, FP8))
    own = {"text_encoder": "encode", "transformer": "denoise", "vae": "decode"}[name]
    _never_higher({k: v for k, v in fp8.items() if k != own}, {k: v for k, v in plain.items() if k != own})


def _in_flight_saving(comp: ComponentProfile, plan: ComponentPlan) -> int:
    """fp8 bytes saved at least, in what is on the device during the component's call."""
    if plan.strategy in (RESIDENT, MODEL_OFFLOAD):
        return comp.fp8_saving_bytes
    groups = block_groups(comp, plan)
    least = min((sum(u.fp8_saving_bytes for u in g) for g in groups), default=0)
    return min(comp.fp8_saving_bytes, comp.unmatched.fp8_saving_bytes + groups_in_flight(plan) * least)


@SETTINGS
@given(profiles(), choices(pipeline_wide=False), NAMES, st.sampled_from([RESIDENT, MODEL_OFFLOAD, BLOCK_LEVEL]),
       group_plans(fp8=False))
def test_fp8_never_raises_the_peak_when_it_saves_at_least_the_upcast_buffer(prof, ch, name, kind, group):
    """fp8 stores eligible weights in 1 byte but computes each layer with an upcast copy (the largest fp8 leaf):
    the peak cannot rise wherever the bytes saved on the device during the call are at least that copy. That is
    the case for resident, model-offloaded and block-level components of real models (many layers per block);
    a one-layer component or leaf_level, whose in-flight saving is one layer, can pay more (see the hand test)."""
    if kind == MODEL_OFFLOAD:  # pipeline-wide
        ch = Choice({n: ComponentPlan(MODEL_OFFLOAD) for n in prof.components}, ch.vae_tiling, ch.vae_slicing)
    plan = {RESIDENT: ComponentPlan(), MODEL_OFFLOAD: ComponentPlan(MODEL_OFFLOAD),
            BLOCK_LEVEL: group if group.offload_type == BLOCK_LEVEL else block(1)}[kind]
    comp = prof.components[name]
    assume(_in_flight_saving(comp, plan) >= comp.largest_fp8_leaf_bytes)
    plain, fp8 = (_peaks(prof, _with(ch, name, dataclasses.replace(plan, storage_dtype=d))) for d in (None, FP8))
    _never_higher(fp8, plain)


@SETTINGS
@given(profiles(), choices())
def test_peak_covers_everything_resident_at_one_moment(prof, ch):
    est = estimate(prof, ch, HW)
    held = sum(resident_bytes(c, ch.components[n]) for n, c in prof.components.items())
    assert est.allocated_peak_bytes >= held
    for name, comp in prof.components.items():
        phase = {"text_encoder": "encode", "denoiser": "denoise", "vae": "decode"}[comp.role]
        plan = ch.components[name]
        # its activation beside everything resident but itself, and the weights it has on the device
        others = held - resident_bytes(comp, plan)
        activation = comp.activation_peak_bytes
        if comp.role == "vae" and (ch.vae_tiling or ch.vae_slicing):
            activation = min([comp.tiled_activation_peak_bytes] * ch.vae_tiling
                             + [comp.sliced_activation_peak_bytes] * ch.vae_slicing)
        assert est.phase_peak_bytes[phase] >= others + activation
        if plan.strategy in (RESIDENT, MODEL_OFFLOAD):
            assert est.phase_peak_bytes[phase] >= others + stored_bytes(comp, plan) + activation
        elif plan.strategy == GROUP_OFFLOAD and plan.offload_type == BLOCK_LEVEL:
            # the remainder is on the device for the whole forward, and at least one group
            biggest = max((sum(unit_bytes(u, plan) for u in g) for g in block_groups(comp, plan)), default=0)
            assert est.phase_peak_bytes[phase] >= others + unit_bytes(comp.unmatched, plan) + biggest + activation


@SETTINGS
@given(profiles(), choices(), NAMES)
def test_more_residency_never_costs_time(prof, ch, name):
    plan = ch.components[name]
    assume(plan.strategy != SEQUENTIAL_OFFLOAD or not plan.fp8)
    comp = prof.components[name]
    resident = ComponentPlan(storage_dtype=plan.storage_dtype)
    assert component_run_s(comp, resident, ch, HW) <= component_run_s(comp, plan, ch, HW) * (1 + 1e-12)


@SETTINGS
@given(profiles(), choices(), st.sampled_from([BLOCK_LEVEL, LEAF_LEVEL]), st.booleans())
def test_streams_never_cost_time_when_pinned_is_at_least_pageable(prof, ch, level, fp8):
    # T_stream = h2d(g0) + sum max(c_g, h2d(g+1)) <= sum c_g + sum h2d_pinned(g) <= sum c_g + sum (h2d_pageable + d2h)
    assert HW.h2d_pinned_bytes_per_s >= HW.h2d_pageable_bytes_per_s
    n, dtype = (1 if level == BLOCK_LEVEL else None), (FP8 if fp8 else None)
    plain, streamed = (ComponentPlan(GROUP_OFFLOAD, level, n, s, storage_dtype=dtype) for s in (False, True))
    comp = prof.components["transformer"]
    assert component_run_s(comp, streamed, ch, HW) <= component_run_s(comp, plain, ch, HW) * (1 + 1e-12)


# ---------------------------------------------------------------- calibrate(), without a GPU

def test_calibrate_without_cuda_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"calibrate\(\) needs a CUDA GPU"):
        cal.calibrate()


def test_calibrate_refuses_a_non_cuda_device():
    with pytest.raises(RuntimeError, match=r"calibrate\(\) needs a CUDA GPU.*'cpu'"):
        cal.calibrate(device="cpu")


@pytest.mark.parametrize("device_name,gib,key", [
    ("NVIDIA GeForce RTX 4090", 23.6, "rtx-4090"),
    ("NVIDIA H100 80GB HBM3", 79.2, "h100"),
    ("NVIDIA H100 PCIe", 79.2, "h100-pcie"),
    ("NVIDIA H200", 140.4, "h200"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", 39.4, "a100-40gb"),
    ("NVIDIA GeForce RTX 4060 Ti", 15.6, "rtx-4060-ti-16gb"),
    ("NVIDIA GeForce RTX 4060 Ti", 7.6, "rtx-4060-ti-8gb"),  # not the plain 4060
    ("NVIDIA GeForce RTX 4070 SUPER", 11.6, None),  # a SUPER is not the 4070
    ("NVIDIA GeForce RTX 4090 Laptop GPU", 15.6, None),
    ("Tesla T4", 14.6, "t4"),
    ("NVIDIA A10G", 22.1, "a10g"),
    ("NVIDIA L4", 22.0, "l4"),
    ("NVIDIA RTX 6000 Ada Generation", 47.5, "rtx-6000-ada"),
    ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", 95.0, None),
])
def test_table_entry_matches_device_names(device_name, gib, key):
    found = cal.table_entry(device_name, int(gib * 2**30))
    assert (found.name if found else None) == key


def _measured(**kw) -> cal.Measurements:
    fields = dict(device_name="NVIDIA GeForce RTX 4090", total_bytes=25_393_692_672, h2d_pinned_bytes_per_s=24e9,
                  h2d_pageable_bytes_per_s=11e9, d2h_bytes_per_s=9e9, mem_bytes_per_s=900e9, matmul_flops=150e12,
                  attention_flops=100e12, context_bytes=500 * 2**20, fp8_capable=True)
    return cal.Measurements(**{**fields, **kw})


def test_spec_from_measurements_keeps_the_datasheet_peak_of_a_known_card():
    spec = cal.spec_from_measurements(_measured(), "my-4090")
    table = GPUS["rtx-4090"]
    # GEMM 150 TFLOP/s and attention 100 TFLOP/s against the 165.2 datasheet peak
    assert spec.compute_efficiency == pytest.approx(150e12 / 165.2e12)
    assert spec.attention_efficiency == pytest.approx(100e12 / 165.2e12) and spec.mem_efficiency == 1.0
    assert (spec.bf16_flops, spec.pcie_gen, spec.fp8) == (table.bf16_flops, table.pcie_gen, table.fp8)
    assert (spec.name, spec.vram_bytes, spec.context_bytes) == ("my-4090", 25_393_692_672, 500 * 2**20)
    assert (spec.h2d_pinned_bytes_per_s, spec.h2d_pageable_bytes_per_s, spec.d2h_bytes_per_s,
            spec.mem_bytes_per_s) == (24e9, 11e9, 9e9, 900e9)
    assert spec.calibrated and spec.source == "calibrate() on NVIDIA GeForce RTX 4090"
    # figures nothing measures keep the table's (fitted) values
    assert (spec.reserved_over_allocated, spec.sync_s, spec.conv_efficiency) == (
        table.reserved_over_allocated, table.sync_s, table.conv_efficiency)
    assert spec.fitted_from == ()


def test_spec_from_measurements_of_an_unknown_card_uses_the_measured_peak(tmp_path):
    spec = cal.spec_from_measurements(_measured(device_name="NVIDIA RTX PRO 4500 Blackwell",
                                                total_bytes=51_000_000_000, h2d_pinned_bytes_per_s=26e9), "ws")
    assert spec.bf16_flops == 150e12  # the measured GEMM rate is the peak
    assert spec.compute_efficiency == 1.0 and spec.attention_efficiency == pytest.approx(100 / 150)
    assert spec.pcie_gen == 4 and spec.fp8  # 26 GB/s pinned: a Gen4 x16 link; fp8 from compute capability
    save_spec(spec, tmp_path / "ws.json")
    assert get_gpu(tmp_path / "ws.json") == spec


def test_spec_efficiency_is_capped_at_one():
    # a card that beats its datasheet (boost clocks) must still give a valid spec
    spec = cal.spec_from_measurements(_measured(matmul_flops=300e12, attention_flops=300e12), "fast")
    assert spec.compute_efficiency == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrate_on_this_gpu():
    spec = cal.calibrate("this-gpu")
    assert spec.calibrated and 0 < spec.compute_efficiency <= 1
    assert spec.h2d_pinned_bytes_per_s > spec.h2d_pageable_bytes_per_s * 0.5
    assert 0 < spec.context_bytes < 4 * 2**30


def test_partial_residency_keeps_the_named_blocks_on_the_device():
    # keep double.0 and double.1 (200 MB) resident, stream the three 60 MB blocks one by one (n=1, no streams)
    kept = choice(block(1, resident_blocks=("double.0", "double.1")))
    # encode: text encoder 80 + vae 40 + kept 200 + activation 5 = 325
    # denoise: others 120 + (unmatched 30 + kept 200 + one 60 MB group) + activation 50 = 460
    # decode: 80 + 40 + 200 + activation 120 = 440
    assert peaks_mb(synthetic(), kept) == {"encode": 325, "denoise": 460, "decode": 440}
    # host RAM: only the offloaded part of the transformer, 410 - 200 = 210 MB
    assert estimate(synthetic(), kept, HW).host_ram_bytes == 210 * MB
    # per call: unmatched in + out 0.0042; compute outside the groups 0.15 - 3 x 0.02 = 0.09;
    # groups: compute 0.06, 3 x (60 MB in 0.006 + out 0.0024) = 0.0252, 4 syncs 0.004  -> 0.1834
    assert seconds(kept)["denoise"] == pytest.approx(4 * 0.1834)


def test_partial_residency_names_blocks_of_the_profile():
    from planner.strategy import PlanError

    with pytest.raises(PlanError, match="resident_blocks applies only to block_level"):
        leaf(resident_blocks=("double.0",)).validate("transformer")
    with pytest.raises(PlanError, match="resident_blocks must be a list of block names"):
        block(1, resident_blocks=1).validate("transformer")
    with pytest.raises(PlanError, match=r"names a block twice: \['single.0'\]"):
        block(1, resident_blocks=("single.0", "single.0")).validate("transformer")
    with pytest.raises(PlanError, match=r"resident_blocks \['double.7'\] are not blocks of Transformer "
                                        r"\(its blocks: double.0, double.1, single.0, single.1, \.\.\. \(5 in all\)\)"):
        estimate(synthetic(), choice(block(1, resident_blocks=("double.0", "double.7"))), HW)
    # JSON holds a list; the plan a tuple, and the round trip is exact
    plan = block(1, resident_blocks=("single.2", "double.0"))
    assert ComponentPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
