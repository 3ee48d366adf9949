"""The search space, written once, define-by-run: which knobs apply to which component, and their values.

The same `suggest_*` functions drive Optuna (through a trial) and exhaustive enumeration (through
`enumerate_component`), so the search and its reference always explore exactly the same space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from optuna.distributions import CategoricalDistribution, IntDistribution

from planner.errors import PlanError
from planner.profile_data import ComponentProfile, Profile
from planner.strategy import (BLOCK_LEVEL, FP8_DTYPES, GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, RESIDENT,
                              SEQUENTIAL_OFFLOAD, Choice, ComponentPlan)

PER_COMPONENT = "per_component"
NO_FP8 = "none"


class Asker(Protocol):
    def suggest_categorical(self, name: str, choices: Sequence): ...
    def suggest_int(self, name: str, low: int, high: int): ...


@dataclass(frozen=True)
class SearchSpace:
    """What the target can run: `cuda` enables streams and accelerate's model/sequential offload;
    `allow_lossy` enables fp8 storage and VAE tiling (both change the output); `allow_disk` enables offload_to_disk (for when host RAM is short)."""

    cuda: bool = True
    allow_lossy: bool = True
    allow_disk: bool = False

    def modes(self) -> list[str]:
        return [PER_COMPONENT, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD] if self.cuda else [PER_COMPONENT]


def suggest_storage(ask: Asker, name: str, comp: ComponentProfile, mode: str, space: SearchSpace) -> str | None:
    if not (space.allow_lossy and comp.supports_layerwise_casting and comp.fp8_saving_bytes) or mode == SEQUENTIAL_OFFLOAD:
        return None
    value = ask.suggest_categorical(f"{name}.storage_dtype", [NO_FP8, *FP8_DTYPES])
    return None if value == NO_FP8 else value


def suggest_group(ask: Asker, name: str, comp: ComponentProfile, space: SearchSpace, storage: str | None) -> ComponentPlan:
    types = [BLOCK_LEVEL, LEAF_LEVEL] if comp.has_blocks else [LEAF_LEVEL]
    offload_type = ask.suggest_categorical(f"{name}.offload_type", types)
    use_stream = ask.suggest_categorical(f"{name}.use_stream", [False, True]) if space.cuda else False
    n_blocks = None
    if offload_type == BLOCK_LEVEL:
        n_blocks = 1 if use_stream else ask.suggest_int(f"{name}.num_blocks_per_group", 1, comp.max_blocks)
    record = low_cpu = disk = False
    if use_stream:
        record = ask.suggest_categorical(f"{name}.record_stream", [False, True])
        low_cpu = ask.suggest_categorical(f"{name}.low_cpu_mem_usage", [False, True])
    if space.allow_disk and offload_type not in comp.disk_unsafe_offload_types:
        disk = ask.suggest_categorical(f"{name}.offload_to_disk", [False, True])
    return ComponentPlan(GROUP_OFFLOAD, offload_type, n_blocks, use_stream, record, low_cpu, disk, storage)


def suggest_component(ask: Asker, name: str, comp: ComponentProfile, mode: str, space: SearchSpace) -> ComponentPlan:
    storage = suggest_storage(ask, name, comp, mode, space)
    if mode != PER_COMPONENT:
        return ComponentPlan(mode, storage_dtype=storage)
    if comp.calls_per_run == 0:  # never called: offloading it is pure cost
        return ComponentPlan(RESIDENT, storage_dtype=storage)
    strategy = ask.suggest_categorical(f"{name}.strategy", [RESIDENT, GROUP_OFFLOAD])
    if strategy == RESIDENT:
        return ComponentPlan(RESIDENT, storage_dtype=storage)
    return suggest_group(ask, name, comp, space, storage)


def suggest_vae(ask: Asker, profile: Profile, space: SearchSpace) -> tuple[bool, bool]:
    """Tiling changes pixels (tiles are blended), so it is a lossy knob; slicing is exact."""
    vaes = [c for c in profile.components.values() if c.role == "vae"]
    # offered only where they change the decode for this workload (traced: latents beyond one tile; batch > 1)
    can_tile = space.allow_lossy and any(c.tiled_activation_peak_bytes is not None for c in vaes)
    tiling = can_tile and ask.suggest_categorical("vae.tiling", [False, True])
    can_slice = any(c.sliced_activation_peak_bytes is not None for c in vaes)
    slicing = can_slice and ask.suggest_categorical("vae.slicing", [False, True])
    return bool(tiling), bool(slicing)


def suggest_choice(ask: Asker, profile: Profile, space: SearchSpace) -> Choice:
    mode = ask.suggest_categorical("pipeline", space.modes())
    comps = {n: suggest_component(ask, n, c, mode, space) for n, c in profile.components.items()}
    tiling, slicing = suggest_vae(ask, profile, space)
    return Choice(comps, tiling, slicing)


def choice_trial_params(choice: Choice, profile: Profile, space: SearchSpace) -> tuple[dict, dict]:
    """The Optuna params and their distributions for `choice` (for `optuna.trial.create_trial`).

    Raises ValueError when `choice` is not in `space` for this profile (a knob the space does not offer, a
    value outside its choices), so a trial is never stored under params that would replay to another plan."""
    recorder = _Replay(choice)
    try:
        replayed = suggest_choice(recorder, profile, space)
    except (KeyError, AttributeError) as err:
        raise PlanError(f"choice does not match the pipeline's components: {err}") from err
    if replayed != choice:
        raise PlanError("choice is outside the search space (a knob it sets is not searched, e.g. streams with "
                        "cuda=False or fp8 with allow_lossy=False): plan it with the space it was made in")
    return recorder.params, recorder.distributions


class _Replay:
    """An Asker that answers from a known Choice, recording the answers as Optuna params and distributions."""

    def __init__(self, choice: Choice):
        self.choice, self.params, self.distributions = choice, {}, {}

    def _answer(self, name: str):
        if name == "pipeline":
            return self.choice.pipeline_strategy or PER_COMPONENT
        if name == "vae.tiling":
            return self.choice.vae_tiling
        if name == "vae.slicing":
            return self.choice.vae_slicing
        comp, knob = name.split(".", 1)
        value = getattr(self.choice.components[comp], knob)
        return NO_FP8 if knob == "storage_dtype" and value is None else value

    def _record(self, name: str, value, distribution):
        self.params[name], self.distributions[name] = value, distribution
        return value

    def suggest_categorical(self, name, choices):
        choices = tuple(choices)
        value = self._answer(name)
        if value not in choices:
            raise PlanError(f"choice is outside the search space: {name}={value!r} is not one of {choices}")
        return self._record(name, value, CategoricalDistribution(choices))

    def suggest_int(self, name, low, high):
        value = self._answer(name)
        if not isinstance(value, int) or not low <= value <= high:
            raise PlanError(f"choice is outside the search space: {name}={value!r} is not in [{low}, {high}]")
        return self._record(name, value, IntDistribution(low, high))


class _Enumerator:
    """An Asker that walks every path of a define-by-run function, one call per leaf (depth-first)."""

    def __init__(self):
        self.path: list[int] = []
        self.sizes: list[int] = []
        self.depth = 0

    def suggest_categorical(self, name, choices):
        choices = list(choices)
        if self.depth == len(self.path):
            self.path.append(0)
            self.sizes.append(len(choices))
        value = choices[self.path[self.depth]]
        self.depth += 1
        return value

    def suggest_int(self, name, low, high):
        return self.suggest_categorical(name, range(low, high + 1))

    def advance(self) -> bool:
        self.path, self.sizes = self.path[: self.depth], self.sizes[: self.depth]
        while self.path and self.path[-1] + 1 >= self.sizes[-1]:
            self.path.pop()
            self.sizes.pop()
        if not self.path:
            return False
        self.path[-1] += 1
        self.depth = 0
        return True


def _every_answer(suggest) -> list:
    """Every value `suggest(asker)` can return, walking each path of its define-by-run questions once."""
    walker, answers = _Enumerator(), []
    while True:
        answers.append(suggest(walker))
        if not walker.advance():  # resets the walker's depth for the next path
            return answers


def enumerate_component(name: str, comp: ComponentProfile, mode: str, space: SearchSpace) -> list[ComponentPlan]:
    """Every ComponentPlan `suggest_component` can return for this component in this mode."""
    return _every_answer(lambda ask: suggest_component(ask, name, comp, mode, space))


def enumerate_vae(profile: Profile, space: SearchSpace) -> list[tuple[bool, bool]]:
    """Every (tiling, slicing) pair `suggest_vae` can return for this pipeline."""
    return _every_answer(lambda ask: suggest_vae(ask, profile, space))
