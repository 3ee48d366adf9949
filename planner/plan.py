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
    """One plan of the Pareto front. `plan.alternatives[i].apply(pipe)` applies it like the plan it belongs to;
    `str()` says what it does in words and what it costs."""

    choice: Choice
    predicted: Estimate
    # The Plan this alternative belongs to (its pipeline, device, budgets); set by Plan, not part of the JSON.
    parent: "Plan | None" = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {"choice": self.choice.to_dict(), "predicted": self.predicted.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "Alternative":
        return cls(Choice.from_dict(data["choice"]), Estimate.from_dict(data["predicted"]))

    def as_plan(self) -> "Plan":
        """This alternative as a Plan of its own (same pipeline, device, budgets and GPU; no alternatives)."""
        if self.parent is None:
            raise PlanError("this alternative belongs to no plan: take it from plan.alternatives")
        return dataclasses.replace(self.parent, choice=self.choice, predicted=self.predicted, alternatives=(),
                                   explain={})

    def apply(self, pipe, device: str | None = None) -> None:
        """Apply this alternative to `pipe` (validated first; on error `pipe` is unchanged)."""
        self.as_plan().apply(pipe, device)

    def __str__(self) -> str:
        budgets = self.parent.budgets if self.parent else {}
        return f"{describe_cost(self.predicted, budgets)}\n  {describe_in_words(self.choice)}"


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
    # Why this plan: budgets as given, how the RAM budget and the GPU were set, the binding budget(s) and the
    # fastest plan they block, the lossy-knob decision (see optimizer.plan_for). Empty for hand-written plans.
    explain: dict = field(default_factory=dict)
    loading: dict = field(default_factory=dict)  # load-time host-RAM peaks and max_shard_size advice (loading.py)
    versions: dict[str, str] = field(default_factory=_versions)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # each alternative knows its plan, so that plan.alternatives[i].apply(pipe) works on its own
        object.__setattr__(self, "alternatives", tuple(dataclasses.replace(a, parent=self) for a in self.alternatives))

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
        """What the plan is and why: GPU, workload, budgets and their use, binding budget, lossy knobs, the
        component table, the predictions, then the alternatives (the chosen one marked with *)."""
        rows = [f"{self.pipeline_class} on {describe_gpu(self)}; device {self.device}",
                f"workload: {describe_workload(self.workload)}" if self.workload else "workload: not recorded",
                *describe_budgets(self), f"binding: {describe_binding(self)}", f"lossy: {describe_lossy(self)}", "",
                f"{'component':16s} {'class':32s} plan"]
        for name, meta in self.components.items():
            rows.append(f"{name:16s} {meta.get('class', ''):32s} {describe_component(self.choice, name)}")
        if self.choice.vae_tiling or self.choice.vae_slicing:
            rows.append(f"{'vae tricks':16s} {'':32s} tiling={self.choice.vae_tiling} slicing={self.choice.vae_slicing}")
        if self.predicted is not None:
            rows.append(describe_estimate(self.predicted))
        if self.alternatives:
            rows += ["", f"alternatives (Pareto front of card peak x seconds x host RAM, {len(self.alternatives)}; "
                         "* = this plan; plan.alternatives[i].apply(pipe) applies one):"]
            for i, alt in enumerate(self.alternatives):
                mark = "*" if alt.choice == self.choice else " "
                rows.append(f"{mark}[{i}] {describe_cost(alt.predicted, self.budgets)}")
                rows.append(f"      {describe_in_words(alt.choice)}")
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


# ---------------------------------------------------------------- the plan explained in words

def describe_workload(workload: dict) -> str:
    """"1024x1024, 28 steps, batch 1, 512 text tokens, bfloat16" (+ frames, and how CFG runs)."""
    w = workload
    parts = [f"{w['height']}x{w['width']}" + (f", {w['num_frames']} frames" if w.get("num_frames") else ""),
             f"{w['num_inference_steps']} steps", f"batch {w.get('batch_size', 1)}"]
    if w.get("cfg_batch", 1) > 1:
        parts.append(f"CFG batched x{w['cfg_batch']}")
    if w.get("cfg_passes", 1) > 1:
        parts.append(f"CFG as {w['cfg_passes']} calls per step")
    return ", ".join(parts + [f"{w.get('max_sequence_length')} text tokens", str(w.get("dtype"))])


def describe_gpu(plan: Plan) -> str:
    from cost_models.gpu_names import CARDS

    hw = plan.hardware
    if not hw:
        return "no GPU recorded"
    card = CARDS.get(hw["name"])
    label = f"{card.label}, " if card else ""
    how = plan.explain.get("gpu_note")
    return f"{hw['name']} ({label}{format_size(hw['vram_bytes'])}{'; ' + how if how else ''})"


def _share(used: int, budget: int) -> str:
    return f"{100 * used / budget:.0f}%" if budget else "-"


def describe_budgets(plan: Plan) -> list[str]:
    """One line per budget: as given and in GiB, and the predicted use as a share of it."""
    b, e, x = plan.budgets, plan.predicted, plan.explain
    if not b:
        return ["budgets: not recorded (a hand-written plan)"]
    vram_given = f"{x['vram_as_given']} = " if x.get("vram_as_given") else ""
    ram_given = f"{x['ram_as_given']} = " if x.get("ram_as_given") else ""
    ram_note = f" ({x['ram_note']})" if x.get("ram_note", "given") != "given" else ""
    lines = [f"VRAM budget: {vram_given}{format_size(b['vram_bytes'])}",
             f"host RAM budget: {ram_given}{format_size(b['ram_bytes'])}{ram_note}"]
    if e is not None:
        lines[0] += f"; card peak {format_size(e.card_peak_bytes)} = {_share(e.card_peak_bytes, b['vram_bytes'])} of it"
        lines[1] += f"; host RAM {format_size(e.host_ram_bytes)} = {_share(e.host_ram_bytes, b['ram_bytes'])} of it"
    return lines


_BUDGET_NAMES = {"vram": "VRAM", "host_ram": "host RAM"}


def describe_binding(plan: Plan) -> str:
    """Which budget holds the plan back, and what the fastest plan it blocks would need."""
    x = plan.explain
    if "binding" not in x:
        return "not recorded (the plan was not made by the search)"
    if not x["binding"]:
        return "none (no priced plan is faster than this one: the budgets leave room)"
    blocked = Estimate.from_dict(x["blocked"])
    needs = {"vram": f"a {format_size(blocked.card_peak_bytes)} card peak",
             "host_ram": f"{format_size(blocked.host_ram_bytes)} of host RAM"}
    names = " and ".join(_BUDGET_NAMES[b] for b in x["binding"])
    return (f"{names} (the fastest plan priced, {blocked.total_s:.2f}s, needs "
            + " and ".join(needs[b] for b in x["binding"]) + ")")


def lossy_knobs(choice: Choice) -> list[str]:
    """The knobs of `choice` that change the output: fp8 storage per component, VAE tiling."""
    knobs = [f"{n} fp8 storage ({p.storage_dtype})" for n, p in choice.components.items() if p.fp8]
    return knobs + (["vae tiling"] if choice.vae_tiling else [])


def describe_lossy(plan: Plan) -> str:
    """Which lossy knobs the plan takes and what they buy (or why none were taken)."""
    x = plan.explain.get("lossy")
    if x is None:
        knobs = lossy_knobs(plan.choice)
        return (", ".join(knobs) if knobs else "none") + " (no decision recorded)"
    if not x["allowed"]:
        return "none: not allowed (allow_lossy=False)"
    taken = ", ".join(x["taken"]) if x["taken"] else "none"
    declined = f"; declined: {', '.join(x['declined'])}" if x.get("declined") else ""
    return f"{taken}{declined} ({x['reason']}; rule: {x['rule']})"


def describe_cost(est: Estimate, budgets: dict) -> str:
    """"card 7.10 GiB (95%)  host 31.20 GiB (52%)  9.10s": the predictions, as shares of the budgets if known."""
    card, host = format_size(est.card_peak_bytes), format_size(est.host_ram_bytes)
    if budgets:
        card += f" ({_share(est.card_peak_bytes, budgets['vram_bytes'])})"
        host += f" ({_share(est.host_ram_bytes, budgets['ram_bytes'])})"
    return f"card {card:>17s}  host {host:>17s}  {est.total_s:8.2f}s"


def _placement(p) -> str:
    from planner.strategy import BLOCK_LEVEL, GROUP_OFFLOAD, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD

    if p.strategy == MODEL_OFFLOAD:
        text = "on the GPU only while it runs (model CPU offload)"
    elif p.strategy == SEQUENTIAL_OFFLOAD:
        text = "streamed from CPU RAM layer by layer as it runs (sequential CPU offload)"
    elif p.strategy == GROUP_OFFLOAD:
        where = "disk" if p.offload_to_disk else ("pinned CPU RAM" if p.use_stream and not p.low_cpu_mem_usage
                                                  else "CPU RAM")
        n = p.num_blocks_per_group
        unit = f"{n} block{'s' if n != 1 else ''} at a time" if p.offload_type == BLOCK_LEVEL else "layer by layer"
        text = f"kept in {where}, loaded {unit}" + (", prefetched on a CUDA stream" if p.use_stream else "")
        text += " (record_stream)" if p.record_stream else ""
        text += ", pinned at each onload (low_cpu_mem_usage)" if p.low_cpu_mem_usage else ""
        text += f", first {p.resident_blocks} blocks resident" if p.resident_blocks else ""
    else:
        text = "on the GPU"
    return text + (f", weights in {p.storage_dtype} (lossy)" if p.fp8 else "")


def describe_in_words(choice: Choice) -> str:
    """What moves and what stays, in words: components grouped by where their weights live and how they move."""
    groups: dict[str, list[str]] = {}
    for name, p in choice.components.items():
        groups.setdefault(_placement(p), []).append(name)
    parts = [f"{', '.join(names)}: {where}" for where, names in groups.items()]
    if choice.vae_tiling:
        parts.append("VAE decodes in tiles (lossy)")
    if choice.vae_slicing:
        parts.append("VAE decodes one image at a time (slicing)")
    return "; ".join(parts)
