"""Coverage: can memplan plan every image/video pipeline class the installed diffusers exports?

    python -m benchmarks.coverage [CLASS ...] [--kinds text conditioned] [--timeout-s 300] [--jobs 1] [--n-trials 8]
                                  [--label NAME]

In scope: every `DiffusionPipeline` subclass diffusers exports whose call returns images or video frames (read from
the output dataclass its `__call__` returns or documents), deprecated, ONNX and Flax pipelines aside. Text-to-image
and text-to-video classes first (and unconditional ones: "noise-to-image"); then those that take an image/video/mask input, with that input made here
(`_INPUTS`: blank PIL images of 512x512, 9 frames for a video) and passed to the call.

Each class is written as a diffusers model folder of configs only (a temp dir, no weights, no tokenizer files):
- the components (from `__init__`'s type hints) of a zoo entry of the same pipeline class, else of the largest zoo
  entry whose every model component this class has under the same name and class (FluxImg2Img <- flux-dev);
- other components: a transformers encoder gets the zoo's full-size config of its class (pretrained encoders are
  reused verbatim across pipelines: CLIP-L, bigG, T5-XXL, ...), anything else its class's default config;
  optional components (`_optional_components`) are left out (null) where the zoo entry leaves them out, built
  like the others where no entry matches (PixArt's text encoder is optional); schedulers hinted only as
  `KarrasDiffusionSchedulers` get `EulerDiscreteScheduler`; tokenizers have no files (discovery's stand-ins).
Then, in a forked child process per class (a per-class time limit; one failure never stops the others), via the
public API only: `plan_for(folder, budget, gpu="h100", device="cuda", ram_budget="256GB", n_trials=...)`, apply=False,
no GPU. The budget forces offloading: half the weights' bytes plus the card's CUDA context, so no all-resident plan
fits; where even the smallest plan needs more (activations larger than half the weights: small models), the budget
is raised to that smallest card peak (+1%), said in the row (`budget raised`), and the `offloads` column shows what
the plan does not keep resident.

Columns: components called (calls per run, as the profile records them), all traced (every called component has
traced activations/FLOPs: `activations_known` and, per recorded call, FLOPs or an activation peak > 0), plan ok,
error (the first line of the exception, or why it was not run). The share reported is planned-with-every-called-
component-traced over all classes in scope. Build errors (a folder the loader cannot build) count as failures.
Rows go to benchmarks/results/coverage-<label>.{md,jsonl}.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GPU = "h100"
KARRAS_DEFAULT = "EulerDiscreteScheduler"
DTYPE = "bfloat16"
# No GPU needed (apply=False): the plan is priced on an H100 and searched as for CUDA; host RAM is fixed so the
# machine's free memory at the moment does not change the plans.
PLAN_ARGS = dict(gpu=GPU, device="cuda", ram_budget="256GB")
INPUT_SIZE = 512
VIDEO_INPUT_FRAMES = 9
# Call arguments that carry an image / video / mask to condition on, and how to make one.
_INPUTS = {
    "image": "image", "init_image": "image", "control_image": "image", "last_image": "image",
    "reference_image": "image", "ref_image": "image", "images": "images", "mask_image": "mask",
    "video": "video", "control_video": "video", "input_video": "video",
}


@dataclass(frozen=True)
class Case:
    """One pipeline class in scope: what it makes and which inputs its call needs."""

    name: str
    output: str  # "image" | "video"
    inputs: tuple[str, ...] = ()
    prompted: bool = True  # the call takes a prompt (else: unconditional / class-conditional)

    @property
    def kind(self) -> str:
        if self.inputs:
            source = "video" if any(_INPUTS[i] == "video" for i in self.inputs) else "image"
        else:
            source = "text" if self.prompted else "noise"
        return f"{source}-to-{self.output}"


@dataclass
class Row:
    pipeline: str
    kind: str
    source: str = ""  # "zoo:<name>" or "zoo x<n>, defaults x<m>"
    components: dict[str, int] = field(default_factory=dict)  # called component -> calls per run
    untraced: list[str] = field(default_factory=list)
    all_traced: bool | None = None
    plan_ok: bool = False
    error: str = ""
    budget_bytes: int = 0
    budget_raised: bool = False  # half the weights was below the smallest feasible card: planned at that card
    offloaded: list[str] = field(default_factory=list)  # components the plan does not keep resident
    weights_bytes: int = 0
    seconds: float = 0.0

    @property
    def covered(self) -> bool:
        return self.plan_ok and bool(self.all_traced)


# ---- which classes are in scope -------------------------------------------------------------------------------


def _output_fields(cls: type) -> set[str]:
    """Field names of the output dataclasses `__call__` returns or documents (`...Output`)."""
    import diffusers

    source = inspect.getsource(cls.__call__)
    names = set(re.findall(r"return\s+(\w*Output)\(", source))  # what it returns; else what its doc says
    names = names or set(re.findall(r"\b(\w*Output)\b", inspect.getdoc(cls.__call__) or ""))
    module = sys.modules[cls.__module__]
    fields: set[str] = set()
    for name in names:
        out = getattr(module, name, None) or getattr(diffusers, name, None)
        if out is None:
            out = getattr(getattr(diffusers, "pipelines", None), name, None)
        if isinstance(out, type) and dataclasses.is_dataclass(out):
            fields |= {f.name for f in dataclasses.fields(out)}
    return fields


def _output_kind(cls: type) -> str | None:
    fields = _output_fields(cls)
    if fields & {"frames", "videos", "video"}:
        return "video"
    if fields & {"images", "image"}:
        return "image"
    return None


def _needed_inputs(cls: type) -> tuple[str, ...]:
    params = inspect.signature(cls.__call__).parameters
    return tuple(n for n in params if n in _INPUTS and params[n].default in (None, inspect.Parameter.empty))


def pipeline_cases() -> tuple[list[Case], dict[str, str]]:
    """(classes in scope, text-to-x first; {excluded class: why})."""
    import diffusers
    from diffusers import DiffusionPipeline

    cases, excluded = [], {}
    for name in sorted(dir(diffusers)):
        try:
            cls = getattr(diffusers, name)
        except Exception as err:  # an optional dependency missing: said, not hidden
            excluded[name] = f"not importable: {type(err).__name__}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)) or cls is DiffusionPipeline:
            continue
        if ".deprecated." in cls.__module__ or name.startswith(("Onnx", "Flax")):
            excluded[name] = "deprecated / ONNX / Flax"
            continue
        kind = _output_kind(cls)
        if kind is None:
            excluded[name] = f"its call returns {sorted(_output_fields(cls)) or 'no documented output'}"
            continue
        cases.append(Case(name, kind, _needed_inputs(cls), "prompt" in inspect.signature(cls.__call__).parameters))
    cases.sort(key=lambda c: (bool(c.inputs), c.name))
    return cases, excluded


# ---- a model folder per class ------------------------------------------------------------------------------------


def _hint_classes(cls: type) -> dict[str, object]:
    """`__init__` parameter -> the class (or enum) its type hint names; the first member of a union."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # a hint naming an uninstalled optional class: take what inspect can evaluate
        hints = {}
        for n, p in inspect.signature(cls.__init__).parameters.items():
            if isinstance(p.annotation, type):
                hints[n] = p.annotation
    out = {}
    for name, hint in hints.items():
        options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
        first = next((a for a in options if isinstance(a, type)), None)
        if first is not None and name != "return":
            out[name] = first
    return out


