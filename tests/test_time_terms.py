"""The time model's new terms, each hand-computed: roofline per op, the streamed-group schedule, pinning on the fly,
the pipeline's fp32 VAE upcast, the fitted-constants overlay, and the torch-free import of the cost models."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from cost_models.hardware import GPUS, HardwareSpec, with_fitted
from cost_models.memory import in_call_weight_bytes
from cost_models.time import op_s, peak_flops, roofline_s, streamed_groups_s
from planner.profile_data import OpStat
from planner.strategy import RESIDENT, ComponentPlan
from planner.tracing import _op_kind as op_kind

HW = HardwareSpec(name="hand", vram_bytes=24 * 2**30, bf16_flops=100e12, mem_bytes_per_s=1e12, pcie_gen=4,
                  h2d_pinned_bytes_per_s=20e9, h2d_pageable_bytes_per_s=10e9, d2h_bytes_per_s=25e9, fp8=True,
                  source="test", compute_efficiency=0.5, mem_efficiency=0.8, launch_s=10e-6, fp32_flops=20e12)


def test_peak_per_dtype_bf16_tensor_cores_tf32_convs_fp32_cuda_cores():
    assert peak_flops("matmul", "bfloat16", HW) == 100e12
    assert peak_flops("conv", "float16", HW) == 100e12
    assert peak_flops("conv", "float32", HW) == 50e12  # TF32: half the bf16 rate
    assert peak_flops("matmul", "float32", HW) == 20e12
    assert peak_flops("attention", "float32", HW) == 20e12
    # no fp32 figure: half the bf16 one (the GeForce datasheet ratio)
    assert dataclasses.replace(HW, fp32_flops=None).fp32_peak_flops == 50e12


def test_roofline_op_is_the_slowest_of_compute_memory_and_launch():
    # 1 TFLOP bf16 at 50 TFLOP/s = 0.02 s; its 1 GB at 0.8 TB/s = 0.00125 s -> compute-bound
    big = OpStat("matmul", "bfloat16", 3, 1e12, 10**9)
    assert op_s(big, HW) == pytest.approx(0.02)
    # an elementwise op of 80 MB: 80e6 / 0.8e12 = 1e-4 s -> memory-bound
    norm = OpStat("other", "bfloat16", 5, 0.0, 80 * 10**6)
    assert op_s(norm, HW) == pytest.approx(1e-4)
    # a tiny op: 1 kB -> 1.25e-9 s, below the launch floor of 10 us
    tiny = OpStat("other", "float32", 100, 0.0, 1000)
    assert op_s(tiny, HW) == pytest.approx(10e-6)
    # the same FLOPs in fp32 (CUDA cores, 20 x 0.5 = 10 TFLOP/s): 0.1 s
    assert op_s(dataclasses.replace(big, dtype="float32"), HW) == pytest.approx(0.1)
    assert roofline_s([big, norm, tiny], HW) == pytest.approx(3 * 0.02 + 5 * 1e-4 + 100 * 10e-6)


def test_streamed_groups_prefetch_one_ahead_and_pin_on_the_cpu_first():
    onload, compute, pin = [0.1, 0.3, 0.1], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0]
    # g0 synchronous 0.1; then sync + max(c_i, onload_i+1): 0.2 vs 0.3 -> 0.3; 0.2 vs 0.1 -> 0.2; 0.2 vs 0 -> 0.2
    assert streamed_groups_s(onload, compute, pin, 0.01) == pytest.approx(0.1 + 0.3 + 0.2 + 0.2 + 3 * 0.01)
    # pinning on the fly is serial: it adds before each group's prefetch (pin(g_i+1)) and before g0
    pinned = streamed_groups_s(onload, compute, [0.05, 0.05, 0.05], 0.01)
    assert pinned == pytest.approx(0.05 + 0.1 + (0.05 + 0.3) + (0.05 + 0.2) + 0.2 + 3 * 0.01)
    assert streamed_groups_s([], [], [], 0.01) == 0.0


def test_op_kinds_of_the_dispatch_stream():
    aten = torch.ops.aten
    assert op_kind(aten.addmm) == op_kind(aten.mm) == "matmul"
    assert op_kind(aten.convolution) == "conv"
    assert op_kind(aten._scaled_dot_product_flash_attention) == "attention"
    assert op_kind(aten.add) == op_kind(aten.native_group_norm) == "other"


def test_pipeline_upcast_doubles_the_weights_on_the_device_while_decoding():
    from test_cost_model import MB, vae  # the hand-made 40 MB VAE

    comp = dataclasses.replace(vae(), upcast_weight_bytes=40 * MB)
    assert in_call_weight_bytes(comp, ComponentPlan(RESIDENT)) == 80 * MB
    assert in_call_weight_bytes(vae(), ComponentPlan(RESIDENT)) == 40 * MB


def test_fitted_overlay_replaces_constants_and_records_the_rows(tmp_path):
    table = {"hand": HW, "other": dataclasses.replace(HW, name="other")}
    path = tmp_path / "fitted.json"
    path.write_text(json.dumps({"datasheet": {"other": {"fp32_flops": 5e12}},
                                "gpus": {"hand": {"constants": {"launch_s": 2e-5}, "rows": ["A1", "A2"]}},
                                "default": {"constants": {"launch_s": 3e-5}}}))
    got = with_fitted(table, path)
    assert (got["hand"].launch_s, got["hand"].fitted_from) == (2e-5, ("A1", "A2"))
    assert (got["other"].launch_s, got["other"].fitted_from, got["other"].fp32_flops) == (3e-5, (), 5e12)
    assert with_fitted(table, tmp_path / "missing.json") == table


def test_every_table_gpu_has_its_constants_inside_a_physical_range():
    for spec in GPUS.values():
        assert 0.25 <= spec.compute_efficiency <= 0.9 and 0.4 <= spec.mem_efficiency <= 0.95, spec.name
        assert 3e-6 <= spec.launch_s <= 40e-6 and spec.h2d_pageable_bytes_per_s <= spec.h2d_pinned_bytes_per_s
        assert 1.0 <= spec.reserved_over_allocated <= 1.3


def test_gpus_and_pricing_a_saved_profile_never_import_torch():
    code = ("import sys, cost_models, planner.profile_data, benchmarks.fit; "
            "from cost_models import estimate, GPUS; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr


def test_the_search_fast_path_prices_random_plans_as_estimate_does():
    """search._terms (the polish's per-component terms) and estimate() agree on random plans of every mode."""
    import random

    from cost_models import card_bytes, estimate
    from planner.search import _terms
    from planner.space import SearchSpace, enumerate_component, enumerate_vae
    from planner.strategy import Choice
    from test_cost_model import HW as HAND, synthetic

    prof, space, rng = synthetic(), SearchSpace(), random.Random(0)
    for mode in space.modes():
        options = {n: enumerate_component(n, c, mode, space) for n, c in prof.components.items()}
        for _ in range(40):
            tiling, slicing = rng.choice(enumerate_vae(prof, space))
            choice = Choice({n: rng.choice(opts) for n, opts in options.items()}, tiling, slicing)
            terms = [_terms(prof.components[n], p, choice, HAND) for n, p in choice.components.items()]
            est = estimate(prof, choice, HAND)
            assert sum(t.seconds for t in terms) == pytest.approx(est.total_s, rel=1e-12)
            peak = sum(t.resident for t in terms) + max(t.excess for t in terms)
            assert card_bytes(peak, HAND) == est.card_peak_bytes
            assert sum(t.held for t in terms) + max(t.extra for t in terms) == est.host_ram_bytes
