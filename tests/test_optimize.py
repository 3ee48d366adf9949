"""optimize() end to end on tiny real pipelines, on CPU: profile, search, apply, run, compare outputs."""


import pytest
import torch

from conftest import TINY_WORKLOAD, build_tiny, run_tiny
from cost_models import estimate
from planner import BudgetError, Plan, optimize
from planner.profiler import profile
from planner.sources import from_pipeline
from planner.strategy import Choice, ComponentPlan

FP8_ATOL = 0.15  # fp8 e4m3/e5m2 storage of tiny random weights; outputs are images in [0, 1]


def _resident_card_bytes(pipe, hw) -> int:
    source = from_pipeline(pipe)
    prof = profile(source, **TINY_WORKLOAD)
    choice = Choice({n: ComponentPlan() for n in prof.components})
    return estimate(prof, choice, hw).card_peak_bytes


def test_lossless_plan_keeps_output_exactly(tiny_kind, bare_gpu):
    reference = run_tiny(build_tiny(tiny_kind))
    pipe = build_tiny(tiny_kind)
    budget = _resident_card_bytes(pipe, bare_gpu) - 1  # all-resident does not fit: something must move
    plan = optimize(pipe, budget, gpu=bare_gpu, device="cpu", allow_lossy=False, n_trials=60, **TINY_WORKLOAD)
    assert plan.predicted.card_peak_bytes <= budget
    assert any(p.offloaded for p in plan.choice.components.values())
    assert not any(p.fp8 for p in plan.choice.components.values()) and not plan.choice.vae_tiling
    assert torch.equal(run_tiny(pipe), reference)


def test_fp8_plan_is_close(bare_gpu):
    reference = run_tiny(build_tiny("flux"))
    pipe = build_tiny("flux")
    fp8 = ComponentPlan(storage_dtype="float8_e4m3fn")
    source = from_pipeline(pipe)
    comps = {n: fp8 if n in ("transformer", "vae") else ComponentPlan() for n in source.components}
    plan = Plan("FluxPipeline", {n: {"class": type(m).__name__} for n, m in source.components.items()},
                Choice(comps), None, device="cpu")
    plan.apply(pipe)
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    out = run_tiny(pipe)
    assert not torch.equal(out, reference)
    assert torch.allclose(out, reference, atol=FP8_ATOL)


def test_plan_json_round_trip(tmp_path, bare_gpu):
    pipe = build_tiny("sdxl")
    plan = optimize(pipe, "1TB", gpu=bare_gpu, device="cpu", n_trials=20, apply=False, **TINY_WORKLOAD)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


def test_impossible_budget_names_the_minimum(bare_gpu):
    pipe = build_tiny("flux")
    with pytest.raises(BudgetError) as info:
        optimize(pipe, 1000, gpu=bare_gpu, device="cpu", n_trials=20, **TINY_WORKLOAD)
    assert info.value.min_card_bytes > 1000
    assert "smallest achievable card peak" in str(info.value)
    assert not hasattr(pipe, "_memplan_plan")  # untouched


def test_bad_arguments_are_refused_before_any_work(monkeypatch):
    """A bad profile backend (for a zoo name too) and apply=True without a loaded pipeline fail before profiling."""
    import planner.optimizer

    monkeypatch.setattr(planner.optimizer, "profile", lambda *a, **k: pytest.fail("profiled before validating"))
    with pytest.raises(ValueError, match="profile backend 'gpu' is not one of"):
        planner.optimizer.plan_for("sd15", "8GB", gpu="rtx-4090", profile_backend="gpu")
    with pytest.raises(ValueError, match="apply=True needs a loaded pipeline"):
        optimize("sd15", "8GB", gpu="rtx-4090")
