"""Published GPU measurements beside memplan's prices: `python -m benchmarks.published [rows.json]`.

Each row of the calibration set (`../shared/calibration/rows.json`, see its README) is expressed as a memplan
plan on the zoo architecture, workload and GPU it names, priced with `cost_models.estimate`, and compared:

    error = (predicted - published) / published

Accounting rules (one rule for every row, so results stay comparable):
- memory is read as GiB (`reading: open` too, the calibration README's convention);
- `MA` and `unstated` figures are compared with the predicted allocator peak (`max_memory_allocated`);
- `MR` (`max_memory_reserved`) with allocator peak x reserved_over_allocated. The CUDA context is NOT added:
  torch's reserved counter does not hold it (the budget's card peak does; see cost_models/estimate.py);
- `MR after loading` with the weight bytes resident before the first call (no activations, no allocator
  overhead: loading allocates few, large tensors);
- a time that covers one phase (text encoders, the denoising loop, the decode) is compared with that phase alone;
  "one denoising step" with the denoise phase / steps;
- components the row's setting does not load (named "not loaded", or, for rows setting components one by one,
  not named at all) are left out of the profile.

Rows memplan cannot express are listed with the reason. The table and a JSON of the rows go to
`benchmarks/results/published/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from cost_models import HardwareSpec, estimate, get_gpu
from planner.strategy import (BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, RESIDENT, SEQUENTIAL_OFFLOAD,
                              Choice, ComponentPlan)

logger = logging.getLogger(__name__)

DEFAULT_ROWS = Path(__file__).resolve().parents[2] / "shared" / "calibration" / "rows.json"
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "published"
GIB = 2**30
CATEGORIES = ("resident", "offload", "fp8", "vae")


class Unexpressible(ValueError):
    """A row memplan cannot express as a plan; the message is the reason."""


# ---------------------------------------------------------------- a row as a memplan plan

@dataclass(frozen=True)
class RowPlan:
    """What memplan prices for one row: the zoo model, its workload, the loaded components and the plan."""

    model: str
    workload: dict
    components: tuple[str, ...]  # the loaded ones
    choice: Choice
    gpu: str
    category: str


def _group_plan(call: dict) -> ComponentPlan:
    offload_type = call.get("offload_type", BLOCK_LEVEL)
    if offload_type not in (BLOCK_LEVEL, LEAF_LEVEL):
        raise Unexpressible(f"offload_type {offload_type!r}")
    stream = bool(call.get("use_stream", False))
    n = call.get("num_blocks_per_group", 1) if offload_type == BLOCK_LEVEL else None
    return ComponentPlan(GROUP_OFFLOAD, offload_type, n, use_stream=stream,
                         record_stream=bool(call.get("record_stream", False)),
                         low_cpu_mem_usage=bool(call.get("low_cpu_mem_usage", False)),
                         offload_to_disk=bool(call.get("offload_to_disk_path")))


def _component_plan(calls: list[dict], default: ComponentPlan) -> tuple[ComponentPlan | None, bool]:
    """(plan, vae_slicing) of one component's calls, in order; plan None when the component is not loaded."""
    plan, slicing = default, False
    for call in calls:
        name = call["call"]
        if name.startswith("not loaded"):
            return None, False
        if name == "to":
            plan = ComponentPlan(RESIDENT, storage_dtype=plan.storage_dtype)
        elif name in ("enable_group_offload", "diffusers.hooks.apply_group_offloading"):
            plan = dataclasses.replace(_group_plan(call), storage_dtype=plan.storage_dtype)
        elif name == "enable_layerwise_casting":
            plan = dataclasses.replace(plan, storage_dtype=call["storage_dtype"])
        elif name == "vae.enable_slicing":
            slicing = True
        else:
            raise Unexpressible(f"component call {name!r}")
    return plan, slicing


_PIPELINE_CALLS = {"to": RESIDENT, "enable_model_cpu_offload": MODEL_OFFLOAD,
                   "enable_sequential_cpu_offload": SEQUENTIAL_OFFLOAD}