def _library(cls: type) -> str:
    """The model_index.json library of a class, as diffusers' save_pretrained names it."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        if getattr(lib, cls.__name__, None) is cls:
            return lib.__name__
    return cls.__module__.split(".")[-2]  # a class defined in a pipeline's own module ("ltx2", "stable_diffusion")


def _zoo_indexes() -> dict[str, dict]:
    from planner.sources import ZOO_DIR, zoo_names

    return {entry: json.loads((ZOO_DIR / entry / "model_index.json").read_text()) for entry in zoo_names()}


def _module_classes(index: dict) -> dict[str, str]:
    return {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
            and ("tokenizer" not in v[1].lower() and "scheduler" not in v[1].lower())}


def zoo_family(pipeline: str, modules: dict[str, str]) -> str | None:
    """The zoo entry to take a class's configs from: one of the same pipeline class, else the largest entry whose
    every model component is one of this class's, under the same name and class (Flux img2img <- flux-dev)."""
    indexes = _zoo_indexes()
    same = [e for e, index in indexes.items() if index["_class_name"] == pipeline]
    if same:
        return same[0]
    subsets = [(len(_module_classes(index)), e) for e, index in indexes.items()
               if _module_classes(index).items() <= modules.items()]
    return max(sorted(subsets), key=lambda se: se[0])[1] if subsets else None  # ties: first by name


