"""Bad input through the API: our own exception, a message naming the offender and the fix, and the pipeline as it
was (parameters and their values, dtypes, devices, diffusers hook registries, accelerate hooks, VAE flags, the
pipeline's and its modules' attributes) after every failed call, Ctrl-C included.

Each test takes `state(pipe)` before the failing call and compares it after. Tiny real pipelines, CPU only;
"cuda" is either really absent (this torch has no CUDA) or pretended by the `pretend_cuda` fixture with every call
into diffusers/accelerate that would need it mocked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import TINY_WORKLOAD, build_tiny, run_tiny
from planner import errors
from planner.apply import apply_plan
from planner.errors import ArgumentError, DeviceError, MemplanError, PlanError
from planner.optimizer import optimize, plan_for
from planner.plan import Plan
from planner.sources import meta_twin
from planner.strategy import BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, ComponentPlan
from test_apply import BLOCK1, E4M3, LEAF, make_plan, modules, pipe_state, reference

E4M3_BLOCK = dataclasses.replace(BLOCK1, storage_dtype=E4M3)


def state(pipe) -> dict:
    """Everything of `pipe` a failed call must leave as it was: test_apply's pipe_state (tensor storages, dtypes,
    devices, hook registries, accelerate hooks, VAE flags, memplan's attributes), plus every tensor's values and the
    attribute names of the pipeline and of each of its modules (a leftover `forward` override, hook, flag)."""
    values = {(c, n): t.detach().clone() for c, m in modules(pipe).items()
              for n, t in [*m.named_parameters(), *m.named_buffers()] if t.device.type != "meta"}
    attrs = {c: {n: sorted(sub.__dict__) for n, sub in m.named_modules()} for c, m in modules(pipe).items()}
    return {**pipe_state(pipe), "values": values, "attrs": attrs, "pipe_attrs": sorted(pipe.__dict__)}


def assert_same(before: dict, after: dict) -> None:
    values_before, values_after = before.pop("values"), after.pop("values")
    assert after == before
    assert values_after.keys() == values_before.keys()
    assert all(torch.equal(values_after[k], v) for k, v in values_before.items())


# ---------------------------------------------------------------- the hierarchy

def test_every_error_is_a_memplan_error_and_a_value_error():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, MemplanError) and issubclass(cls, ValueError)
    import planner.search
    import planner.strategy

    assert planner.strategy.PlanError is PlanError and planner.search.BudgetError is errors.BudgetError  # re-exports


# ---------------------------------------------------------------- plan files: every section, the file named

@pytest.fixture(scope="module")
def full_plan() -> dict:
    """A plan made by plan_for for the tiny Flux pipeline: every section filled (predicted, alternatives, workload,
    hardware, budgets, versions, search, device)."""
    with pytest.MonkeyPatch.context() as mp, __import__("tempfile").TemporaryDirectory() as cache:
        mp.setenv("MEMPLAN_CACHE", cache)
        plan = plan_for(build_tiny("flux"), "8GB", gpu="rtx-4090", device="cpu", n_trials=4, **TINY_WORKLOAD)
    data = plan.to_dict()
    assert all(data[k] for k in ("predicted", "alternatives", "workload", "hardware", "budgets", "versions",
                                 "search", "device"))
    return data


@pytest.fixture(scope="module")
def flux():
    return build_tiny("flux")


def _set(path: str, value):
    """An edit of the plan dict: `path` is dotted keys (ints index lists); value DELETE removes the key."""
    def edit(data):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            data = data[key]
        if value is DELETE:
            del data[last]
        else:
            data[last] = value
    return edit


DELETE = object()
BAD_SECTIONS = {  # id -> (edit, what the message must say)
    "schema_version true": (_set("schema_version", True), "schema_version True is not supported"),
    "schema_version float": (_set("schema_version", 1.0), "schema_version 1.0 is not supported"),
    "pipeline_class int": (_set("pipeline_class", 3), "plan.pipeline_class must be a string, got int 3"),
    "predicted bool as int": (_set("predicted.card_peak_bytes", True),
                              "predicted.card_peak_bytes must be an int, got boolean True"),
    "predicted float as int": (_set("predicted.host_ram_bytes", 1.5),
                               "predicted.host_ram_bytes must be an int, got number 1.5"),
    "predicted negative seconds": (_set("predicted.phase_s.denoise", -1.0),
                                   "predicted.phase_s.denoise must not be negative"),
    "predicted missing key": (_set("predicted.peak_phase", DELETE), r"predicted is missing \['peak_phase'\]"),
    "predicted unknown key": (_set("predicted.peak_gb", 3), r"predicted has unknown keys \['peak_gb'\]"),
    "alternatives not a list": (_set("alternatives", {"a": 1}), "plan.alternatives must be a list of JSON objects"),
    "alternative bad strategy": (_set("alternatives.0.choice.components.vae.strategy", "teleport"),
                                 "vae: strategy 'teleport'"),
    "alternative bad estimate": (_set("alternatives.0.predicted.phase_s", [1.0]),
                                 r"alternatives\[0\].predicted.phase_s must be a JSON object of finite numbers, got list"),
    "workload bool height": (_set("workload.height", True), "workload.height must be an int, got boolean True"),
    "workload negative height": (_set("workload.height", -8), "height=-8 is not valid"),
    "workload typo": (_set("workload.heigth", 64), r"workload has unknown keys \['heigth'\]"),
    "hardware string bytes": (_set("hardware.vram_bytes", "24GB"), "hardware.vram_bytes must be an int"),
    "hardware out of range": (_set("hardware.compute_efficiency", 2.0), "compute_efficiency must be in"),
    "hardware missing name": (_set("hardware.name", DELETE), r"hardware is missing \['name'\]"),
    "budgets float bytes": (_set("budgets.vram_bytes", 8e9), "budgets.vram_bytes must be an int, got number 8000000000.0"),
    "budgets typo": (_set("budgets.vram", 8), r"budgets has unknown keys \['vram'\]"),
    "versions not strings": (_set("versions.torch", 2), "plan.versions.torch must be a string, got int 2"),
    "search space flag": (_set("search.space.cuda", "yes"), "search.space.cuda must be true or false"),
    "search without study": (_set("search.study_name", DELETE), r"search .*missing \['study_name'\]"),
    "device unknown": (_set("device", "tpu"), "device 'tpu' is not supported"),
    "device not a string": (_set("device", 0), "plan.device must be a string"),
    "component dtype": (_set("components.vae.dtype", 5), "plan.components.vae.dtype must be a string, got int 5"),
    "component typo": (_set("components.vae.hash", "x"), r"components.vae has unknown keys \['hash'\]"),
    "choice flag string": (_set("choice.vae_tiling", "false"), "choice.vae_tiling must be true or false"),
    "choice blocks float": (_set("choice.components.transformer.num_blocks_per_group", 1.0),
                            "choice.components.transformer.num_blocks_per_group must be an int or null"),
    "choice blocks bool": (_set("choice.components.transformer.resident_blocks", False),
                           "resident_blocks must be a list of strings, got boolean"),
    "choice components list": (_set("choice.components", ["vae"]), "choice.components must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_SECTIONS))
def test_every_plan_section_is_checked_on_load_naming_the_file(tmp_path, full_plan, flux, case):
    edit, message = BAD_SECTIONS[case]
    data = json.loads(json.dumps(full_plan))
    edit(data)
    path = tmp_path / "my-plan.json"
    path.write_text(json.dumps(data))
    before = state(flux)
    with pytest.raises(PlanError, match=message) as info:
        Plan.load(path).apply(flux, device="cpu")
    assert str(path) in str(info.value)
    assert_same(before, state(flux))


BAD_FILES = {  # id -> (bytes, message)
    "not UTF-8": (b'{"schema_version": 1, "pipeline_class": "\xff\xfe"}', "is not UTF-8 text"),
    "deep nesting": (b'{"schema_version": 1, "search": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     "nested too deeply"),
    "huge int": (b'{"schema_version": 1' + b"0" * 5000 + b"}", "cannot read plan"),
    "NaN": (None, "predicted.phase_s.denoise must be a finite number, got number nan"),
    "not JSON": (b"{not json", "cannot read plan"),
    "a list": (b"[1, 2]", "a plan is a JSON object, got list"),
    "empty": (b"", "cannot read plan"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_plan_files_name_the_file(tmp_path, full_plan, flux, case):
    content, message = BAD_FILES[case]
    if content is None:  # Python's json writes and reads NaN, which no plan number may be
        data = json.loads(json.dumps(full_plan))
        data["predicted"]["phase_s"]["denoise"] = float("nan")
        content = json.dumps(data).encode()
    path = tmp_path / "odd-plan.json"
    path.write_bytes(content)
    before = state(flux)
    with pytest.raises(PlanError, match=message) as info:
        Plan.load(path).apply(flux, device="cpu")
    assert str(path) in str(info.value)
    assert_same(before, state(flux))


def test_a_full_plan_round_trips(tmp_path, full_plan):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(full_plan))
    assert Plan.load(path).to_dict() == full_plan


# ---------------------------------------------------------------- config hashes and dtypes

def test_a_plan_still_fits_after_save_pretrained_and_from_pretrained(tmp_path):
    """transformers' save_pretrained adds `architectures` and the dtype to the config (and to the saving model's own
    config): the config hash ignores what does not change the module. The tiny pipeline's random weights are
    written and read back from tmp_path (nothing downloaded)."""
    pipe = build_tiny("flux")
    plan = plan_for(pipe, "8GB", gpu="rtx-4090", device="cpu", n_trials=4, **TINY_WORKLOAD)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = type(pipe).from_pretrained(tmp_path / "saved")
    plan.apply(reloaded)
    plan.apply(pipe)  # the saving pipeline's own config was changed by save_pretrained; it still fits too
    assert torch.equal(run_tiny(reloaded), run_tiny(pipe))


def test_a_plan_priced_in_another_dtype_is_refused_untouched(flux):
    plan = make_plan(flux, BLOCK1)
    plan.components["transformer"]["dtype"] = "bfloat16"  # the tiny pipeline is float32
    before = state(flux)
    with pytest.raises(PlanError, match="transformer: the plan was priced for bfloat16 weights, the pipeline's "
                                        "are float32; re-plan"):
        plan.apply(flux)
    assert_same(before, state(flux))


def test_plans_record_the_dtype_they_were_priced_in(full_plan):
    assert {meta["dtype"] for meta in full_plan["components"].values()} == {"float32"}


# ---------------------------------------------------------------- devices, refused before anything is touched

GROUP = ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_a_cuda_plan_on_a_torch_without_cuda_is_refused_untouched(flux):
    plan = make_plan(flux, GROUP, device="cuda")
    before = state(flux)
    with mock.patch("diffusers.hooks.apply_group_offloading") as group, \
            pytest.raises(DeviceError, match="device 'cuda': this torch .* has no CUDA device; run on a machine "
                                             "with a GPU, or plan and apply with device='cpu'"):
        plan.apply(flux)
    group.assert_not_called()
    assert_same(before, state(flux))


@pytest.mark.usefixtures("pretend_cuda")
def test_a_device_that_does_not_exist_is_refused_untouched(flux):
    before = state(flux)
    with mock.patch("diffusers.hooks.apply_group_offloading") as group, \
            pytest.raises(DeviceError, match=r"device 'cuda:3' does not exist: this machine has 1 CUDA device"):
        make_plan(flux, GROUP).apply(flux, device="cuda:3")
    with pytest.raises(DeviceError, match="device 'tpu' is not supported"):
        make_plan(flux, GROUP).apply(flux, device="tpu")
    group.assert_not_called()
    assert_same(before, state(flux))


def _with_meta_vae():
    pipe = build_tiny("flux")
    pipe.register_modules(vae=meta_twin(pipe.vae))
    return pipe


def test_a_pipeline_on_meta_is_refused_at_apply(monkeypatch):
    pipe = _with_meta_vae()
    before = state(pipe)
    with pytest.raises(DeviceError, match="vae: weights on the meta device"):
        make_plan(pipe).apply(pipe)
    assert_same(before, state(pipe))


def test_a_pipeline_on_meta_is_refused_by_optimize_before_the_search(monkeypatch):
    import planner.optimizer

    monkeypatch.setattr(planner.optimizer, "profile", lambda *a, **k: pytest.fail("profiled before refusing"))
    pipe = _with_meta_vae()
    before = state(pipe)
    with pytest.raises(DeviceError, match="vae: weights on the meta device .* optimize\\(..., apply=False\\)"):
        optimize(pipe, "8GB", gpu="rtx-4090", device="cpu")
    assert_same(before, state(pipe))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_optimize_for_cuda_without_cuda_is_refused_before_the_search(monkeypatch, flux):
    import planner.optimizer

    monkeypatch.setattr(planner.optimizer, "profile", lambda *a, **k: pytest.fail("profiled before refusing"))
    before = state(flux)
    with pytest.raises(DeviceError, match="has no CUDA device"):
        optimize(flux, "8GB", gpu="rtx-4090", device="cuda")
    assert_same(before, state(flux))


def test_components_on_other_devices_are_all_moved_to_the_plan_device():
    """Documented: apply places every component itself (resident ones with .to(device), offloaded ones from the
    CPU), so a pipeline whose components sit on different devices ends on the plan's."""
    pipe = build_tiny("flux")
    with mock.patch.object(torch.nn.Module, "to", autospec=True, side_effect=torch.nn.Module.to) as to:
        make_plan(pipe, transformer=LEAF).apply(pipe)
    moved = {(type(c.args[0]).__name__, c.args[1]) for c in to.call_args_list}
    assert ("FluxTransformer2DModel", "cpu") in moved and ("AutoencoderKL", "cpu") in moved


