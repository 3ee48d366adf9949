"""A plan explains itself: budgets and their use, the binding budget, the lossy-knob decision, alternatives that
print and apply; the defaults (host-RAM budget, device, lossy rule) and progress bars."""

from __future__ import annotations

import dataclasses
import io
import sys

import pytest
import torch

from conftest import TINY_WORKLOAD, build_tiny, run_tiny
from cost_models import Estimate, get_gpu
from planner import optimizer, progress
from planner.optimizer import MIN_LOSSY_SPEEDUP, _lossy_decision, default_ram_budget, plan_for
from planner.plan import Plan, describe_in_words
from planner.profiler import profile
from planner.search import Budgets, Candidate, SearchResult, binding_constraints
from planner.sources import from_pipeline
from planner.strategy import BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, Choice, ComponentPlan

GIB = 2**30


def _cand(card_gib: float, host_gib: float, seconds: float, choice: Choice = Choice({})) -> Candidate:
    est = Estimate(int(card_gib * GIB), int(card_gib * GIB), "denoise", {}, int(host_gib * GIB), {"denoise": seconds})
    return Candidate(choice, est)


# ---------------------------------------------------------------- default host-RAM budget

def test_default_ram_budget_is_total_ram_minus_the_stated_reserve(monkeypatch):
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * GIB // 4096}
    monkeypatch.setattr(optimizer.os, "sysconf", lambda name: pages[name])
    monkeypatch.setattr(optimizer, "_cgroup_limit_bytes", lambda: None)
    assert default_ram_budget()[0] == 20 * GIB  # 10% of 24 GiB is under the 4 GiB minimum reserve
    pages["SC_PHYS_PAGES"] = 128 * GIB // 4096
    budget, note = default_ram_budget()
    assert budget == 128 * GIB - int(12.8 * GIB)
    assert note == "default: this machine's 128.00 GiB of RAM minus a 12.80 GiB reserve (10%, at least 4.00 GiB)"


def test_default_ram_budget_does_not_depend_on_free_memory(monkeypatch):
    before = default_ram_budget()
    hog = bytearray(512 * 2**20)  # 512 MiB allocated and touched: less is free now
    hog[::4096] = b"x" * len(hog[::4096])
    real_open = open

    def lying_meminfo(path, *args, **kwargs):  # a machine whose free memory reads as almost nothing
        if str(path) == "/proc/meminfo":
            return io.StringIO("MemTotal: 25165824 kB\nMemFree: 1024 kB\nMemAvailable: 2048 kB\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", lying_meminfo)
    assert default_ram_budget() == before
    del hog


def test_a_cgroup_limit_below_the_machine_is_the_total(monkeypatch):
    monkeypatch.setattr(optimizer.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**25}[name])
    monkeypatch.setattr(optimizer, "_cgroup_limit_bytes", lambda: 16 * GIB)
    assert optimizer.total_ram_bytes() == 16 * GIB


# ---------------------------------------------------------------- binding budget, lossy rule

BUDGETS = Budgets(8 * GIB, 32 * GIB)


def test_binding_is_the_budget_a_faster_plan_exceeds_alone():
    best = _cand(7, 20, 10.0)
    assert binding_constraints([best, _cand(6, 10, 12.0)], best, BUDGETS) == ((), None)
    over_vram = _cand(20, 20, 5.0)
    assert binding_constraints([best, over_vram], best, BUDGETS) == (("vram",), over_vram)
    over_ram = _cand(7, 40, 6.0)
    assert binding_constraints([best, over_vram, over_ram], best, BUDGETS) == (("vram", "host_ram"), over_vram)
    both = _cand(20, 40, 4.0)
    assert binding_constraints([best, both], best, BUDGETS) == (("vram", "host_ram"), both)
    assert binding_constraints([best, both, over_ram], best, BUDGETS)[0] == ("host_ram",)


FP8 = Choice({"transformer": ComponentPlan(storage_dtype="float8_e4m3fn")})


def _result(seconds: float, choice: Choice = Choice({})) -> SearchResult:
    best = _cand(7, 20, seconds, choice)
    return SearchResult(best, (best,), 1)


def test_lossy_knobs_need_the_stated_speedup():
    below = _lossy_decision(_result(10.0), _result(10.0 / (MIN_LOSSY_SPEEDUP - 0.05), FP8))
    assert below["taken"] == [] and below["declined"] == ["transformer fp8 storage (float8_e4m3fn)"]
    assert "below 1.25x" in below["reason"]
    above = _lossy_decision(_result(10.0), _result(10.0 / (MIN_LOSSY_SPEEDUP + 0.05), FP8))
    assert above["taken"] == ["transformer fp8 storage (float8_e4m3fn)"] and "at least 1.25x" in above["reason"]
    needed = _lossy_decision(None, _result(10.0, FP8))
    assert needed["taken"] and needed["reason"] == "needed to fit: no lossless plan fits the budgets"
    assert _lossy_decision(_result(10.0), _result(9.0))["taken"] == []


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """A tiny Flux plan at a generous budget, lossy knobs allowed (the default); made once for the module."""
    hw = dataclasses.replace(get_gpu("rtx-4090"), context_bytes=0, reserved_over_allocated=1.0)  # as bare_gpu
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMPLAN_CACHE", str(tmp_path_factory.mktemp("cache")))
        return plan_for(build_tiny("flux"), "1GB", ram_budget="8GB", gpu=hw, device="cpu", n_trials=20,
                        progress=False, **TINY_WORKLOAD)