def _encoder_configs() -> dict[str, list[tuple[str, Path]]]:
    """{transformers class: [(component name, zoo config path), ...]}: pretrained encoders (CLIP-L, bigG, T5-XXL,
    UMT5-XXL, ...) are reused verbatim across pipelines; diffusers classes are configured per model, so not these."""
    from planner.sources import ZOO_DIR

    found: dict[str, list[tuple[str, Path]]] = {}
    for entry, index in _zoo_indexes().items():
        for comp, value in index.items():
            config = ZOO_DIR / entry / comp / "config.json"
            if isinstance(value, list) and value[0] == "transformers" and config.is_file():
                found.setdefault(value[1], []).append((comp, config))
    return found


def _default_config(cls: type) -> dict:
    if cls.__module__.startswith("transformers"):
        if cls.config_class is None:
            raise ValueError(f"hinted as {cls.__name__}, a base class with no config of its own")
        config = cls.config_class().to_dict()
        return {**config, "architectures": [cls.__name__]}
    return {"_class_name": cls.__name__}  # from_config fills every other field with the class default


def _glue_entry(cls: object) -> list[str]:
    from diffusers import SchedulerMixin
    from transformers import AutoTokenizer

    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return ["diffusers", KARRAS_DEFAULT]  # KarrasDiffusionSchedulers: any of its members
    if cls is AutoTokenizer:  # not a tokenizer class itself: the generic fast one (no files: a stand-in)
        return ["transformers", "PreTrainedTokenizerFast"]
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return ["diffusers", cls.__name__]
    return [_library(cls), cls.__name__]


def write_folder(case: Case, dest: Path) -> str:
    """Write `case`'s model folder into `dest`; returns where its configs came from."""
    import diffusers
    import torch

    from planner.sources import ZOO_DIR

    cls = getattr(diffusers, case.name)
    hints = _hint_classes(cls)
    modules = {n: h.__name__ for n, h in hints.items() if isinstance(h, type) and issubclass(h, torch.nn.Module)}
    family = zoo_family(case.name, modules)
    family_index = _zoo_indexes()[family] if family else {}
    family_modules = _module_classes(family_index)
    optional = set(getattr(cls, "_optional_components", []) or [])
    encoders = _encoder_configs()
    index: dict = {"_class_name": case.name, "_diffusers_version": diffusers.__version__,
                   "_memplan_workload": {"dtype": DTYPE}}
    counts = {"zoo": 0, "default": 0}
    dest.mkdir(parents=True, exist_ok=True)
    for name, hint in hints.items():
        if name in family_modules:  # the family's own component
            index[name] = family_index[name]
            config = json.loads((ZOO_DIR / family / name / "config.json").read_text())
            counts["zoo"] += 1
        elif name not in modules and isinstance(family_index.get(name), list) and None not in family_index[name]:
            index[name] = family_index[name]  # the family's scheduler / tokenizer classes
            continue
        elif name in optional and family:  # the real repo (the zoo entry) leaves it out
            index[name] = [None, None]
            continue
        elif name in modules:
            index[name] = [_library(hint), hint.__name__]
            found = encoders.get(hint.__name__, [])
            same_name = [p for comp, p in found if comp == name]
            try:
                config = json.loads((same_name or [p for _, p in found])[0].read_text()) if found else _default_config(hint)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            counts["zoo" if found else "default"] += 1
        else:
            if hint.__module__.split(".")[0] in ("diffusers", "transformers"):
                index[name] = _glue_entry(hint)
            continue
        (dest / name).mkdir(exist_ok=True)
        (dest / name / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))
    where = f"{family} + " if family else ""
    return where + f"zoo x{counts['zoo']}, defaults x{counts['default']}"


# ---- one class, in a child process -------------------------------------------------------------------------------


def _make_input(kind: str):
    from PIL import Image

    if kind == "mask":
        return Image.new("L", (INPUT_SIZE, INPUT_SIZE), 255)
    blank = Image.new("RGB", (INPUT_SIZE, INPUT_SIZE), (127, 127, 127))
    return {"image": blank, "images": [blank], "video": [blank] * VIDEO_INPUT_FRAMES}[kind]


