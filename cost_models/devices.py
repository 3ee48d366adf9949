"""Several GPUs: whole components placed on cards, each card priced by the single-device cost model.

A thin layer, so it holds whatever the per-device model becomes: each card's components are priced with
`estimate()` on that card's spec as if the others did not exist (its own peak per phase, its own seconds), and
the one term several cards add is computed here, in `transfer_s`:

    T_cross = sum over calls of components not on the execution device of  io_bytes / staged_bytes_per_s
    staged_bytes_per_s = 1 / (1 / d2h(source card) + 1 / h2d_pinned(destination card))

A component away from the pipeline's execution device (where diffusers creates latents and embeddings) gets its
inputs copied to its card and its outputs copied back on every call. The copy is priced host-staged (card ->
pinned host buffer -> card), what torch does between cards without peer access (GeForce cards, most cloud pairs);
peer-to-peer over NVLink/PCIe would be faster, so this errs towards slower. Host RAM is priced over the whole
pipeline once (offloaded weights live in one host, whatever card they go to).
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.estimate import Estimate, estimate
from cost_models.hardware import HardwareSpec
from cost_models.memory import host_ram_bytes
from planner.profile_data import Profile
from planner.strategy import Choice


@dataclass(frozen=True)
class DeviceSet:
    """The cards of one machine: a spec and a VRAM budget (bytes) per device index."""

    specs: tuple[HardwareSpec, ...]
    vram_bytes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.specs or len(self.specs) != len(self.vram_bytes):
            raise ValueError(f"{len(self.specs)} GPU specs and {len(self.vram_bytes)} VRAM budgets: give one budget "
                             "per GPU (or one value for all)")

    @property
    def count(self) -> int:
        return len(self.specs)


def staged_bytes_per_s(source: HardwareSpec, destination: HardwareSpec) -> float:
    """Card-to-card copy through pinned host memory: the D2H and H2D legs run one after the other."""
    return 1.0 / (1.0 / source.d2h_bytes_per_s + 1.0 / destination.h2d_pinned_bytes_per_s)


def execution_device(order: list[str], placement: dict[str, int], choice: Choice) -> int:
    """Where the pipeline creates its tensors, as diffusers' `DiffusionPipeline._execution_device` decides: the
    onload device of the first group-offloaded component, else the device of the first component, "first" in
    the pipeline's `components` order (`order`; planner.crossing.module_order)."""
    grouped = [n for n in order if choice.components[n].strategy == "group_offload"]
    return placement[(grouped or order)[0]]


def transfer_s(profile: Profile, placement: dict[str, int], choice: Choice, devices: DeviceSet,
               io_bytes: dict[str, int], order: list[str] | None = None) -> float:
    """Seconds per pipeline call spent copying activations between cards (T_cross above)."""
    home = execution_device(order or list(profile.components), placement, choice)
    total = 0.0
    for name, comp in profile.components.items():
        if placement[name] == home or comp.calls_per_run == 0:
            continue
        if name not in io_bytes:
            raise ValueError(f"{name} runs on cuda:{placement[name]}, away from the execution device cuda:{home}, "
                             "but its input/output bytes per call are unknown (planner.crossing.io_bytes)")
        rate = staged_bytes_per_s(devices.specs[home], devices.specs[placement[name]])
        total += comp.calls_per_run * io_bytes[name] / rate
    return total


@dataclass(frozen=True)
class PlacementEstimate:
    """One placement priced: each card's own estimate (None for a card left empty), the cross-card copies, host RAM."""

    per_device: tuple[Estimate | None, ...]
    transfer_s: float
    host_ram_bytes: int

    @property
    def total_s(self) -> float:
        return sum(e.total_s for e in self.per_device if e is not None) + self.transfer_s

    def fits(self, devices: DeviceSet, ram_bytes: int) -> bool:
        cards = all(e is None or e.card_peak_bytes <= budget for e, budget in zip(self.per_device, devices.vram_bytes))
        return cards and self.host_ram_bytes <= ram_bytes


def sub_profile(profile: Profile, names: list[str]) -> Profile:
    from dataclasses import replace

    return replace(profile, components={n: profile.components[n] for n in names})


def sub_choice(choice: Choice, names: list[str]) -> Choice:
    return Choice({n: choice.components[n] for n in names}, choice.vae_tiling, choice.vae_slicing)


def estimate_placement(profile: Profile, choice: Choice, placement: dict[str, int], devices: DeviceSet,
                       io_bytes: dict[str, int], order: list[str] | None = None) -> PlacementEstimate:
    """Price `choice` with each component on its card `placement[name]` (a device index into `devices`);
    `order` is the pipeline's components order (default: the profile's)."""
    bad = {n: d for n, d in placement.items() if not isinstance(d, int) or not 0 <= d < devices.count}
    if bad or set(placement) != set(profile.components):
        raise ValueError(f"placement {placement} must give every component a device index below {devices.count}")
    per_device = []
    for index, spec in enumerate(devices.specs):
        names = [n for n in profile.components if placement[n] == index]
        per_device.append(estimate(sub_profile(profile, names), sub_choice(choice, names), spec) if names else None)
    return PlacementEstimate(tuple(per_device), transfer_s(profile, placement, choice, devices, io_bytes, order),
                             host_ram_bytes(profile.components, choice))