# ---------------------------------------------------------------- interruption: Ctrl-C at each step of apply

_STEPS = [  # (patch target, what it does) — every call of apply that changes the pipeline
    ("planner.apply._remove_offload_hooks", "remove the previous plan's hooks"),
    ("torch.nn.Module.to", "move a component"),
    ("diffusers.hooks.apply_group_offloading", "group-offload a component"),
    ("diffusers.ModelMixin.enable_layerwise_casting", "cast a component to fp8"),
    ("diffusers.AutoencoderKL.enable_tiling", "VAE tiling on"),
    ("diffusers.AutoencoderKL.disable_tiling", "VAE tiling off"),
    ("diffusers.AutoencoderKL.enable_slicing", "VAE slicing on"),
    ("diffusers.AutoencoderKL.disable_slicing", "VAE slicing off"),
]


class _Interrupter:
    """Patches every step; the `at`-th call of any of them runs the step, then raises KeyboardInterrupt (the
    worst moment: the step took effect and the next did not start). at=None counts the steps: `calls` holds
    (target, depth), depth > 0 for a step called inside another (diffusers' casting moving each layer)."""

    def __init__(self, at: int | None):
        self.at, self.calls, self.depth = at, [], 0

    def __enter__(self):
        import importlib

        self.patches = []
        for target, _ in _STEPS:
            owner_name, attr = target.rsplit(".", 1)
            try:
                owner = importlib.import_module(owner_name)
            except ModuleNotFoundError:
                module_name, cls_name = owner_name.rsplit(".", 1)
                owner = getattr(importlib.import_module(module_name), cls_name)
            self.patches.append(mock.patch.object(owner, attr, self._wrap(getattr(owner, attr), target)))
        for p in self.patches:
            p.start()
        return self

    def _wrap(self, real, target):
        def step(*args, **kwargs):
            self.depth += 1
            try:
                result = real(*args, **kwargs)
            finally:
                self.depth -= 1
            self.calls.append((target, self.depth))
            if len(self.calls) - 1 == self.at:
                raise KeyboardInterrupt
            return result
        return step

    def __exit__(self, *exc):
        for p in reversed(self.patches):
            p.stop()

    def interruption_points(self) -> list[int]:
        """Every top-level step, and the first step inside each (interrupting a step half-way): ~25, not the
        ~150 layer moves of the tiny pipeline, to keep the test in seconds."""
        return [i for i, (_, depth) in enumerate(self.calls)
                if depth == 0 or i == 0 or self.calls[i - 1][1] == 0]