def row_plan(row: dict, component_names: list[str]) -> RowPlan:
    """The memplan plan a row's setting describes (raises Unexpressible with the reason)."""
    setting = row["setting"]["diffusers"]
    pipeline_calls = [c["call"] for c in setting.get("pipeline", [])]
    unknown = [c for c in pipeline_calls if c not in _PIPELINE_CALLS]
    if unknown:
        raise Unexpressible(f"pipeline call(s) {unknown}")
    per_component = setting.get("components", {})
    extra = sorted(set(per_component) - set(component_names))
    if extra:
        raise Unexpressible(f"components {extra} are not in the zoo's {row['model']}")
    default = ComponentPlan(_PIPELINE_CALLS[pipeline_calls[-1]]) if pipeline_calls else None
    plans, slicing = {}, False
    for name in component_names:
        if default is None and name not in per_component:
            continue  # set up one by one, and this one not named: not loaded
        plan, sliced = _component_plan(per_component.get(name, []), default or ComponentPlan())
        if plan is not None:
            plans[name] = plan
            slicing = slicing or sliced
    choice = Choice(plans, vae_slicing=slicing)
    choice.validate()
    return RowPlan(row["model"], row["workload"], tuple(plans), choice, row["gpu"], _category(choice))


def _category(choice: Choice) -> str:
    """One category per row, the most specific first: fp8, VAE tricks, offload, resident."""
    plans = choice.components.values()
    if any(p.fp8 for p in plans):
        return "fp8"
    if choice.vae_slicing or choice.vae_tiling:
        return "vae"
    return "offload" if any(p.offloaded for p in plans) else "resident"


# ---------------------------------------------------------------- profiles

_PROFILES: dict[str, object] = {}


def workload_of(row_workload: dict):
    from planner.workload import Workload

    fields = {k: v for k, v in row_workload.items() if v is not None}
    return Workload(**fields)


def profile_for(model: str, workload):
    """The zoo model's meta profile at `workload` (profiles are cached on disk by planner.profiler)."""
    from planner.profiler import profile
    from planner.sources import load_source

    key = json.dumps([model, workload.to_dict()], sort_keys=True)
    if key not in _PROFILES:
        _PROFILES[key] = profile(load_source(model, workload.dtype), workload)
    return _PROFILES[key]


# A row timing part of a pipeline says so in its model name / note; the components it leaves out, by class name.
_LEFT_OUT_BY_NOTE = {"without T5": "T5", "CLIP text encoder alone": "T5"}


def _subset(prof, names: tuple[str, ...], row: dict):
    notes = f"{row.get('model_name', '')} {row.get('model_note') or ''}"
    dropped = [cls for phrase, cls in _LEFT_OUT_BY_NOTE.items() if phrase in notes]
    keep = {n: prof.components[n] for n in names
            if not any(prof.components[n].class_name.startswith(cls) for cls in dropped)}
    return dataclasses.replace(prof, components=keep)


# ---------------------------------------------------------------- predicted vs published

@dataclass(frozen=True)
class Comparison:
    row: str
    quantity: str  # "memory" | "time"
    setting: str
    metric: str
    published: float  # GiB or seconds
    predicted: float
    category: str
    fit: bool  # use_for_fitting

    @property
    def error(self) -> float:
        return (self.predicted - self.published) / self.published


def _memory_predicted(measured: dict, est, prof, choice: Choice, hw: HardwareSpec) -> float:
    from cost_models.memory import resident_bytes

    metric, what = measured["metric"], measured["what"]
    if metric == "MR after loading":
        return sum(resident_bytes(c, choice.components[n]) for n, c in prof.components.items()) / GIB
    allocated = est.phase_peak_bytes["denoise"] if "denoise phase" in what else est.allocated_peak_bytes
    if metric == "MR":
        return allocated * hw.reserved_over_allocated / GIB
    if metric in ("MA", "unstated"):
        return allocated / GIB
    raise Unexpressible(f"memory metric {metric!r}")


def _time_predicted(measured: dict, est, workload) -> float:
    covers = measured["covers"]
    phases = est.phase_s
    if covers.startswith("one pipeline call"):
        return est.total_s
    if covers.startswith("one denoising step"):
        return phases.get("denoise", 0.0) / workload.num_inference_steps
    if "transformer forward" in covers:
        return phases.get("denoise", 0.0)
    if "text-encoder stage" in covers:
        return phases.get("encode", 0.0)
    if covers.startswith("VAE decode"):
        return phases.get("decode", 0.0)
    raise Unexpressible(f"time covering {covers!r}")


