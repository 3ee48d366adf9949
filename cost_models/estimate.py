"""`estimate(profile, choice, hardware)`: the predicted peak VRAM, host RAM and seconds of one plan.

The budget's meaning: "8GB" is the memory of the card the plan must run on. A plan fits when
    card_bytes = allocator_peak * reserved_over_allocated + context_bytes  <=  budget
where reserved_over_allocated (caching-allocator overhead) and context_bytes (CUDA context, kernels, library
state) are the hardware spec's named defaults until calibrate() measures them on the card.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cost_models.hardware import HardwareSpec
from cost_models.memory import host_ram_bytes, phase_peaks
from cost_models.time import phase_seconds
from planner.profile_data import Profile
from planner.strategy import Choice


@dataclass(frozen=True)
class Estimate:
    allocated_peak_bytes: int  # torch allocator's max_memory_allocated, predicted
    card_peak_bytes: int  # what the card must hold: reserved (with overhead) + CUDA context
    peak_phase: str
    phase_peak_bytes: dict[str, int]
    host_ram_bytes: int
    phase_s: dict[str, float]

    @property
    def total_s(self) -> float:
        return sum(self.phase_s.values())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_s": self.total_s}

    @classmethod
    def from_dict(cls, data: dict) -> "Estimate":
        return cls(**{k: v for k, v in data.items() if k != "total_s"})


def card_bytes(allocated_bytes: int, hw: HardwareSpec) -> int:
    return int(allocated_bytes * hw.reserved_over_allocated) + hw.context_bytes


def estimate(profile: Profile, choice: Choice, hw: HardwareSpec) -> Estimate:
    """Price `choice` for the profiled pipeline on `hw` (no side effects; cheap enough for thousands of calls)."""
    choice.validate(list(profile.components))
    peaks = phase_peaks(profile.components, choice)
    phase = max(peaks, key=peaks.get)
    return Estimate(
        allocated_peak_bytes=peaks[phase],
        card_peak_bytes=card_bytes(peaks[phase], hw),
        peak_phase=phase,
        phase_peak_bytes=peaks,
        host_ram_bytes=host_ram_bytes(profile.components, choice),
        phase_s=phase_seconds(profile.components, choice, hw),
    )