def test_a_generous_budget_takes_no_lossy_knob(tiny_plan):
    assert not tiny_plan.choice.vae_tiling and not any(p.fp8 for p in tiny_plan.choice.components.values())
    assert tiny_plan.explain["lossy"]["taken"] == []
    assert tiny_plan.explain["binding"] == []  # all resident fits: nothing is faster


def test_summary_states_workload_budgets_binding_and_lossy(tiny_plan):
    lines = tiny_plan.summary().splitlines()
    assert lines[1] == "workload: 32x32, 2 steps, batch 1, 512 text tokens, float32"  # the tiny pipeline runs in fp32
    card = tiny_plan.predicted.card_peak_bytes
    assert lines[2] == f"VRAM budget: 1GB = 953.7 MiB; card peak {card / 2**20:.1f} MiB = {100 * card / 1e9:.0f}% of it"
    assert lines[3].startswith("host RAM budget: 8GB = 7.45 GiB; host RAM ")
    assert lines[4] == "binding: none (no priced plan is faster than this one: the budgets leave room)"
    assert lines[5].startswith("lossy: none (the fastest plan found is lossless; rule: only when no lossless plan "
                               "fits or when at least 1.25x faster)")


def test_alternatives_print_in_words_and_apply(tiny_plan):
    reference = run_tiny(build_tiny("flux"))
    offloaded = [a for a in tiny_plan.alternatives
                 if any(p.offloaded for p in a.choice.components.values()) and not a.choice.vae_tiling
                 and not any(p.fp8 for p in a.choice.components.values())]
    assert offloaded, [str(a) for a in tiny_plan.alternatives]
    alt = offloaded[0]
    assert str(alt).splitlines()[1].strip() == describe_in_words(alt.choice)
    pipe = build_tiny("flux")
    alt.apply(pipe)
    assert torch.equal(run_tiny(pipe), reference)  # lossless: the image is unchanged


def test_alternatives_keep_their_plan_through_json(tiny_plan, tmp_path):
    tiny_plan.save(tmp_path / "p.json")
    loaded = Plan.load(tmp_path / "p.json")
    assert loaded == tiny_plan and loaded.explain == tiny_plan.explain
    assert all(a.as_plan().pipeline_class == "FluxPipeline" for a in loaded.alternatives)


def test_in_words_says_what_moves_and_what_stays():
    choice = Choice({"vae": ComponentPlan(), "text_encoder": ComponentPlan(),
                     "transformer": ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1, use_stream=True),
                     "text_encoder_2": ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL, storage_dtype="float8_e5m2")},
                    vae_slicing=True)
    assert describe_in_words(choice) == (
        "vae, text_encoder: on the GPU; transformer: kept in pinned CPU RAM, loaded 1 block at a time, prefetched "
        "on a CUDA stream; text_encoder_2: kept in CPU RAM, loaded layer by layer, weights in float8_e5m2 (lossy); "
        "VAE decodes one image at a time (slicing)")


# ---------------------------------------------------------------- device default, progress

def test_api_and_cli_default_to_the_same_device():
    from planner.cli import build_parser

    plan_args = build_parser().parse_args(["plan", "sd15", "--budget", "8GB"])
    assert plan_args.device is None  # the CLI passes None: plan_for's DEFAULT_DEVICE decides for both
    assert optimizer.DEFAULT_DEVICE == "cuda"


def test_optimize_without_cuda_refuses_to_apply_a_gpu_plan(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="has no CUDA device.*device='cpu'"):
        optimizer.optimize(build_tiny("flux"), "1GB", gpu="rtx-4090")


def test_progress_is_on_in_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.resolve(None) is True and progress.resolve(False) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.resolve(None) is False and progress.resolve(True) is True
    with pytest.raises(ValueError, match="progress='yes' is not valid"):
        progress.resolve("yes")


def test_profiling_shows_a_bar_when_asked(capsys):
    source = from_pipeline(build_tiny("flux"))
    profile(source, use_cache=False, progress=True, **TINY_WORKLOAD)
    assert "profiling" in capsys.readouterr().err
    profile(source, use_cache=False, progress=False, **TINY_WORKLOAD)
    assert capsys.readouterr().err == ""


def test_the_lossless_search_runs_first_and_keeps_its_plan_below_the_threshold(monkeypatch):
    from planner.search import BudgetError
    from planner.space import SearchSpace

    def fake_search(results):
        def search(prof, hw, budgets, *, space, **kw):
            found = results[space.allow_lossy]
            if found is None:
                raise BudgetError("no plan fits", 0, 0, Choice({}))
            return found
        return search

    lossless, lossy = _result(10.0), _result(9.0, FP8)  # 1.11x: below the threshold
    monkeypatch.setattr(optimizer, "search", fake_search({False: lossless, True: lossy}))
    chosen, space, decision = optimizer._search_lossless_first(None, None, BUDGETS, SearchSpace())
    assert chosen.best == lossless.best and not space.allow_lossy and decision["declined"]
    assert {c.estimate.total_s for c in chosen.pareto} == {10.0, 9.0}  # both fronts offered as alternatives
    monkeypatch.setattr(optimizer, "search", fake_search({False: None, True: _result(12.0)}))
    chosen, space, decision = optimizer._search_lossless_first(None, None, BUDGETS, SearchSpace())
    assert chosen.best.estimate.total_s == 12.0 and decision["taken"] == []  # found lossless by the wider search
    monkeypatch.setattr(optimizer, "search", fake_search({False: None, True: None}))
    with pytest.raises(BudgetError):
        optimizer._search_lossless_first(None, None, BUDGETS, SearchSpace())
    with pytest.raises(BudgetError):
        optimizer._search_lossless_first(None, None, BUDGETS, SearchSpace(allow_lossy=False))