def _interrupt_plan(pipe):
    """fp8 and group offload (block and leaf), resident components, VAE tiling and slicing: every kind of step."""
    return make_plan(pipe, vae_tiling=True, vae_slicing=True, vae=E4M3_BLOCK,
                     transformer=dataclasses.replace(LEAF, storage_dtype=E4M3), text_encoder_2=BLOCK1)


def _prepared(previous: bool):
    pipe = build_tiny("flux")
    if previous:
        make_plan(pipe, LEAF, vae_slicing=True).apply(pipe)
    return pipe


@pytest.mark.parametrize("previous", [False, True])
def test_ctrl_c_at_each_step_of_apply_leaves_the_pipeline_unchanged(previous):
    """Without a previous plan, and with one (which the rollback puts back)."""
    counted = _prepared(previous)
    with _Interrupter(at=None) as counter:
        _interrupt_plan(counted).apply(counted)
    points = counter.interruption_points()
    top_level = {t for t, depth in counter.calls if depth == 0}
    assert top_level >= {t for t, _ in _STEPS} - {"diffusers.AutoencoderKL.disable_tiling",
                                                 "diffusers.AutoencoderKL.disable_slicing"}
    assert len(points) > len([d for _, d in counter.calls if d == 0])  # half-way points too
    pipe = _prepared(previous)
    plan = _interrupt_plan(pipe)
    for at in points:
        before = state(pipe)
        with _Interrupter(at=at) as interrupter, pytest.raises(KeyboardInterrupt):
            plan.apply(pipe)
        assert interrupter.calls[:at + 1] == counter.calls[:at + 1], f"step {at} was not reached the same way"
        assert_same(before, state(pipe))
    assert torch.equal(run_tiny(pipe), reference("flux"))  # group offloading on CPU is exact


