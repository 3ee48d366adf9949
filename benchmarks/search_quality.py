"""Search quality: search()'s best plan against the exact optimum of the same space on the same cost model.

    python -m benchmarks.search_quality [--pipelines sd15 sdxl-base] [--n-trials N]

The exact optimum comes from exhaustive enumeration, made tractable by dominance pruning. Per component and
per option (every `enumerate_component` answer), the cost model reduces to five numbers:
    r = resident bytes, c = in-call bytes (weights on the device + activation), h = host bytes held,
    e = host setup extra, s = seconds
and the plan's figures are
    peak = sum r + max_{running i} (c_i - r_i),   host = sum h + max e,   time = sum s
(cost_models/memory.py, time.py). All three are monotone in every option's five numbers, so an option
dominated in (r, c, h, e, s) never appears in a unique optimum and dropping it is exact. The product of the
pruned lists x VAE flags x pipeline modes is then evaluated with numpy. `verify_against_brute_force` checks,
on small pipelines, that this equals calling `estimate()` on every combination; and every optimum found is
re-priced with `estimate()` so a cost-model change that breaks the decomposition fails loudly.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np

from cost_models import HardwareSpec, estimate, get_gpu
from planner.profile_data import ComponentProfile, Profile
from planner.profiler import profile
from planner.search import BudgetError, Budgets, Candidate, _terms, search
from planner.sources import load_source, zoo_names
from planner.space import SearchSpace, enumerate_component, enumerate_vae
from planner.strategy import Choice, ComponentPlan
from planner.units import parse_size

logger = logging.getLogger(__name__)

BUDGETS_GB = (4, 6, 8, 12, 16, 24, 48)
GPUS = ("rtx-4090", "h100")
RAM_BUDGET = "64GB"  # fixed, so the results do not depend on the machine running the benchmark


@dataclass(frozen=True)
class Scenario:
    pipeline: str
    gpu: str
    vram_gb: int


# ---------------------------------------------------------------- exact optimum

def option_terms(comp: ComponentProfile, plan: ComponentPlan, flags: Choice, hw: HardwareSpec) -> tuple:
    """(r, c - r, h, e, s) of one option (the polish's per-component terms); `flags` carries only the VAE
    tiling/slicing."""
    return dataclasses.astuple(_terms(comp, plan, flags, hw))


def pareto_prune(options: list[ComponentPlan], terms: list[tuple]) -> tuple[list[ComponentPlan], np.ndarray]:
    """Options not dominated in every term (ties: the first kept)."""
    keep: list[int] = []
    for i, t in enumerate(terms):
        if any(all(a <= b for a, b in zip(terms[k], t)) for k in keep):
            continue
        keep = [k for k in keep if not all(a <= b for a, b in zip(t, terms[k]))] + [i]
    return [options[i] for i in keep], np.array([terms[i] for i in keep], dtype=object)


def _best_in_product(lists: list[np.ndarray], hw: HardwareSpec, budgets: Budgets, minimise: str = "seconds"
                     ) -> tuple[float, list[int]] | None:
    """min sum s (or min card peak) over the product of per-component term arrays, subject to both budgets;
    (the minimum, indices)."""
    R = np.zeros(1, dtype=np.int64); D = np.zeros(1, dtype=np.int64)
    H = np.zeros(1, dtype=np.int64); E = np.zeros(1, dtype=np.int64); S = np.zeros(1)
    idx = np.zeros((1, 0), dtype=np.int64)
    for terms in lists:
        t = np.array(terms[:, :4], dtype=np.int64)
        s = np.array(terms[:, 4], dtype=float)
        n, m = len(R), len(t)
        R = (R[:, None] + t[None, :, 0]).ravel(); D = np.maximum(D[:, None], t[None, :, 1]).ravel()
        H = (H[:, None] + t[None, :, 2]).ravel(); E = np.maximum(E[:, None], t[None, :, 3]).ravel()
        S = (S[:, None] + s[None, :]).ravel()
        idx = np.concatenate([np.repeat(idx, m, axis=0), np.tile(np.arange(m), n)[:, None]], axis=1)
        # a partial plan already over a budget stays over it (every term only grows): drop it early
        ok = (_card(R + D, hw) <= budgets.vram_bytes) & (H + E <= budgets.ram_bytes)
        R, D, H, E, S, idx = R[ok], D[ok], H[ok], E[ok], S[ok], idx[ok]
    if not len(S):
        return None
    card = _card(R + D, hw)
    if minimise == "card":
        i = int(np.argmin(card))
        return float(card[i]), list(idx[i])
    order = np.lexsort((card, S))
    return float(S[order[0]]), list(idx[order[0]])


def _card(peak: np.ndarray, hw: HardwareSpec) -> np.ndarray:
    # cost_models.estimate.card_bytes: int(allocated * overhead) + context, in float64 like Python's int(x * f)
    return np.floor(peak.astype(float) * hw.reserved_over_allocated).astype(np.int64) + hw.context_bytes


def exact_optimum(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace = SearchSpace()
                  ) -> Candidate | None:
    """The fastest feasible plan of the whole space (None when nothing fits), re-priced with estimate()."""
    best: tuple[float, Choice] | None = None
    for mode in space.modes():
        options = {n: enumerate_component(n, c, mode, space) for n, c in profile.components.items()}
        for tiling, slicing in enumerate_vae(profile, space):
            flags = Choice({}, tiling, slicing)
            pruned = {n: pareto_prune(opts, [option_terms(profile.components[n], p, flags, hw) for p in opts])
                      for n, opts in options.items()}
            found = _best_in_product([terms for _, terms in pruned.values()], hw, budgets)
            if found is None:
                continue
            comps = {n: pruned[n][0][i] for n, i in zip(pruned, found[1])}
            if best is None or found[0] < best[0]:
                best = (found[0], Choice(comps, tiling, slicing))
    if best is None:
        return None
    est = estimate(profile, best[1], hw)
    if abs(est.total_s - best[0]) > 1e-9 * max(best[0], 1.0):
        raise AssertionError(f"decomposed time {best[0]} != estimate() {est.total_s}: the cost model changed; "
                             "update option_terms")
    if est.card_peak_bytes > budgets.vram_bytes or est.host_ram_bytes > budgets.ram_bytes:
        raise AssertionError("decomposed memory disagrees with estimate(): the cost model changed; update option_terms")
    return Candidate(best[1], est)


def exact_min_card_bytes(profile: Profile, hw: HardwareSpec, space: SearchSpace = SearchSpace()) -> int:
    """The smallest card peak any plan of the space reaches (what BudgetError.min_card_bytes should say)."""
    unlimited = Budgets(2**62, 2**62)
    best = None
    for mode in space.modes():
        options = {n: enumerate_component(n, c, mode, space) for n, c in profile.components.items()}
        for tiling, slicing in enumerate_vae(profile, space):
            flags = Choice({}, tiling, slicing)
            # for the minimum peak only (resident, excess) matter: prune on those alone
            lists = [pareto_prune(opts, [option_terms(profile.components[n], p, flags, hw)[:2] + (0, 0, 0.0)
                                         for p in opts])[1] for n, opts in options.items()]
            found = _best_in_product(lists, hw, unlimited, minimise="card")
            best = found[0] if best is None else min(best, found[0])
    return int(best)


def brute_force_optimum(profile: Profile, hw: HardwareSpec, budgets: Budgets, space: SearchSpace = SearchSpace()
                        ) -> float | None:
    """estimate() on every combination of the unpruned space (small pipelines only): the reference's reference."""
    best = None
    for mode in space.modes():
        options = [enumerate_component(n, c, mode, space) for n, c in profile.components.items()]
        for tiling, slicing in enumerate_vae(profile, space):
            for combo in itertools.product(*options):
                est = estimate(profile, Choice(dict(zip(profile.components, combo)), tiling, slicing), hw)
                if est.card_peak_bytes <= budgets.vram_bytes and est.host_ram_bytes <= budgets.ram_bytes:
                    best = est.total_s if best is None else min(best, est.total_s)
    return best


def verify_against_brute_force(profiles: dict[str, Profile]) -> None:
    """Pruned enumeration == brute force on the small pipelines, over every budget and GPU."""
    ram = parse_size(RAM_BUDGET)
    for name in ("sd15", "sdxl-base"):
        if name not in profiles:
            continue
        for gpu, gb in itertools.product(GPUS, BUDGETS_GB):
            hw, budgets = get_gpu(gpu), Budgets(parse_size(f"{gb}GB"), ram)
            exact, brute = exact_optimum(profiles[name], hw, budgets), brute_force_optimum(profiles[name], hw, budgets)
            got = None if exact is None else exact.estimate.total_s
            if (got is None) != (brute is None) or (got is not None and abs(got - brute) > 1e-9 * brute):
                raise AssertionError(f"{name} {gpu} {gb}GB: pruned enumeration {got} != brute force {brute}")


# ---------------------------------------------------------------- the benchmark

def load_profiles(names: list[str]) -> dict[str, Profile]:
    out = {}
    for name in names:
        source = load_source(name)
        out[name] = profile(source)
    return out


def run_scenario(sc: Scenario, prof: Profile, n_trials: int | None) -> dict:
    hw, budgets = get_gpu(sc.gpu), Budgets(parse_size(f"{sc.vram_gb}GB"), parse_size(RAM_BUDGET))
    exact = exact_optimum(prof, hw, budgets)
    kwargs = {} if n_trials is None else {"n_trials": n_trials}
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        found, error = search(prof, hw, budgets, **kwargs).best, None
    except BudgetError as err:
        found, error = None, err
    row = {"pipeline": sc.pipeline, "gpu": sc.gpu, "vram_gb": sc.vram_gb,
           "search_s": time.perf_counter() - wall, "search_cpu_s": time.process_time() - cpu,
           "optimum_s": exact.estimate.total_s if exact else None,
           "found_s": found.estimate.total_s if found else None}
    if exact is None and found is None:
        row["status"], row["ratio"] = "infeasible (agreed)", None
        row["min_card_exact"] = error.min_card_bytes == exact_min_card_bytes(prof, hw)
    elif exact is None:
        row["status"], row["ratio"] = "found a plan the optimum says cannot fit", None
    elif found is None:
        row["status"], row["ratio"] = "missed: BudgetError on a feasible budget", float("inf")
    else:
        row["status"], row["ratio"] = "ok", found.estimate.total_s / exact.estimate.total_s
    return row


def report(rows: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    with pd.option_context("display.max_rows", None, "display.width", 200):
        table = df.to_string(index=False, float_format=lambda x: f"{x:.4f}")
    feasible = df[df["ratio"].notna()]
    ratios = feasible["ratio"].astype(float)
    mismatches = (df["status"] == "found a plan the optimum says cannot fit").sum()
    lines = [table, "",
             f"cases: {len(df)} ({len(feasible)} feasible, {len(df) - len(feasible) - mismatches} infeasible "
             f"agreed, {mismatches} disagreeing)",
             f"found = optimum (ratio <= 1 + 1e-9): {(ratios <= 1 + 1e-9).mean() * 100:.1f}% of feasible cases; "
             f"ratio rounds to 1.00: {(ratios < 1.005).mean() * 100:.1f}%; <= 1.02: {(ratios <= 1.02).mean() * 100:.1f}%; "
             f"max ratio {ratios.max():.4f}; below 1 (a reference bug): {(ratios < 1 - 1e-9).sum()}",
             f"search() per call: wall median {statistics.median(df['search_s']):.2f} s, max {df['search_s'].max():.2f} s; "
             f"CPU median {statistics.median(df['search_cpu_s']):.2f} s, max {df['search_cpu_s'].max():.2f} s"]
    if "min_card_exact" in df:
        infeasible = df[df["min_card_exact"].notna()]
        lines.append(f"BudgetError.min_card_bytes == exact minimum card peak: "
                     f"{int(infeasible['min_card_exact'].sum())}/{len(infeasible)} infeasible cases")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipelines", nargs="*", default=zoo_names())
    parser.add_argument("--gpus", nargs="*", default=list(GPUS))
    parser.add_argument("--budgets", nargs="*", type=int, default=list(BUDGETS_GB))
    parser.add_argument("--n-trials", type=int, default=None, help="search()'s n_trials (default: its own)")
    parser.add_argument("--no-verify", action="store_true", help="skip the brute-force check of the reference")
    args = parser.parse_args(argv)
    profiles = load_profiles(args.pipelines)
    if not args.no_verify:
        verify_against_brute_force(profiles)
        print("reference verified: pruned enumeration == brute force on sd15 / sdxl-base")
    rows = [run_scenario(Scenario(p, g, b), profiles[p], args.n_trials)
            for p in args.pipelines for g in args.gpus for b in args.budgets]
    print(report(rows))


if __name__ == "__main__":
    main()
