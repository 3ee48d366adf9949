"""Plan: the chosen knobs with everything needed to check, share and re-apply them (a versioned JSON file)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cost_models import Estimate
from planner.devices import check_device_name
from planner.errors import MemplanError, PlanError
from planner.schema import check_fields, check_value, short
from planner.strategy import Choice, ComponentPlan
from planner.units import format_size

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# What a plan says of each component: its class and config hash (apply refuses another), and the dtype its weights
# were priced in (`weights_dtype`); each is optional in a hand-written plan.
COMPONENT_KEYS = ("class", "config_hash", "dtype")


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    from importlib.metadata import PackageNotFoundError, version

    try:
        memplan = version("memplan")
    except PackageNotFoundError:
        memplan = "unknown"
    return {"memplan": memplan, "diffusers": diffusers.__version__, "torch": torch.__version__}


@dataclass(frozen=True)
class Alternative:
    choice: Choice
    predicted: Estimate

    def to_dict(self) -> dict:
        return {"choice": self.choice.to_dict(), "predicted": self.predicted.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "Alternative":
        return cls(Choice.from_dict(data["choice"]), Estimate.from_dict(data["predicted"]))


@dataclass(frozen=True)
class Plan:
    """A memory plan. `choice` holds the knobs; `predicted` the cost model's estimate for them;
    `components` maps each component to its class and config hash, so a plan is only applied where it fits."""

    pipeline_class: str
    components: dict[str, dict[str, str]]
    choice: Choice
    predicted: Estimate | None
    workload: dict = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)
    hardware: dict = field(default_factory=dict)
    device: str = "cuda"
    alternatives: tuple[Alternative, ...] = ()
    search: dict = field(default_factory=dict)  # {"study_name", "space"}: where measurements of it are recorded
    loading: dict = field(default_factory=dict)  # load-time host-RAM peaks and max_shard_size advice (loading.py)
    versions: dict[str, str] = field(default_factory=_versions)
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["choice"] = self.choice.to_dict()
        data["predicted"] = self.predicted.to_dict() if self.predicted else None
        data["alternatives"] = [a.to_dict() for a in self.alternatives]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Build a plan from its JSON object, every section checked first (keys, types, units, values):
        anything malformed is a PlanError naming the section, never a TypeError from deep inside."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan is a JSON object, got {type(data).__name__}; see the README's plan JSON schema")
        version = data.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version {short(version)} is not supported (this memplan reads "
                            f"{SCHEMA_VERSION}); re-plan with this version of memplan")
        missing = {"pipeline_class", "components", "choice"} - set(data)
        if missing:
            raise PlanError(f"plan is missing {sorted(missing)}; see the README's plan JSON schema")
        check_fields("plan", data, cls, PlanError, optional=True)
        for name, meta in data["components"].items():
            _check_keys(f"components.{name}", meta, set(COMPONENT_KEYS))
        kwargs = dict(data)
        kwargs["choice"] = _choice("choice", data["choice"])
        kwargs["predicted"] = _estimate("predicted", data["predicted"]) if data.get("predicted") else None
        kwargs["alternatives"] = tuple(_alternative(f"alternatives[{i}]", a)
                                       for i, a in enumerate(data.get("alternatives", [])))
        for section, check in _SECTIONS.items():
            if data.get(section):
                check(section, data[section])
        plan = cls(**kwargs)
        for choice in (plan.choice, *(a.choice for a in plan.alternatives)):
            choice.validate(list(plan.components))
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file; every error names the file (PlanError)."""
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except OSError as err:
            raise PlanError(f"cannot read plan {path}: {err.strerror or err}") from err
        except UnicodeDecodeError as err:
            raise PlanError(f"cannot read plan {path}: it is not UTF-8 text (byte {err.start}); "
                            "a plan file is JSON written by plan.save()") from err
        try:
            data = json.loads(text)
        except RecursionError as err:
            raise PlanError(f"cannot read plan {path}: its JSON is nested too deeply to be a plan") from err
        except ValueError as err:  # JSONDecodeError, and ints longer than Python's digit limit
            raise PlanError(f"cannot read plan {path}: {err}") from err
        try:
            return cls.from_dict(data)
        except MemplanError as err:
            raise PlanError(f"plan {path}: {err}") from err

    # ------------------------------------------------------------ use
    def check_fits(self, pipeline_class: str, components: dict[str, tuple[str, str]],
                   dtypes: dict[str, str | None] | None = None) -> None:
        """Raise PlanError unless the plan was made for this pipeline class and these components
        (name -> (class name, config hash)) with weights in these dtypes (name -> `weights_dtype`); what a
        hand-written plan leaves out (hash, dtype) is not checked."""
        if pipeline_class != self.pipeline_class:
            raise PlanError(f"plan is for {self.pipeline_class}, the pipeline is {pipeline_class}")
        self.choice.validate(list(components))
        for name, (class_name, hash_) in components.items():
            meta = self.components.get(name, {})
            if meta.get("class") and meta["class"] != class_name:
                raise PlanError(f"{name}: plan is for {meta['class']}, the pipeline has {class_name}")
            if meta.get("config_hash") and meta["config_hash"] != hash_:
                raise PlanError(f"{name}: its config differs from the one the plan was made for (config hash); "
                                "re-plan")
        for name, dtype in (dtypes or {}).items():
            planned = self.components.get(name, {}).get("dtype")
            if planned and dtype and planned != dtype:
                # Every byte figure of the plan scales with the element size: applying it anyway would mis-budget.
                raise PlanError(f"{name}: the plan was priced for {planned} weights, the pipeline's are {dtype}; "
                                f"re-plan for this pipeline (optimize(pipe, ...)) or load {name} in {planned}")

    def apply(self, pipe, device: str | None = None) -> None:
        """Apply this plan to `pipe` with diffusers' own hooks (validated first; on error `pipe` is unchanged)."""
        from planner.apply import apply_plan

        apply_plan(self, pipe, device or self.device)

    def summary(self) -> str:
        """A readable table: component, class, strategy, then the predictions."""
        rows = [f"{'component':16s} {'class':32s} plan"]
        for name, meta in self.components.items():
            rows.append(f"{name:16s} {meta.get('class', ''):32s} {describe_component(self.choice, name)}")
        if self.choice.vae_tiling or self.choice.vae_slicing:
            rows.append(f"{'vae tricks':16s} {'':32s} tiling={self.choice.vae_tiling} slicing={self.choice.vae_slicing}")
        if self.predicted is not None:
            rows.append(describe_estimate(self.predicted))
        return "\n".join(rows)


