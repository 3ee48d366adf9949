"""search(): plans fit both budgets, more budget is never slower, seeds repeat, BudgetError names the true minimum,
studies are shared through one storage, and measured runs land in the study."""

from __future__ import annotations

import itertools
import multiprocessing

import optuna
import pytest

from cost_models import estimate, get_gpu
from planner.profiler import profile
from planner.search import (BudgetError, Budgets, classic_choices, polish, record_measurement, search,
                            study_name)
from planner.sources import load_source
from planner.space import SearchSpace, choice_trial_params, enumerate_component, enumerate_vae
from planner.strategy import GROUP_OFFLOAD, LEAF_LEVEL, Choice, ComponentPlan

GB = 10**9
RAM = 64 * GB
N_TRIALS = 24  # classics + a few TPE trials: the polish does the rest
N_SHARED = 10  # per worker on SQLite (slow writes); two workers still run every enqueued classic plan


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """sd15, sdxl-base and flux-schnell, profiled once on meta (seconds) into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMPLAN_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = {}
        for name in ("sd15", "sdxl-base", "flux-schnell"):
            source = load_source(name)
            out[name] = profile(source)
        return out


def _brute_force(prof, hw, budgets, space=SearchSpace()):
    """estimate() on every plan of the space: (fastest feasible seconds or None, smallest card peak)."""
    fastest, smallest = None, None
    for mode in space.modes():
        options = [enumerate_component(n, c, mode, space) for n, c in prof.components.items()]
        for flags, combo in itertools.product(enumerate_vae(prof, space), itertools.product(*options)):
            est = estimate(prof, Choice(dict(zip(prof.components, combo)), *flags), hw)
            smallest = est.card_peak_bytes if smallest is None else min(smallest, est.card_peak_bytes)
            if est.card_peak_bytes <= budgets.vram_bytes and est.host_ram_bytes <= budgets.ram_bytes:
                fastest = est.total_s if fastest is None else min(fastest, est.total_s)
    return fastest, smallest


@pytest.mark.parametrize("name", ["sd15", "sdxl-base"])
@pytest.mark.parametrize("vram_gb,ram_gb", [(4, 64), (6, 64), (12, 64), (8, 4), (24, 2)])
def test_plans_fit_both_budgets(profiles, name, vram_gb, ram_gb):
    prof, hw, budgets = profiles[name], get_gpu("rtx-4090"), Budgets(vram_gb * GB, ram_gb * GB)
    if (name, vram_gb) == ("sdxl-base", 4):  # its fp16 VAE upcasts to fp32 for the decode: 3.2 GB of activations
        assert prof.components["vae"].activation_peak_bytes > 3 * GB
        with pytest.raises(BudgetError, match="smallest achievable card peak"):
            search(prof, hw, budgets, n_trials=N_TRIALS)
        return
    result = search(prof, hw, budgets, n_trials=N_TRIALS)
    for cand in (result.best, *result.pareto):
        est = estimate(prof, cand.choice, hw)  # re-priced: the stored estimate is the real one
        assert est == cand.estimate
        assert est.card_peak_bytes <= budgets.vram_bytes and est.host_ram_bytes <= budgets.ram_bytes


@pytest.mark.parametrize("gpu,vram_gb", [("rtx-4090", 4), ("h100", 4), ("h100", 8), ("rtx-4090", 48)])
def test_search_finds_the_exact_optimum_on_sd15(profiles, gpu, vram_gb):
    prof, hw, budgets = profiles["sd15"], get_gpu(gpu), Budgets(vram_gb * GB, RAM)
    fastest, _ = _brute_force(prof, hw, budgets)
    assert search(prof, hw, budgets, n_trials=N_TRIALS).best.estimate.total_s == pytest.approx(fastest, rel=1e-12)


@pytest.mark.parametrize("name,gpu", [("sdxl-base", "h100"), ("flux-schnell", "rtx-4090")])
def test_more_vram_is_never_slower(profiles, name, gpu):
    prof, hw = profiles[name], get_gpu(gpu)
    times = []
    for gb in (3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 80):
        try:
            times.append(search(prof, hw, Budgets(gb * GB, RAM), n_trials=N_TRIALS).best.estimate.total_s)
        except BudgetError:
            assert not times, f"{gb} GB is infeasible although a smaller budget was not"
    assert len(times) >= 8
    assert all(later <= earlier for earlier, later in zip(times, times[1:])), times


def test_same_seed_same_plan(profiles):
    prof, hw, budgets = profiles["sdxl-base"], get_gpu("rtx-4090"), Budgets(6 * GB, RAM)
    first, second = (search(prof, hw, budgets, n_trials=40, seed=7) for _ in range(2))
    assert first.best == second.best and first.pareto == second.pareto and first.n_trials == second.n_trials


def test_infeasible_budget_names_the_true_minimum(profiles):
    prof, hw, budgets = profiles["sd15"], get_gpu("rtx-4090"), Budgets(1 * GB, RAM)  # needs ~1.08 GB
    with pytest.raises(BudgetError) as info:
        search(prof, hw, budgets, n_trials=N_TRIALS)
    err = info.value
    _, smallest = _brute_force(prof, hw, budgets)
    assert err.min_card_bytes == smallest > budgets.vram_bytes
    assert all(err.min_card_bytes <= estimate(prof, c, hw).card_peak_bytes for c in classic_choices(prof, SearchSpace()))
    assert estimate(prof, err.min_choice, hw).card_peak_bytes == err.min_card_bytes
    assert "smallest achievable card peak" in str(err)
    assert "allow_lossy" not in str(err)  # fp8 and tiling were already searched: not offered as a way out


def test_infeasible_lossless_budget_suggests_allowing_lossy_knobs(profiles):
    with pytest.raises(BudgetError, match=r"or allow fp8 and VAE tiling \(allow_lossy=True\)"):
        search(profiles["sd15"], get_gpu("rtx-4090"), Budgets(1 * GB, RAM), space=SearchSpace(allow_lossy=False),
               n_trials=N_TRIALS)


def test_polish_walks_an_infeasible_start_into_the_budget(profiles):
    prof, hw, budgets = profiles["sdxl-base"], get_gpu("rtx-4090"), Budgets(6 * GB, RAM)
    all_resident = classic_choices(prof, SearchSpace())[0]
    assert estimate(prof, all_resident, hw).card_peak_bytes > budgets.vram_bytes
    est = estimate(prof, polish(prof, hw, budgets, SearchSpace(), all_resident), hw)
    assert est.card_peak_bytes <= budgets.vram_bytes


def _search_in_child(prof, storage, name, seed):
    search(prof, get_gpu("rtx-4090"), Budgets(6 * GB, RAM), n_trials=N_SHARED, seed=seed, storage=storage,
           study_name_override=name)


def test_two_processes_share_one_sqlite_study(profiles, tmp_path):
    storage, name = f"sqlite:///{tmp_path / 'x.db'}", "shared"
    optuna.create_study(storage=storage, study_name=name)  # both workers then load it, as a shared DB is used
    ctx = multiprocessing.get_context("fork")  # the children inherit the profile and the imports
    workers = [ctx.Process(target=_search_in_child, args=(profiles["sdxl-base"], storage, name, seed))
               for seed in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    added = [t for t in trials if t.user_attrs.get("origin") in ("polish", "classic")]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len(trials) == 2 * N_SHARED + len(added)  # the union: nothing lost, nothing left waiting


def test_record_measurement_adds_a_failed_trial_and_search_avoids_that_plan(profiles, tmp_path):
    prof, hw, budgets = profiles["sdxl-base"], get_gpu("rtx-4090"), Budgets(8 * GB, RAM)
    storage, space = f"sqlite:///{tmp_path / 'm.db'}", SearchSpace()
    name = study_name(prof, hw, budgets, space)
    first = search(prof, hw, budgets, n_trials=N_SHARED, storage=storage)
    trial = record_measurement(storage, name, first.best.choice, prof, space, measured_s=None, failed=True,
                               peak_bytes=9 * GB)
    study = optuna.load_study(study_name=name, storage=storage)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert [t.number for t in failed] == [trial.number]
    assert failed[0].user_attrs["failed"] and failed[0].user_attrs["peak_bytes"] == 9 * GB
    assert Choice.from_dict(failed[0].user_attrs["choice"]) == first.best.choice
    again = search(prof, hw, budgets, n_trials=2, storage=storage)
    assert again.best.choice != first.best.choice


def test_record_measurement_success_is_a_complete_trial_judged_by_the_budget(profiles, tmp_path):
    prof, hw, budgets = profiles["sd15"], get_gpu("rtx-4090"), Budgets(4 * GB, RAM)
    storage, space = f"sqlite:///{tmp_path / 'm.db'}", SearchSpace()
    result = search(prof, hw, budgets, n_trials=N_SHARED, storage=storage)
    trial = record_measurement(storage, study_name(prof, hw, budgets, space), result.best.choice, prof, space,
                               measured_s=1.25, failed=False, peak_bytes=5 * GB)
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 1.25
    assert trial.constraints == {"vram": float(1 * GB)}  # measured over the 4 GB budget: infeasible for TPE
    assert trial.params == choice_trial_params(result.best.choice, prof, space)[0]


def test_a_choice_outside_the_space_is_refused(profiles):
    prof = profiles["sd15"]
    streams = {n: ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL, use_stream=True) for n in prof.components}
    with pytest.raises(ValueError, match="outside the search space"):
        choice_trial_params(Choice(streams), prof, SearchSpace(cuda=False))