def compare_row(row: dict, hw: HardwareSpec | None = None) -> list[Comparison]:
    """The row's memory and time figures beside memplan's prices (raises Unexpressible)."""
    workload = workload_of(row["workload"])
    full = profile_for(row["model"], workload)
    plan = row_plan(row, list(full.components))
    prof = _subset(full, plan.components, row)
    choice = Choice({n: plan.choice.components[n] for n in prof.components}, plan.choice.vae_tiling,
                    plan.choice.vae_slicing)
    hw = hw or get_gpu(plan.gpu)
    est = estimate(prof, choice, hw)
    out = []
    summary = row["setting"]["summary"]
    memory, time_ = row["measured"].get("memory"), row["measured"].get("time")
    if memory:
        out.append(Comparison(row["id"], "memory", summary, memory["metric"], memory["value"],
                              _memory_predicted(memory, est, prof, choice, hw), plan.category,
                              bool(memory.get("use_for_fitting", True))))
    if time_:
        out.append(Comparison(row["id"], "time", summary, time_["covers"], time_["value"],
                              _time_predicted(time_, est, workload), plan.category,
                              bool(time_.get("use_for_fitting", True))))
    return out


def load_rows(path: Path = DEFAULT_ROWS) -> list[dict]:
    data = json.loads(Path(path).read_text())
    return data["rows"]


def compare_all(rows: list[dict], specs: dict[str, HardwareSpec] | None = None
                ) -> tuple[list[Comparison], list[tuple[str, str]]]:
    """(comparisons, [(row id, why not expressible)]); `specs` overrides the GPU table per GPU name."""
    got, refused = [], []
    for row in rows:
        try:
            got += compare_row(row, (specs or {}).get(row["gpu"]))
        except Unexpressible as err:
            refused.append((row["id"], str(err)))
    return got, refused


# ---------------------------------------------------------------- report

def summary(comps: list[Comparison]) -> dict[tuple[str, str], tuple[int, float, float]]:
    """(category or 'all', quantity) -> (n, median |error|, max |error|) over the rows usable for fitting."""
    out = {}
    for quantity in ("memory", "time"):
        for cat in (*CATEGORIES, "all"):
            errs = [abs(c.error) for c in comps if c.quantity == quantity and c.fit and cat in (c.category, "all")]
            if errs:
                out[(cat, quantity)] = (len(errs), statistics.median(errs), max(errs))
    return out


def _fmt(value: float, quantity: str) -> str:
    return f"{value:.2f} GiB" if quantity == "memory" else f"{value:.4g} s"


def table(comps: list[Comparison], refused: list[tuple[str, str]]) -> str:
    lines = ["| row | setting | metric | published | predicted | error |", "|---|---|---|---|---|---|"]
    for c in comps:
        note = "" if c.fit else " (not for fitting)"
        lines.append(f"| {c.row} | {c.setting} | {c.metric}{note} | {_fmt(c.published, c.quantity)} | "
                     f"{_fmt(c.predicted, c.quantity)} | {100 * c.error:+.1f}% |")
    lines += ["", "| category | quantity | rows | median abs error | max abs error |", "|---|---|---|---|---|"]
    for (cat, quantity), (n, med, worst) in summary(comps).items():
        lines.append(f"| {cat} | {quantity} | {n} | {100 * med:.1f}% | {100 * worst:.1f}% |")
    if refused:
        lines += ["", "Rows memplan cannot express:", ""] + [f"- {rid}: {why}" for rid, why in refused]
    return "\n".join(lines)


def write_results(comps: list[Comparison], refused: list[tuple[str, str]], out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(table(comps, refused) + "\n")
    rows = [{**dataclasses.asdict(c), "error": c.error} for c in comps]
    (out_dir / "rows.json").write_text(json.dumps({"rows": rows, "refused": refused}, indent=1) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", default=str(DEFAULT_ROWS), help="calibration rows.json")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for table.md and rows.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    comps, refused = compare_all(load_rows(Path(args.rows)))
    print(table(comps, refused))
    print(f"\nwritten to {write_results(comps, refused, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
