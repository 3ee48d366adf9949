"""Benchmark scenarios: one frozen `Scenario` per measured run, loaded from JSON or taken from a built-in set.

A scenario names a pipeline ("tiny-flux", "tiny-sdxl" or a zoo name), the workload overrides, the budget, the
GPU spec the plan is priced for, the plan ("optimize", a reference strategy, or a plan JSON path) and the device
it runs on. Scenario files are plain JSON:

    {"defaults": {"device": "cpu", "gpu": "rtx-4090"},
     "scenarios": [{"name": "flux-8gb", "pipeline": "tiny-flux", "budget": "8GB",
                    "workload": {"height": 32, "width": 32, "num_inference_steps": 4}}]}

(a bare list of scenario objects works too).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from planner.units import parse_size

TINY_PIPELINES = ("tiny-flux", "tiny-sdxl")
OPTIMIZE = "optimize"
# Reference strategies: name -> needs CUDA (streams and accelerate's model/sequential offload do).
REFERENCE_PLANS: dict[str, bool] = {
    "all_resident": False,
    "model_offload": True,
    "sequential_offload": True,
    "group_leaf_stream": True,
    "group_block_1": False,
    "group_block_4": False,
}
WORKLOAD_KEYS = ("height", "width", "num_inference_steps", "num_frames", "batch_size", "max_sequence_length")


@dataclass(frozen=True)
class Scenario:
    """One measured run. `workload` overrides the pipeline's default call (keys: WORKLOAD_KEYS);
    `measured_steps` denoising steps really run, scaled to `num_inference_steps` with the per-step time;
    `gpu_overrides` replace HardwareSpec fields (e.g. context_bytes=0 so tiny models can fill a budget)."""

    name: str
    pipeline: str
    budget: int | str = "24GB"
    gpu: str = "rtx-4090"
    plan: str = OPTIMIZE
    device: str = "cpu"
    workload: dict = field(default_factory=dict)
    measured_steps: int = 2
    n_trials: int = 100
    allow_lossy: bool = True
    ram_budget: int | str | None = None
    gpu_overrides: dict = field(default_factory=dict)
    seed: int = 0
    compare_gpu: str | None = None  # also price the plan for this spec (e.g. the table entry beside a calibration)
    storage: str | None = None  # Optuna RDB URL: optimize there, and record the measured run (or failure) there

    def __post_init__(self) -> None:
        if not self.name or not self.pipeline:
            raise ValueError(f"scenario {self.name!r}: `name` and `pipeline` are required")
        unknown = set(self.workload) - set(WORKLOAD_KEYS)
        if unknown:
            raise ValueError(f"scenario {self.name!r}: unknown workload keys {sorted(unknown)}; use {WORKLOAD_KEYS}")
        parse_size(self.budget)  # raises a ValueError naming the bad size
        if self.measured_steps < 1:
            raise ValueError(f"scenario {self.name!r}: measured_steps must be >= 1")
        if self.plan != OPTIMIZE and self.plan not in REFERENCE_PLANS and not self.plan.endswith(".json"):
            raise ValueError(f"scenario {self.name!r}: plan {self.plan!r} is not 'optimize', a reference "
                             f"({', '.join(REFERENCE_PLANS)}) or a plan .json path")

    @property
    def budget_bytes(self) -> int:
        return parse_size(self.budget)

    @property
    def needs_cuda(self) -> bool:
        return REFERENCE_PLANS.get(self.plan, False)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Scenario":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"scenario {data.get('name')!r}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**data)


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Scenarios from a JSON file: a list of objects, or {"defaults": {...}, "scenarios": [...]}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read scenarios {path}: {err}") from err
    defaults = data.get("defaults", {}) if isinstance(data, dict) else {}
    items = data.get("scenarios") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of scenarios or an object with a 'scenarios' list")
    return [Scenario.from_dict({**defaults, **item}) for item in items]


def save_scenarios(scenarios: list[Scenario], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"scenarios": [s.to_dict() for s in scenarios]}, indent=2) + "\n")


# ---------------------------------------------------------------- built-in sets

# Tiny pipelines priced on a card without context or allocator overhead, so a budget of a few MiB binds.
BARE = {"context_bytes": 0, "reserved_over_allocated": 1.0}
TINY_FLUX_WORK = {"height": 32, "width": 32, "num_inference_steps": 4, "max_sequence_length": 16}
TINY_SDXL_WORK = {"height": 32, "width": 32, "num_inference_steps": 4}


def _tiny(name: str, pipeline: str, plan: str, budget: int | str, device: str = "cpu") -> Scenario:
    work = TINY_FLUX_WORK if pipeline == "tiny-flux" else TINY_SDXL_WORK
    return Scenario(name, pipeline, budget=budget, plan=plan, device=device, workload=work, gpu_overrides=BARE,
                    n_trials=40)


def smoke() -> list[Scenario]:
    """CPU, tiny pipelines, seconds: two optimized plans under a binding budget and two references."""
    return [
        _tiny("tiny-flux-opt-400kB", "tiny-flux", OPTIMIZE, "400kB"),
        _tiny("tiny-sdxl-opt-2MB", "tiny-sdxl", OPTIMIZE, "2MB"),
        _tiny("tiny-flux-block1", "tiny-flux", "group_block_1", "400kB"),
        _tiny("tiny-sdxl-resident", "tiny-sdxl", "all_resident", "2MB"),
    ]


def tiny_references(device: str = "cpu", budgets: dict[str, str] | None = None) -> list[Scenario]:
    """Every reference strategy that runs on `device`, on both tiny pipelines."""
    budgets = budgets or {"tiny-flux": "400kB", "tiny-sdxl": "2MB"}
    cuda = device.startswith("cuda")
    return [_tiny(f"{pipe}-{ref}", pipe, ref, budgets[pipe], device)
            for pipe in TINY_PIPELINES for ref, needs_cuda in REFERENCE_PLANS.items() if cuda or not needs_cuda]


GPU_BUDGETS_GB = (6, 8, 12, 16, 24)


def gpu_sweep(gpu: str = "h100", budgets_gb: tuple[int, ...] = GPU_BUDGETS_GB,
              compare_gpu: str | None = None) -> list[Scenario]:
    """Full-size SDXL-base and Flux-dev at 1024², 2 measured steps, on CUDA: optimize per budget, then references.

    Ordered by value per second: the optimized plans first (SDXL is quick), the slow references last, so a sweep
    cut short by its time limit still holds the main results."""
    work = {"height": 1024, "width": 1024}
    out = [Scenario(f"{pipe}-opt-{gb}GB", pipe, budget=f"{gb}GB", gpu=gpu, device="cuda", workload=work,
                    compare_gpu=compare_gpu)
           for pipe in ("sdxl-base", "flux-dev") for gb in budgets_gb]
    refs = ("all_resident", "group_block_1", "group_leaf_stream", "model_offload", "group_block_4",
            "sequential_offload")
    ref_budget = {"sdxl-base": "12GB", "flux-dev": "24GB"}
    out += [Scenario(f"{pipe}-{ref}", pipe, budget=ref_budget[pipe], gpu=gpu, plan=ref, device="cuda", workload=work,
                     compare_gpu=compare_gpu)
            for pipe in ("sdxl-base", "flux-dev") for ref in refs]
    return out


def dry_run() -> list[Scenario]:
    """The GPU sweep's shape on CPU with the tiny pipelines: optimize at three budgets, then the CPU references."""
    budgets = {"tiny-flux": ("300kB", "400kB", "1MB"), "tiny-sdxl": ("1.5MB", "2MB", "8MB")}
    out = [_tiny(f"{pipe}-opt-{b}", pipe, OPTIMIZE, b) for pipe in TINY_PIPELINES for b in budgets[pipe]]
    return out + tiny_references("cpu")


BUILTIN_SETS = {"smoke": smoke, "tiny-references": tiny_references, "dry-run": dry_run, "gpu": gpu_sweep}


def resolve(spec: str) -> list[Scenario]:
    """A built-in set name (smoke, tiny-references, dry-run, gpu) or a scenarios JSON file."""
    if spec in BUILTIN_SETS:
        return BUILTIN_SETS[spec]()
    if Path(spec).is_file():
        return load_scenarios(spec)
    raise ValueError(f"scenarios {spec!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor a JSON file")
