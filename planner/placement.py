"""Several GPUs: where each whole component runs, and the offloading within each card.

For every assignment of components to cards (cards of the same spec and budget are interchangeable, so mirror
images are priced once), each card's components are planned by the single-card search (`search.search`, its
own VRAM budget, the machine's RAM budget), and the assignment is priced by `cost_models.devices`: each card's
estimate plus the activations crossing cards. The fastest placement that fits every card and the host RAM wins.
The per-card searches are independent given the assignment, except for host RAM, which all cards share: each
card's search may use all of it, and a combination over the budget is dropped (priced, never silently fitted).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from cost_models.devices import DeviceSet, PlacementEstimate, estimate_placement, execution_device, sub_profile
from cost_models.hardware import HardwareSpec
from planner.crossing import module_order
from planner.profile_data import Profile
from planner.search import BudgetError, Budgets, search
from planner.space import SearchSpace
from planner.strategy import Choice
from planner.units import format_size

logger = logging.getLogger(__name__)

PER_CARD_TRIALS = 8  # the polish after the Optuna trials finds each card's optimum (benchmarks/search_quality.py)


@dataclass(frozen=True)
class Placement:
    devices: dict[str, int]  # component -> device index
    choice: Choice
    estimate: PlacementEstimate


def assignments(names: list[str], devices: DeviceSet):
    """Every map of components to device indices, one per class of interchangeable cards' permutations."""
    keys = [(spec, budget) for spec, budget in zip(devices.specs, devices.vram_bytes)]
    seen = set()
    for combo in itertools.product(range(devices.count), repeat=len(names)):
        # Canonical form: the components of each card as a set, cards of the same kind unordered.
        by_card = tuple(frozenset(n for n, d in zip(names, combo) if d == i) for i in range(devices.count))
        canon = tuple(sorted((repr(keys[i]), tuple(sorted(by_card[i]))) for i in range(devices.count)))
        if canon not in seen:
            seen.add(canon)
            yield dict(zip(names, combo))


def place(profile: Profile, devices: DeviceSet, ram_bytes: int, io_bytes: dict[str, int], *,
          space: SearchSpace = SearchSpace(), n_trials: int = PER_CARD_TRIALS, seed: int = 0) -> Placement:
    """The fastest placement of `profile`'s components on `devices` within every card's budget and `ram_bytes`.

    Raises BudgetError when no placement fits (naming each card's budget)."""
    cache: dict[tuple, Choice | None] = {}
    best: Placement | None = None
    order = module_order(profile.pipeline_class, list(profile.components))
    for devs in assignments(list(profile.components), devices):
        choice = _plan_cards(profile, devices, devs, ram_bytes, space, n_trials, seed, cache)
        if choice is None or not _vae_at_home(order, devs, choice):
            continue
        est = estimate_placement(profile, choice, devs, devices, io_bytes, order)
        if est.fits(devices, ram_bytes) and (best is None or est.total_s < best.estimate.total_s):
            best = Placement(devs, choice, est)
    if best is None:
        cards = ", ".join(f"cuda:{i} {format_size(b)}" for i, b in enumerate(devices.vram_bytes))
        raise BudgetError(f"no placement of the components on {cards} fits with {format_size(ram_bytes)} of host RAM: "
                          "raise a budget or lower the workload", 0, 0, Choice({}))
    return best


def _vae_at_home(order: list[str], devs: dict[str, int], choice: Choice) -> bool:
    """A VAE is called through decode(), which no forward hook sees: it must run on the execution device
    (planner/apply_devices.py)."""
    return "vae" not in devs or devs["vae"] == execution_device(order, devs, choice)


def _plan_cards(profile, devices: DeviceSet, devs: dict[str, int], ram_bytes: int, space, n_trials, seed,
                cache) -> Choice | None:
    """Each card's best plan for its components (None when a card cannot hold them)."""
    comps: dict = {}
    flags = (False, False)
    for index in range(devices.count):
        names = [n for n in profile.components if devs[n] == index]
        if not names:
            continue
        key = (devices.specs[index], devices.vram_bytes[index], tuple(names))
        if key not in cache:
            cache[key] = _plan_card(sub_profile(profile, names), devices.specs[index], devices.vram_bytes[index],
                                    ram_bytes, space, n_trials, seed)
        if cache[key] is None:
            return None
        comps.update(cache[key].components)
        flags = (flags[0] or cache[key].vae_tiling, flags[1] or cache[key].vae_slicing)  # only the VAE's card sets them
    return Choice({n: comps[n] for n in profile.components}, *flags)


def _plan_card(profile: Profile, spec: HardwareSpec, vram_bytes: int, ram_bytes: int, space, n_trials,
               seed) -> Choice | None:
    try:
        return search(profile, spec, Budgets(vram_bytes, ram_bytes), space=space, n_trials=n_trials, seed=seed).best.choice
    except BudgetError:
        return None


def loader_arguments(placement: Placement) -> dict[str, dict]:
    """`from_pretrained` keyword arguments per component that load it where the placement runs it.

    DiffusionPipeline.from_pretrained (diffusers 0.42) takes only the strings "balanced", "cuda" or "cpu" as
    `device_map` (its "balanced" assigns components by size, not by this cost model), so a placement is expressed
    per component: `Model.from_pretrained(folder, subfolder=name, device_map={"": "cuda:i"})` for a resident
    component, then the pipeline built from those components. An offloaded component loads on the CPU (no
    device_map: its offloading hooks move it), and fp8 storage is applied after loading either way."""
    out = {}
    for name, device in placement.devices.items():
        args: dict = {"subfolder": name}
        if not placement.choice.components[name].offloaded:
            args["device_map"] = {"": f"cuda:{device}"}
        out[name] = args
    return out