def _traced(comp) -> bool:
    """Activations and FLOPs of this component were traced (not assumed) for every call recorded."""
    if not getattr(comp, "activations_known", True):
        return False
    calls = getattr(comp, "calls", ())
    if calls:
        return all(c.flops > 0 or c.activation_peak_bytes > 0 for c in calls)
    return comp.flops_per_call > 0 or comp.activation_peak_bytes > 0


def _called(prof) -> dict[str, int]:
    return {n: c.calls_per_run for n, c in prof.components.items() if c.calls_per_run > 0 and c.role != "unused"}


def run_case(case: Case, folder: Path, n_trials: int) -> Row:
    """Plan `case` from its folder through the public API (in this process); failures become the row's error."""
    row = Row(case.name, case.kind)
    start = time.perf_counter()
    try:
        from cost_models.hardware import get_gpu
        from planner import BudgetError, Workload, plan_for, profile
        from planner.sources import load_source

        source = load_source(folder)
        row.weights_bytes = sum(t.numel() * t.element_size() for m in source.components.values()
                                for t in [*m.parameters(), *m.buffers()])
        row.budget_bytes = row.weights_bytes // 2 + get_gpu(GPU).context_bytes
        inputs = {name: _make_input(_INPUTS[name]) for name in case.inputs}
        try:
            plan = plan_for(source, row.budget_bytes, n_trials=n_trials, **PLAN_ARGS, **inputs)
        except BudgetError as err:  # activations alone exceed half the weights: the smallest card that fits
            row.budget_bytes = int(err.min_card_bytes * 1.01)
            row.budget_raised = True
            plan = plan_for(source, row.budget_bytes, n_trials=n_trials, **PLAN_ARGS, **inputs)
        row.plan_ok = True
        row.offloaded = [n for n, c in plan.choice.components.items() if c.strategy != "resident"]
        prof = profile(source, Workload.from_dict(plan.workload))  # the profile the plan was made from (cached)
        row.components = _called(prof)
        row.untraced = [n for n in row.components if not _traced(prof.components[n])]
        row.all_traced = not row.untraced
    except Exception as err:  # the row records it; the sweep goes on
        row.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    row.seconds = round(time.perf_counter() - start, 1)
    return row


@dataclass
class _Job:
    case: Case
    source: str
    proc: object  # multiprocessing.Process
    out: Path
    log: Path
    start: float


