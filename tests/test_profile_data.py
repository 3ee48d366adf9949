"""The data model at the bottom (profile, choice, workload, hardware) imports neither torch nor diffusers,
and a profile with per-call records survives its JSON round trip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.profile_data import CallProfile, ComponentProfile, OpStat, Profile, Unit
from planner.workload import Workload

REPO = Path(__file__).resolve().parents[1]


def test_data_model_and_cost_models_import_without_torch():
    code = ("import sys; import planner.profile_data, planner.strategy, planner.workload, cost_models.hardware, "
            "cost_models.estimate; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _component(calls: tuple[CallProfile, ...]) -> ComponentProfile:
    return ComponentProfile(
        name="transformer", class_name="Tiny", config_hash="abc", role="denoiser",
        param_bytes_by_dtype={"bfloat16": 1000}, buffer_bytes=8, fp8_saving_bytes=400,
        block_lists={"blocks": 2}, blocks=(Unit("blocks.0", 400, 200), Unit("blocks.1", 400, 200)),
        unmatched=Unit("unmatched", 208, 0), leaf_count=4, largest_leaf_bytes=200, largest_fp8_leaf_bytes=200,
        calls_per_run=4, activation_peak_bytes=64, activation_peak_module="blocks.0", flops_per_call=1e6,
        calls=calls)


def test_profile_with_calls_round_trips_through_json():
    call = CallProfile(method="forward", phase="denoise", calls_per_run=4, args="hidden_states: (2, 16, 8) bf16",
                       activation_peak_bytes=64, activation_peak_module="blocks.0", flops=1e6,
                       ops=(OpStat("matmul", "bfloat16", 3, 2e5, 4096), OpStat("other", "bfloat16", 10, 0.0, 512)))
    prof = Profile("TinyPipeline", "tiny", Workload(height=64, width=64, num_inference_steps=4),
                   {"transformer": _component((call,))})
    again = Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again == prof
    assert again.components["transformer"].calls[0].ops[0].kind == "matmul"


def test_call_phase_is_checked():
    with pytest.raises(ValueError, match="phase 'loop'"):
        CallProfile(method="forward", phase="loop", calls_per_run=1, args="", activation_peak_bytes=0,
                    activation_peak_module="", flops=0.0)