def test_any_base_exception_during_apply_rolls_back(flux):
    class Stop(BaseException):
        pass

    before = state(flux)
    with mock.patch("diffusers.hooks.apply_group_offloading", side_effect=Stop), pytest.raises(Stop):
        make_plan(flux, GROUP).apply(flux)
    assert_same(before, state(flux))


def test_ctrl_c_during_optimize_leaves_the_pipeline_unchanged(monkeypatch, bare_gpu):
    import planner.optimizer

    pipe = build_tiny("flux")
    before = state(pipe)
    monkeypatch.setattr(planner.optimizer, "search", mock.Mock(side_effect=KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        optimize(pipe, "8GB", gpu=bare_gpu, device="cpu", **TINY_WORKLOAD)
    assert_same(before, state(pipe))


# ---------------------------------------------------------------- optimize's arguments

BAD_ARGS = {  # id -> (kwargs, message)
    "allow_lossy string": (dict(allow_lossy="no"), "allow_lossy='no' is not valid: give True or False"),
    "apply int": (dict(apply=1), "apply=1 is not valid: give True or False"),
    "seed float": (dict(seed=1.5), "seed=1.5 is not valid: give an int"),
    "seed negative": (dict(seed=-1), "seed=-1 is not valid: give an int between 0 and 4294967295"),
    "seed bool": (dict(seed=True), "seed=True is not valid"),
    "n_trials float": (dict(n_trials=10.0), "n_trials=10.0 is not valid: give an int"),
    "n_trials zero": (dict(n_trials=0), "n_trials=0 is not valid: give an int >= 1"),
    "storage int": (dict(storage=5), "storage=5 is not valid: give an Optuna RDB URL"),
    "gpu int": (dict(gpu=4090), "GPU 4090 \\(int\\) is not understood"),
    "budget bool": (dict(vram_budget=True), "size True is not understood"),
    "budget fraction": (dict(vram_budget=1.5), "size 1.5 is not a whole number of bytes"),
    "budget nan": (dict(vram_budget=float("nan")), "size nan is not a whole number"),
    "device typo": (dict(device="cdua"), "device 'cdua' is not supported"),
    "height bool": (dict(height=True), "height=True is not valid"),
    "steps zero": (dict(num_inference_steps=0), "num_inference_steps=0 is not valid"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_optimize_arguments_are_refused_before_any_work(monkeypatch, flux, case):
    import planner.optimizer

    kwargs, message = BAD_ARGS[case]
    kwargs = {"vram_budget": "8GB", "gpu": "rtx-4090", "device": "cpu", **kwargs}
    monkeypatch.setattr(planner.optimizer, "search", lambda *a, **k: pytest.fail("searched before refusing"))
    before = state(flux)
    with pytest.raises(MemplanError, match=message):
        optimize(flux, **kwargs)
    assert_same(before, state(flux))


def test_unknown_workload_arguments_are_named():
    with pytest.raises(ArgumentError, match=r"StableDiffusionPipeline.__call__ takes no 'heigth'"):
        plan_for("sd15", "8GB", gpu="rtx-4090", heigth=512)


@pytest.mark.parametrize("budget", [8e9, np.int64(8 * 10**9), np.uint32(4 * 10**9)])
def test_float_and_numpy_budgets_are_bytes(budget):
    plan = plan_for(build_tiny("flux"), budget, gpu="rtx-4090", device="cpu", n_trials=4, seed=np.int64(3),
                    **TINY_WORKLOAD)
    assert plan.budgets["vram_bytes"] == int(budget)


def test_a_budget_above_the_card_warns_and_is_bounded_by_it(caplog):
    pipe = build_tiny("flux")
    before = state(pipe)
    with caplog.at_level(logging.WARNING, logger="planner.optimizer"):
        plan = plan_for(pipe, "8TB", gpu="rtx-4090", device="cpu", n_trials=4, **TINY_WORKLOAD)
    assert plan.budgets["vram_bytes"] == 24 * 2**30
    assert "VRAM budget 7450.58 GiB is more than rtx-4090 has (24.00 GiB): planning for 24.00 GiB" in caplog.text
    assert_same(before, state(pipe))


# ---------------------------------------------------------------- the runtime OOM guard (simulated on CPU)

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 7.63 GiB"


def _inject_oom(module: torch.nn.Module, times: int | None):
    """A forward pre-hook raising torch's OOM on the first `times` calls of `module` (None: every call)."""
    calls = []

    def hook(mod, args):
        calls.append(1)
        if times is None or len(calls) <= times:
            raise torch.OutOfMemoryError(OOM_MESSAGE)

    return module.register_forward_pre_hook(hook), calls


def _guarded(bare_gpu):
    pipe = build_tiny("flux")
    plan = optimize(pipe, "8GB", gpu=bare_gpu, device="cpu", allow_lossy=False, n_trials=8, oom_guard=True,
                    **TINY_WORKLOAD)
    return pipe, plan


def test_an_oom_is_survived_by_re_planning_for_the_shortfall_and_retrying_once(bare_gpu, caplog):
    pipe, first = _guarded(bare_gpu)
    handle, calls = _inject_oom(pipe.transformer, times=1)
    with caplog.at_level(logging.WARNING, logger="planner.guard"):
        images = run_tiny(pipe)
    handle.remove()
    second = pipe._memplan_plan
    assert torch.equal(images, reference("flux"))  # the retried call ran to the end, under a lossless plan
    assert second.choice != first.choice
    assert second.budgets["vram_bytes"] == first.budgets["vram_bytes"] - 20 * 2**20  # less the failed request
    assert second.predicted.card_peak_bytes <= second.budgets["vram_bytes"]
    assert second.search["study_name"] == first.search["study_name"]  # from the same study
    assert "out of memory under plan" in caplog.text and "shortfall 20971520 B (the failed request" in caplog.text
    assert type(pipe).__name__ == "FluxPipeline"


def test_a_second_oom_raises_naming_the_plan_attempted_and_puts_the_first_back(bare_gpu):
    from planner.guard import PlanOutOfMemoryError

    pipe, first = _guarded(bare_gpu)
    run_tiny(pipe)  # a pipeline call sets attributes of its own (_guidance_scale, ...): those are not ours
    handle, calls = _inject_oom(pipe.transformer, times=None)
    before = state(pipe)
    with pytest.raises(PlanOutOfMemoryError, match=r"out of memory again after re-planning: the plan attempted "
                                                   r"was \[.*\] \(VRAM budget \d+ B") as info:
        run_tiny(pipe)
    assert isinstance(info.value, torch.OutOfMemoryError) and isinstance(info.value, MemplanError)
    assert len(calls) == 2  # the call and one retry
    assert pipe._memplan_plan.choice == first.choice
    # Diffusers makes and memplan drops empty HookRegistries (no hook, no forward override: no behaviour) as
    # pipeline calls and plan changes come and go; everything else must be as it was.
    assert_same(_without_empty_registries(before), _without_empty_registries(state(pipe)))
    handle.remove()
    assert torch.equal(run_tiny(pipe), reference("flux"))


def _without_empty_registries(st: dict) -> dict:
    empty = {k for k, v in st["hooks"].items() if v == ((), None, False)}
    st["hooks"] = {k: v for k, v in st["hooks"].items() if k not in empty}
    st["attrs"] = {c: {n: [a for a in names if not ((c, n) in empty and a == "_diffusers_hook")]
                       for n, names in subs.items()} for c, subs in st["attrs"].items()}
    return st


def test_the_guard_context_manager_guards_only_inside(bare_gpu):
    from planner.guard import guard

    pipe = build_tiny("flux")
    plan_for_pipe = plan_for(pipe, "8GB", gpu=bare_gpu, device="cpu", allow_lossy=False, n_trials=8,
                             **TINY_WORKLOAD)
    plan_for_pipe.apply(pipe)
    handle, _ = _inject_oom(pipe.transformer, times=1)
    with guard(pipe):
        assert torch.equal(run_tiny(pipe), reference("flux"))
    assert type(pipe) is type(build_tiny("flux"))  # the guard is gone
    handle.remove()
    handle, _ = _inject_oom(pipe.transformer, times=1)
    with pytest.raises(torch.OutOfMemoryError):
        run_tiny(pipe)
    handle.remove()


def test_oom_guard_needs_apply_and_a_bool():
    with pytest.raises(ArgumentError, match="oom_guard=True guards the calls .* needs apply=True"):
        optimize(build_tiny("flux"), "8GB", gpu="rtx-4090", device="cpu", apply=False, oom_guard=True)
    with pytest.raises(ArgumentError, match="oom_guard='yes' is not valid"):
        optimize(build_tiny("flux"), "8GB", gpu="rtx-4090", device="cpu", oom_guard="yes")