def _run_child(case: Case, folder: Path, n_trials: int, source: str, out: Path, log: Path) -> None:
    """The forked child: plan one class, write its row; its own output goes to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    row = run_case(case, folder, n_trials)
    row.source = source
    out.write_text(json.dumps(asdict(row)))


def _start(case: Case, n_trials: int, work: Path) -> _Job:
    import multiprocessing

    folder, out, log = work / case.name, work / f"{case.name}.json", work / f"{case.name}.log"
    source = write_folder(case, folder)
    # fork: the child starts with diffusers' pipeline modules and planner already imported by this process
    proc = multiprocessing.get_context("fork").Process(target=_run_child, daemon=True,
                                                       args=(case, folder, n_trials, source, out, log))
    proc.start()
    return _Job(case, source, proc, out, log, time.perf_counter())


def _finish(job: _Job, timeout_s: float) -> Row:
    seconds = round(time.perf_counter() - job.start, 1)
    if job.proc.is_alive():  # over its time limit
        job.proc.kill()
        job.proc.join()
        return Row(job.case.name, job.case.kind, job.source, error=f"time limit: over {timeout_s:.0f} s",
                   seconds=seconds)
    if job.out.is_file():
        return Row(**json.loads(job.out.read_text()))
    lines = job.log.read_text(errors="replace").strip().splitlines() if job.log.is_file() else []
    return Row(job.case.name, job.case.kind, job.source, seconds=seconds,
               error=f"child exited {job.proc.exitcode}: {(lines or ['no output'])[-1]}"[:300])


def sweep(cases: list[Case], jobs: int, timeout_s: float, n_trials: int, work: Path):
    """Yield one row per case, as they finish: `jobs` forked children at a time, each killed at `timeout_s`;
    a class whose folder cannot be written, whose child crashes or runs over is a row with that reason."""
    from multiprocessing.connection import wait

    pending, running = list(cases), []
    while pending or running:
        while pending and len(running) < jobs:
            case = pending.pop(0)
            try:
                running.append(_start(case, n_trials, work))
            except Exception as err:
                yield Row(case.name, case.kind, error=f"folder not written: {type(err).__name__}: {err}"[:300])
        if not running:
            continue
        first_deadline = min(j.start for j in running) + timeout_s
        wait([j.proc.sentinel for j in running], timeout=max(0.0, first_deadline - time.perf_counter()))
        for job in list(running):
            if not job.proc.is_alive() or time.perf_counter() - job.start >= timeout_s:
                running.remove(job)
                yield _finish(job, timeout_s)


# ---- report ------------------------------------------------------------------------------------------------------


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "-"}[value]


def table(rows: list[Row], excluded: dict[str, str]) -> str:
    lines = ["| class | kind | configs | components called (calls per run) | all traced? | plan ok | offloads | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        called = ", ".join(f"{n} ({c})" for n, c in r.components.items()) or "-"
        traced = _mark(r.all_traced) + (f" (not: {', '.join(r.untraced)})" if r.untraced else "")
        error = r.error.replace("|", "\\|")
        offloads = (", ".join(r.offloaded) or "none") if r.plan_ok else "-"
        offloads += " (budget raised)" if r.budget_raised else ""
        lines.append(f"| {r.pipeline} | {r.kind} | {r.source} | {called} | {traced} | {_mark(r.plan_ok)} | {offloads} "
                     f"| {error} |")
    covered = sum(r.covered for r in rows)
    by_kind: dict[str, list[Row]] = {}
    for r in rows:
        group = "conditioned" if r.kind.startswith(("image-", "video-")) else "text/noise-to-x"
        by_kind.setdefault(group, []).append(r)
    lines += ["", f"**Planned with every called component traced: {covered}/{len(rows)} "
                  f"({100 * covered / max(len(rows), 1):.0f}%)** (goal: 90%)"]
    for kind, group in sorted(by_kind.items(), key=lambda kv: kv[0] == "conditioned"):
        n = sum(r.covered for r in group)
        lines.append(f"- {kind}: {n}/{len(group)}; plan ok {sum(r.plan_ok for r in group)}/{len(group)}")
    if excluded:
        lines += ["", "Not in scope:", *[f"- {n}: {why}" for n, why in sorted(excluded.items())]]
    return "\n".join(lines)


def header(args) -> str:
    import diffusers

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    return (f"# memplan coverage ({args.label})\n\n`python -m benchmarks.coverage {' '.join(sys.argv[1:])}` at memplan "
            f"{rev or '?'}, diffusers {diffusers.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"on a {os.cpu_count()}-CPU machine without a GPU (plans priced for an {GPU}, per-class limit "
            f"{args.timeout_s:.0f} s, {args.n_trials} Optuna trials).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="pipeline classes (default: every class in scope)")
    parser.add_argument("--kinds", nargs="*", choices=("text", "conditioned"), default=("text", "conditioned"))
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per-class time limit (default 300)")
    parser.add_argument("--n-trials", type=int, default=8, help="Optuna trials per plan (default 8)")
    parser.add_argument("--jobs", type=int, default=1, help="classes planned at once (default 1)")
    parser.add_argument("--label", default=time.strftime("%Y-%m-%d"), help="results file name suffix")
    args = parser.parse_args(argv)
    cases, excluded = pipeline_cases()
    if args.names:
        cases = [c for c in cases if c.name in args.names]
    cases = [c for c in cases if ("conditioned" if c.inputs else "text") in args.kinds]
    print(f"coverage: {len(cases)} pipeline classes, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MEMPLAN_CACHE"] = str(Path(tmp) / "cache")  # the children's profile cache: fresh, thrown away
        import planner.optimizer  # noqa: F401  (imported once here, inherited by every forked child)

        for i, r in enumerate(sweep(cases, args.jobs, args.timeout_s, args.n_trials, Path(tmp)), 1):
            rows.append(r)
            print(f"[{i}/{len(cases)}] {r.pipeline}: plan {_mark(r.plan_ok)}, traced {_mark(r.all_traced)}, "
                  f"{r.seconds:.0f} s {r.error[:120]}", flush=True)
    order = {c.name: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order[r.pipeline])
    text = header(args) + "\n\n" + table(rows, excluded if not args.names else {})
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"coverage-{args.label}.md").write_text(text + "\n")
    with open(RESULTS / f"coverage-{args.label}.jsonl", "w") as f:
        f.writelines(json.dumps(asdict(r)) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
