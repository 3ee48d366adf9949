"""The knobs of a memory plan: one frozen `ComponentPlan` per component and a `Choice` for the whole pipeline.

Every combination that `validate` accepts is one diffusers applies as written: memplan never emits a combination
diffusers would reject or rewrite (streams force `num_blocks_per_group=1`; `record_stream` needs `use_stream`;
accelerate's model/sequential offload is pipeline-wide and excludes group offloading).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from planner.errors import PlanError  # noqa: F401  (re-exported: planner.strategy.PlanError is public)

RESIDENT, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD, GROUP_OFFLOAD = "resident", "model_offload", "sequential_offload", "group_offload"
STRATEGIES = (RESIDENT, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD, GROUP_OFFLOAD)
PIPELINE_WIDE = (MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD)
BLOCK_LEVEL, LEAF_LEVEL = "block_level", "leaf_level"
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")


@dataclass(frozen=True)
class ComponentPlan:
    """How one component is placed. Group-offload fields are meaningful only with strategy='group_offload'."""

    strategy: str = RESIDENT
    offload_type: str | None = None
    num_blocks_per_group: int | None = None
    use_stream: bool = False
    record_stream: bool = False
    low_cpu_mem_usage: bool = False
    offload_to_disk: bool = False
    storage_dtype: str | None = None  # None: the compute dtype; else an fp8 dtype for layerwise casting
    # Partial residency (block_level only): these blocks (FQNs from the profile, e.g. "transformer_blocks.3") live
    # on the device for the whole call; the others are grouped and offloaded as diffusers does (planner.apply).
    resident_blocks: tuple[str, ...] = ()

    @property
    def fp8(self) -> bool:
        return self.storage_dtype is not None

    @property
    def offloaded(self) -> bool:
        return self.strategy != RESIDENT

    def validate(self, name: str) -> None:
        for flag in ("use_stream", "record_stream", "low_cpu_mem_usage", "offload_to_disk"):
            if not isinstance(getattr(self, flag), bool):
                raise PlanError(f"{name}: {flag} must be true or false, got {getattr(self, flag)!r}")
        if self.strategy not in STRATEGIES:
            raise PlanError(f"{name}: strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.storage_dtype is not None and self.storage_dtype not in FP8_DTYPES:
            raise PlanError(f"{name}: storage_dtype {self.storage_dtype!r} is not one of {FP8_DTYPES} or null")
        if self.strategy == SEQUENTIAL_OFFLOAD and self.fp8:
            raise PlanError(f"{name}: fp8 storage with sequential offload is not supported; use group offload")
        if self.strategy == GROUP_OFFLOAD:
            self._validate_group(name)
        elif self != ComponentPlan(self.strategy, storage_dtype=self.storage_dtype):
            raise PlanError(f"{name}: offload_type/num_blocks_per_group/streams/disk/resident_blocks apply only to "
                            "group_offload")

    def _validate_group(self, name: str) -> None:
        if self.offload_type not in (BLOCK_LEVEL, LEAF_LEVEL):
            raise PlanError(f"{name}: group_offload needs offload_type 'block_level' or 'leaf_level'")
        if self.offload_type == LEAF_LEVEL and self.num_blocks_per_group is not None:
            raise PlanError(f"{name}: num_blocks_per_group applies only to block_level; remove it")
        if self.offload_type == BLOCK_LEVEL:
            n = self.num_blocks_per_group
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise PlanError(f"{name}: block_level needs num_blocks_per_group >= 1, got {n!r}")
            if self.use_stream and n != 1:
                raise PlanError(f"{name}: use_stream requires num_blocks_per_group=1 (diffusers would rewrite {n} to 1)")
        kept = self.resident_blocks
        if not isinstance(kept, tuple) or not all(isinstance(b, str) and b for b in kept):
            raise PlanError(f"{name}: resident_blocks must be a list of block names (e.g. [\"transformer_blocks.0\"]), "
                            f"got {kept!r}")
        if len(set(kept)) != len(kept):
            raise PlanError(f"{name}: resident_blocks names a block twice: {sorted(b for b in set(kept) if kept.count(b) > 1)}")
        if kept and self.offload_type != BLOCK_LEVEL:
            raise PlanError(f"{name}: resident_blocks applies only to block_level group offloading")
        if self.record_stream and not self.use_stream:
            raise PlanError(f"{name}: record_stream requires use_stream=True")
        if self.low_cpu_mem_usage and not self.use_stream:
            raise PlanError(f"{name}: low_cpu_mem_usage only matters with use_stream=True; remove it")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "resident_blocks": list(self.resident_blocks)}

    @classmethod
    def from_dict(cls, data: dict) -> "ComponentPlan":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PlanError(f"unknown component plan keys {sorted(unknown)}")
        kept = data.get("resident_blocks", ())
        # JSON has lists; a plan holds tuples (hashable, frozen). Anything else is left for validate() to name.
        return cls(**{**data, "resident_blocks": tuple(kept) if isinstance(kept, list) else kept})


@dataclass(frozen=True)
class Choice:
    """The whole pipeline's knobs: per-component plans plus the VAE's tiling and slicing."""

    components: dict[str, ComponentPlan] = field(default_factory=dict)
    vae_tiling: bool = False
    vae_slicing: bool = False

    def validate(self, component_names: list[str] | None = None) -> None:
        for flag in ("vae_tiling", "vae_slicing"):
            if not isinstance(getattr(self, flag), bool):
                raise PlanError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        for name, plan in self.components.items():
            plan.validate(name)
        wide = {p.strategy for p in self.components.values() if p.strategy in PIPELINE_WIDE}
        if wide and any(p.strategy != next(iter(wide)) for p in self.components.values()):
            raise PlanError(
                f"{next(iter(wide))} is pipeline-wide in diffusers (enable_model_cpu_offload / "
                "enable_sequential_cpu_offload): give every component that strategy, or use group_offload"
            )
        if component_names is not None:
            missing, extra = set(component_names) - set(self.components), set(self.components) - set(component_names)
            if missing or extra:
                raise PlanError(f"plan components do not match the pipeline: missing {sorted(missing)}, "
                                f"unknown {sorted(extra)}")

    @property
    def pipeline_strategy(self) -> str | None:
        """model_offload / sequential_offload when the plan uses one, else None (per-component)."""
        wide = {p.strategy for p in self.components.values()} & set(PIPELINE_WIDE)
        return next(iter(wide)) if wide else None

    def to_dict(self) -> dict:
        return {"components": {n: p.to_dict() for n, p in self.components.items()},
                "vae_tiling": self.vae_tiling, "vae_slicing": self.vae_slicing}

    @classmethod
    def from_dict(cls, data: dict) -> "Choice":
        comps = {n: ComponentPlan.from_dict(p) for n, p in data["components"].items()}
        return cls(comps, data.get("vae_tiling", False), data.get("vae_slicing", False))