def weights_dtype(bytes_by_dtype: dict[str, int]) -> str | None:
    """The dtype a component's plan is priced in: the floating dtype holding most of its parameter bytes, fp8
    storage left out (a component a plan stored in fp8 still computes in, and is priced from, its own dtype)."""
    floats = {d: n for d, n in bytes_by_dtype.items() if d in _FLOAT_DTYPES}
    return max(floats, key=floats.get) if floats else None


_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _choice(where: str, data) -> Choice:
    check_fields(where, data, Choice, PlanError, required=("components",))
    _check_keys(f"{where}.components", data["components"])
    for name, cplan in data["components"].items():
        check_fields(f"{where}.components.{name}", cplan, ComponentPlan, PlanError)
    return Choice.from_dict(data)


def _estimate(where: str, data) -> Estimate:
    check_fields(where, data, Estimate, PlanError, extra={"total_s": float})
    return Estimate.from_dict(data)


def _alternative(where: str, data) -> Alternative:
    check_fields(where, data, Alternative, PlanError)
    return Alternative(_choice(f"{where}.choice", data["choice"]), _estimate(f"{where}.predicted", data["predicted"]))


def _check_workload(where: str, data) -> None:
    from planner.workload import Workload

    check_fields(where, data, Workload, PlanError)
    Workload.from_dict(data)  # its own range checks (WorkloadError)


def _check_hardware(where: str, data) -> None:
    from cost_models import HardwareSpec

    HardwareSpec.from_dict(data, where=where)  # HardwareError


def _check_budgets(where: str, data) -> None:
    from planner.search import Budgets  # search imports this module

    check_fields(where, data, Budgets, PlanError, optional=True)


def _check_search(where: str, data) -> None:
    from planner.space import SearchSpace

    _check_keys(where, data, {"study_name", "space"}, required={"study_name", "space"})
    check_value(f"{where}.study_name", data["study_name"], str, PlanError)
    check_fields(f"{where}.space", data["space"], SearchSpace, PlanError)


_SECTIONS = {"workload": _check_workload, "hardware": _check_hardware, "budgets": _check_budgets,
             "search": _check_search, "device": lambda where, data: check_device_name(data, where)}


def _check_keys(where: str, value, known: set[str] | None = None, required: set[str] = frozenset()) -> None:
    """A JSON object with only `known` keys (None: any) and every `required` one: typos are refused, not ignored."""
    if not isinstance(value, dict):
        raise PlanError(f"plan {where} must be a JSON object, got {type(value).__name__}")
    unknown, missing = set(value) - (set(value) if known is None else known), required - set(value)
    if unknown or missing:
        raise PlanError(f"plan {where} has unknown keys {sorted(unknown)}, is missing {sorted(missing)}; "
                        "see the README's plan JSON schema")


def describe_component(choice: Choice, name: str) -> str:
    p = choice.components[name]
    text = p.strategy
    if p.offload_type:
        text += f" {p.offload_type}" + (f" n={p.num_blocks_per_group}" if p.num_blocks_per_group else "")
        text += " +stream" if p.use_stream else ""
        text += " +record_stream" if p.record_stream else ""
        text += " +low_cpu_mem" if p.low_cpu_mem_usage else ""
        text += " +disk" if p.offload_to_disk else ""
    return text + (f" [{p.storage_dtype}]" if p.fp8 else "")


def describe_choice(choice: Choice) -> str:
    """The whole choice on one line: each component's plan, then the VAE flags that are on."""
    text = "; ".join(f"{n}: {describe_component(choice, n)}" for n in choice.components)
    flags = [f for f, on in (("vae tiling", choice.vae_tiling), ("vae slicing", choice.vae_slicing)) if on]
    return text + ("; " + ", ".join(flags) if flags else "")


def describe_estimate(est: Estimate) -> str:
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in est.phase_s.items())
    return (f"predicted: card peak {format_size(est.card_peak_bytes)} (allocator {format_size(est.allocated_peak_bytes)}, "
            f"in {est.peak_phase}); host RAM {format_size(est.host_ram_bytes)}; time {est.total_s:.2f}s ({phases})")
