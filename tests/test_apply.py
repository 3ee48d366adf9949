"""apply_plan on tiny real pipelines (Flux, SDXL), on CPU.

What runs on CPU is applied and run, and its output compared with the unmodified pipeline's: group offloading
(block_level n=1 and n=2, leaf_level) is exact; VAE slicing is exact per image; VAE tiling and fp8 storage are
close within the tolerances stated below. What needs CUDA (streams, model/sequential offload) is checked at the
diffusers boundary with mocks on device "cuda", and refused on device "cpu" before anything is touched.
Failed, repeated and replaced applies leave tensors and hook registries exactly as they should be.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from unittest import mock

import pytest
import torch

from conftest import build_tiny, run_tiny
from planner.apply import apply_plan, remove_hooks
from planner.grouping import layout
from planner.plan import Plan
from planner.sources import config_hash
from planner.strategy import (BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD, Choice,
                              ComponentPlan, PlanError)
from planner.tiny import tiny_call_kwargs

# fp8 storage of the denoiser and VAE: measured max |diff| 0.06 (float8_e4m3fn) and 0.125 (float8_e5m2) on images
# in [0, 1]; the bound leaves headroom for other torch builds.
FP8_ATOL = 0.2
# VAE slicing of a batch of 2 versus one batched decode: the same images up to float32 rounding of the batched
# convolutions (measured max |diff| 8e-7).
SLICING_ATOL = 1e-5
# VAE tiling: each 8x8-latent tile is decoded with its own GroupNorm statistics and zero padding, and the random
# tiny VAE amplifies that. Measured: mean |diff| 0.05 / 0.034 and max 0.30 / 0.28 (Flux / SDXL), against mean 0.17,
# max 0.85 between two seeds of the untiled pipeline: close, but really different.
TILING_MEAN_ATOL, TILING_MAX_ATOL = 0.08, 0.45

DENOISER = {"flux": "transformer", "sdxl": "unet"}
GROUP_PLANS = {
    "block_level_n1": ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1),
    "block_level_n2": ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 2),
    "leaf_level": ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL),
}
BLOCK1 = GROUP_PLANS["block_level_n1"]
LEAF = GROUP_PLANS["leaf_level"]
E4M3 = "float8_e4m3fn"
CUDA_PLANS = {  # each needs an accelerator: a stream, or accelerate's pipeline-wide offload
    "use_stream": ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1, use_stream=True),
    "record_stream": ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL, use_stream=True, record_stream=True),
    "low_cpu_mem_usage": ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1, use_stream=True, low_cpu_mem_usage=True),
    "model_offload": ComponentPlan(MODEL_OFFLOAD),
    "sequential_offload": ComponentPlan(SEQUENTIAL_OFFLOAD),
}
_MISSING = "<missing>"


# ---------------------------------------------------------------- helpers

def modules(pipe) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def make_plan(pipe, default: ComponentPlan = ComponentPlan(), *, device: str = "cpu", vae_tiling: bool = False,
              vae_slicing: bool = False, **per_component: ComponentPlan) -> Plan:
    """A plan for `pipe`: `default` for every component but those named, with class and config hash."""
    comps = modules(pipe)
    meta = {n: {"class": type(m).__name__, "config_hash": config_hash(m)} for n, m in comps.items()}
    choice = Choice({n: per_component.get(n, default) for n in comps}, vae_tiling, vae_slicing)
    return Plan(type(pipe).__name__, meta, choice, None, device=device)


@functools.cache
def _reference(kind: str, images: int) -> torch.Tensor:
    return run(build_tiny(kind), images)


def reference(kind: str, images: int = 1) -> torch.Tensor:
    """The unmodified pipeline's output (computed once per kind and batch)."""
    return _reference(kind, images)


def run(pipe, images: int = 1) -> torch.Tensor:
    if images == 1:
        return run_tiny(pipe)
    with torch.no_grad():
        return pipe(**tiny_call_kwargs(pipe), num_images_per_prompt=images).images


def tensor_state(pipe) -> dict:
    """(data_ptr, dtype, device) of every parameter and buffer, by component and name."""
    return {(c, n): (t.data_ptr(), t.dtype, t.device) for c, m in modules(pipe).items()
            for n, t in [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]}


def hook_state(pipe) -> dict:
    """Per submodule: its diffusers HookRegistry's hook names, its accelerate hook's class, a `forward` override."""
    state = {}
    for c, m in modules(pipe).items():
        for n, sub in m.named_modules():
            registry = getattr(sub, "_diffusers_hook", None)
            entry = (tuple(registry._hook_order) if registry is not None else None,
                     type(sub._hf_hook).__name__ if hasattr(sub, "_hf_hook") else None,
                     "forward" in sub.__dict__)
            if entry != (None, None, False):
                state[(c, n)] = entry
    return state


def pipe_state(pipe) -> dict:
    vae = pipe.vae
    return {"tensors": tensor_state(pipe), "hooks": hook_state(pipe),
            "vae": (vae.use_tiling, vae.use_slicing),
            "plan": pipe.__dict__.get("_memplan_plan", _MISSING),
            "all_hooks": pipe.__dict__.get("_all_hooks", _MISSING)}


def hook_names(pipe) -> dict:
    """Only the diffusers hooks, by submodule (registries without hooks do not count)."""
    return {k: names for k, (names, _, _) in hook_state(pipe).items() if names}


def groups(module: torch.nn.Module) -> set[int]:
    """The distinct group-offloading groups in `module` (one ModuleGroup per group)."""
    hooks = [getattr(sub, "_diffusers_hook", None) for sub in module.modules()]
    return {id(r.get_hook("group_offloading").group) for r in hooks
            if r is not None and r.get_hook("group_offloading") is not None}


def decoder_input_shapes(vae) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    shapes: list = []
    handle = vae.decoder.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def group_offloading_spy(fail_at: int | None = None):
    """A stand-in for diffusers' apply_group_offloading that calls the real one and, on call `fail_at`, then raises
    (the component is left half-hooked, as a failure inside diffusers would)."""
    from diffusers.hooks import apply_group_offloading as real

    def side_effect(module, **kwargs):
        real(module, **kwargs)
        if spy.call_count == fail_at:
            raise RuntimeError(f"injected failure on call {fail_at}")

    spy = mock.Mock(side_effect=side_effect)
    return mock.patch("diffusers.hooks.apply_group_offloading", spy)


def expected_group_call(module, plan: ComponentPlan, device: str = "cuda", disk: str | None = None):
    block_modules = layout(module).block_modules if plan.offload_type == BLOCK_LEVEL else None
    return mock.call(module, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                     offload_type=plan.offload_type, num_blocks_per_group=plan.num_blocks_per_group,
                     use_stream=plan.use_stream, record_stream=plan.record_stream,
                     low_cpu_mem_usage=plan.low_cpu_mem_usage, offload_to_disk_path=disk,
                     block_modules=list(block_modules) if block_modules is not None else None)


# ---------------------------------------------------------------- what runs on CPU: exact

@pytest.mark.parametrize("group", sorted(GROUP_PLANS))
def test_group_offload_on_every_component_keeps_output_exactly(tiny_kind, group):
    pipe = build_tiny(tiny_kind)
    make_plan(pipe, GROUP_PLANS[group]).apply(pipe)
    for name, module in modules(pipe).items():
        assert groups(module), f"{name}: no group offloading hook"
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))  # after a full onload/offload cycle too


def test_block_level_groups_follow_num_blocks_per_group(tiny_kind):
    """Flux has 2 + 2 transformer blocks, the tiny SDXL UNet 2 down + 2 up blocks (+ the mid block): n=2 halves
    the block groups. Text encoders have no top-level ModuleList: memplan's block_modules point at their 2 layers,
    each a block, beside the group of the modules around them (CLIP: embeddings, final_layer_norm)."""
    counts = {}
    for group in ("block_level_n1", "block_level_n2"):
        pipe = build_tiny(tiny_kind)
        make_plan(pipe, GROUP_PLANS[group]).apply(pipe)
        counts[group] = {n: len(groups(m)) for n, m in modules(pipe).items()}
    denoiser = DENOISER[tiny_kind]
    assert counts["block_level_n2"][denoiser] < counts["block_level_n1"][denoiser]
    # CLIP text_encoder: 2 layers + the unmatched group (embeddings, final_layer_norm); n=2: the 2 layers are one
    assert (counts["block_level_n1"]["text_encoder"], counts["block_level_n2"]["text_encoder"]) == (3, 2)


def test_vae_slicing_decodes_one_image_at_a_time(tiny_kind):
    pipe = build_tiny(tiny_kind)
    make_plan(pipe, vae_slicing=True).apply(pipe)
    assert pipe.vae.use_slicing and not pipe.vae.use_tiling
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))  # one image: nothing to slice
    shapes, handle = decoder_input_shapes(pipe.vae)
    out = run(pipe, images=2)
    handle.remove()
    assert [s[0] for s in shapes] == [1, 1]
    assert torch.allclose(out, reference(tiny_kind, images=2), rtol=0, atol=SLICING_ATOL)


def test_vae_slicing_is_exactly_per_image_decoding():
    vae = build_tiny("sdxl").vae
    torch.manual_seed(0)
    z = torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        per_image = torch.cat([vae.decode(z[i:i + 1]).sample for i in range(3)])
        vae.enable_slicing()
        assert torch.equal(vae.decode(z).sample, per_image)


def test_vae_tiling_really_tiles_and_stays_close(tiny_kind):
    pipe = build_tiny(tiny_kind)
    make_plan(pipe, vae_tiling=True).apply(pipe)
    assert pipe.vae.use_tiling and not pipe.vae.use_slicing
    shapes, handle = decoder_input_shapes(pipe.vae)
    out = run_tiny(pipe)
    handle.remove()
    tile = pipe.vae.tile_latent_min_size
    assert len(shapes) > 1 and all(s[-1] <= tile and s[-2] <= tile for s in shapes), shapes  # 16x16 latents, 8x8 tiles
    diff = (out - reference(tiny_kind)).abs()
    assert diff.max() > 0
    assert diff.mean() <= TILING_MEAN_ATOL and diff.max() <= TILING_MAX_ATOL, (diff.mean(), diff.max())


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_storage_on_diffusers_models_is_close(tiny_kind, dtype):
    pipe = build_tiny(tiny_kind)
    fp8 = ComponentPlan(storage_dtype=dtype)
    denoiser = DENOISER[tiny_kind]
    make_plan(pipe, **{denoiser: fp8, "vae": fp8}).apply(pipe)
    stored = {p.dtype for m in (getattr(pipe, denoiser), pipe.vae) for p in m.parameters()}
    assert getattr(torch, dtype) in stored  # Linear/Conv weights; norms and skipped layers stay float32
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float32}
    out = run_tiny(pipe)
    diff = (out - reference(tiny_kind)).abs()
    assert diff.max() > 0
    assert diff.max() <= FP8_ATOL, diff.max()


def test_fp8_with_group_offload_equals_fp8_alone(tiny_kind):
    """Group offloading on top of fp8 storage is lossless: the same output as fp8 storage alone."""
    denoiser = DENOISER[tiny_kind]
    fp8_only = build_tiny(tiny_kind)
    make_plan(fp8_only, **{denoiser: ComponentPlan(storage_dtype=E4M3)}).apply(fp8_only)
    both = build_tiny(tiny_kind)
    make_plan(both, BLOCK1, **{denoiser: dataclasses.replace(BLOCK1, storage_dtype=E4M3)}).apply(both)
    assert groups(getattr(both, denoiser))
    assert torch.equal(run_tiny(both), run_tiny(fp8_only))


def test_fp8_on_a_transformers_text_encoder_is_refused_untouched():
    pipe = build_tiny("flux")
    before = pipe_state(pipe)
    with pytest.raises(PlanError, match="text_encoder_2: fp8 storage needs a diffusers model"):
        make_plan(pipe, text_encoder_2=ComponentPlan(storage_dtype=E4M3)).apply(pipe)
    assert pipe_state(pipe) == before


def test_offload_to_disk_on_cpu_is_close_and_writes_per_component(tmp_path):
    """Disk offloading reloads tensors from safetensors files: SDXL's block groups come back bit for bit."""
    pipe = build_tiny("sdxl")
    disk = dataclasses.replace(BLOCK1, offload_to_disk=True)
    apply_plan(make_plan(pipe, unet=disk, vae=disk), pipe, "cpu", offload_dir=str(tmp_path))
    assert sorted(d.split("-")[0] for d in os.listdir(tmp_path)) == ["unet", "vae"]
    assert torch.equal(run_tiny(pipe), reference("sdxl"))


def test_offload_dir_shared_by_two_pipelines_keeps_each_ones_weights(tmp_path):
    """diffusers loads a group's safetensors file when it already exists: memplan writes to a fresh directory."""
    disk = dataclasses.replace(BLOCK1, offload_to_disk=True)
    first = build_tiny("sdxl", seed=0)
    apply_plan(make_plan(first, unet=disk), first, "cpu", offload_dir=str(tmp_path))
    run_tiny(first)  # writes the unet's group files
    other = build_tiny("sdxl", seed=1)
    expected = run_tiny(build_tiny("sdxl", seed=1))
    apply_plan(make_plan(other, unet=disk), other, "cpu", offload_dir=str(tmp_path))
    assert torch.equal(run_tiny(other), expected)


def test_after_disk_offload_another_plan_gets_the_weights_back(tmp_path):
    """On disk, a group's modules hold `torch.empty_like` placeholders; removing the hooks must read them back."""
    disk = dataclasses.replace(BLOCK1, offload_to_disk=True)
    pipe = build_tiny("sdxl")
    apply_plan(make_plan(pipe, unet=disk, vae=disk), pipe, "cpu", offload_dir=str(tmp_path))
    make_plan(pipe, text_encoder=LEAF).apply(pipe)
    assert torch.equal(run_tiny(pipe), reference("sdxl"))
    apply_plan(make_plan(pipe, unet=disk), pipe, "cpu", offload_dir=str(tmp_path))
    remove_hooks(pipe)
    assert hook_names(pipe) == {}
    assert torch.equal(run_tiny(pipe), reference("sdxl"))


def test_a_failure_after_a_disk_plan_puts_it_back_with_its_weights(tmp_path):
    disk = dataclasses.replace(BLOCK1, offload_to_disk=True)
    pipe = build_tiny("sdxl")
    previous = make_plan(pipe, unet=disk)
    apply_plan(previous, pipe, "cpu", offload_dir=str(tmp_path))
    with group_offloading_spy(fail_at=2), pytest.raises(RuntimeError, match="injected failure"):
        make_plan(pipe, BLOCK1).apply(pipe)
    assert pipe._memplan_plan.choice == previous.choice and groups(pipe.unet)
    assert torch.equal(run_tiny(pipe), reference("sdxl"))


def test_disk_offload_that_would_split_tied_weights_is_refused(tmp_path):
    """T5's `shared.weight` is `encoder.embed_tokens.weight`. diffusers 0.42's disk offload writes a file per group
    and, on offload, replaces each of the group's tensors with `torch.empty_like`: with the two modules in different
    groups, one group's offload leaves garbage in the other's weight (seen here: |w| ~ 1e37 with leaf_level; an
    output off by 3.8 with block_level forced past this check). block_level splits them too: memplan's layout makes
    `shared` and the encoder's own modules separate groups, so that T5's blocks can be offloaded one by one."""
    pipe = build_tiny("flux")
    assert pipe.text_encoder_2.shared.weight is pipe.text_encoder_2.encoder.embed_tokens.weight
    before = pipe_state(pipe)
    for offload_type, plan in (("leaf_level", LEAF), ("block_level", BLOCK1)):
        with pytest.raises(PlanError, match=f"text_encoder_2: offload_to_disk with {offload_type} would put the tied "
                                            "weights shared.weight = encoder.embed_tokens.weight in different groups"):
            disk = dataclasses.replace(plan, offload_to_disk=True)
            apply_plan(make_plan(pipe, text_encoder_2=disk), pipe, "cpu", offload_dir=str(tmp_path))
        assert pipe_state(pipe) == before
    # the CLIP encoder ties nothing: block_level on disk is accepted, and exact
    apply_plan(make_plan(pipe, text_encoder=dataclasses.replace(BLOCK1, offload_to_disk=True)), pipe, "cpu",
               offload_dir=str(tmp_path))
    assert torch.equal(run_tiny(pipe), reference("flux"))


# ---------------------------------------------------------------- what needs CUDA: the diffusers calls, mocked

@pytest.mark.usefixtures("pretend_cuda")
def test_stream_plans_call_apply_group_offloading_exactly(tmp_path):
    pipe = build_tiny("flux")
    cplans = {"vae": CUDA_PLANS["use_stream"], "text_encoder": dataclasses.replace(CUDA_PLANS["record_stream"],
                                                                                   offload_to_disk=True),
              "text_encoder_2": CUDA_PLANS["record_stream"], "transformer": CUDA_PLANS["low_cpu_mem_usage"]}
    plan = make_plan(pipe, device="cuda", **cplans)
    with mock.patch("diffusers.hooks.apply_group_offloading") as group, \
            mock.patch.object(pipe, "enable_model_cpu_offload") as model, \
            mock.patch.object(pipe, "enable_sequential_cpu_offload") as sequential:
        apply_plan(plan, pipe, "cuda", offload_dir=str(tmp_path))
    disk = group.call_args_list[1].kwargs["offload_to_disk_path"]
    assert os.path.dirname(disk) == str(tmp_path) and os.path.basename(disk).startswith("text_encoder-")
    assert os.listdir(disk) == []  # a fresh directory: diffusers would load any group file already there
    assert group.call_args_list == [expected_group_call(m, cplans[n], disk=disk if n == "text_encoder" else None)
                                    for n, m in modules(pipe).items()]
    model.assert_not_called()
    sequential.assert_not_called()
    assert pipe._memplan_plan.device == "cuda"


@pytest.mark.usefixtures("pretend_cuda")
def test_fp8_is_cast_before_group_offloading():
    """Layerwise casting first: with streams, diffusers pins its CPU copies when group offloading is applied."""
    pipe = build_tiny("flux")
    events = []
    transformer = pipe.transformer
    real_cast = transformer.enable_layerwise_casting
    plan = make_plan(pipe, CUDA_PLANS["use_stream"], device="cuda",
                     transformer=dataclasses.replace(CUDA_PLANS["use_stream"], storage_dtype=E4M3))
    with mock.patch("diffusers.hooks.apply_group_offloading",
                    side_effect=lambda m, **kw: events.append(("group", type(m).__name__))), \
            mock.patch.object(transformer, "enable_layerwise_casting",
                              side_effect=lambda **kw: (events.append(("cast", kw)), real_cast(**kw))):
        plan.apply(pipe)
    assert events[0] == ("cast", {"storage_dtype": torch.float8_e4m3fn, "compute_dtype": torch.float32})
    assert [e[1] for e in events[1:]] == ["AutoencoderKL", "CLIPTextModel", "T5EncoderModel", "FluxTransformer2DModel"]


@pytest.mark.usefixtures("pretend_cuda")
@pytest.mark.parametrize("wide", [MODEL_OFFLOAD, SEQUENTIAL_OFFLOAD])
def test_pipeline_wide_offload_calls_diffusers_once(wide):
    pipe = build_tiny("sdxl")
    plan = make_plan(pipe, ComponentPlan(wide), device="cuda", vae_slicing=True)
    with mock.patch("diffusers.hooks.apply_group_offloading") as group, \
            mock.patch.object(pipe, "enable_model_cpu_offload") as model, \
            mock.patch.object(pipe, "enable_sequential_cpu_offload") as sequential:
        plan.apply(pipe)
    called, other = (model, sequential) if wide == MODEL_OFFLOAD else (sequential, model)
    called.assert_called_once_with(device="cuda")
    other.assert_not_called()
    group.assert_not_called()
    assert {t.device.type for t in pipe.unet.parameters()} == {"cpu"}  # nothing moved by memplan itself
    assert pipe.vae.use_slicing


@pytest.mark.usefixtures("pretend_cuda")
def test_model_offload_with_fp8_casts_first():
    pipe = build_tiny("sdxl")
    plan = make_plan(pipe, ComponentPlan(MODEL_OFFLOAD), device="cuda",
                     unet=ComponentPlan(MODEL_OFFLOAD, storage_dtype=E4M3))
    dtypes: list = []
    with mock.patch.object(pipe, "enable_model_cpu_offload",
                           side_effect=lambda **kw: dtypes.append(pipe.unet.conv_in.weight.dtype)) as model:
        plan.apply(pipe)
    model.assert_called_once_with(device="cuda")
    assert dtypes == [torch.float8_e4m3fn]


@pytest.mark.parametrize("name", sorted(CUDA_PLANS))
def test_cuda_only_plans_on_cpu_raise_before_touching_anything(name):
    pipe = build_tiny("flux")
    plan = make_plan(pipe, CUDA_PLANS[name], device="cpu", vae_tiling=True)
    before = pipe_state(pipe)
    with mock.patch("diffusers.hooks.apply_group_offloading") as group, \
            mock.patch.object(pipe, "enable_model_cpu_offload") as model, \
            mock.patch.object(pipe, "enable_sequential_cpu_offload") as sequential, \
            pytest.raises(PlanError, match="need an accelerator, the device is 'cpu'"):
        plan.apply(pipe)
    for m in (group, model, sequential):
        m.assert_not_called()
    assert pipe_state(pipe) == before


# ---------------------------------------------------------------- failure half-way: everything put back

FAILING_PLAN = dict(vae=dataclasses.replace(BLOCK1, storage_dtype=E4M3), text_encoder=LEAF, text_encoder_2=BLOCK1)


def _failing_plan(pipe, kind: str) -> Plan:
    """fp8 + group offload on the VAE and the denoiser, group offload on the text encoders, VAE tiling."""
    denoiser = {DENOISER[kind]: dataclasses.replace(LEAF, storage_dtype=E4M3)}
    return make_plan(pipe, vae_tiling=True, **FAILING_PLAN, **denoiser)


@pytest.mark.parametrize("fail_at", [2, 4])
def test_failure_in_group_offloading_restores_everything(tiny_kind, fail_at):
    pipe = build_tiny(tiny_kind)
    before = pipe_state(pipe)
    with group_offloading_spy(fail_at=fail_at), pytest.raises(RuntimeError, match="injected failure"):
        _failing_plan(pipe, tiny_kind).apply(pipe)
    assert pipe_state(pipe) == before
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))


def test_failure_after_offloading_restores_everything(tiny_kind):
    pipe = build_tiny(tiny_kind)
    before = pipe_state(pipe)
    with mock.patch.object(pipe.vae, "enable_tiling", side_effect=NotImplementedError("no tiling here")), \
            pytest.raises(NotImplementedError):
        _failing_plan(pipe, tiny_kind).apply(pipe)
    assert pipe_state(pipe) == before
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))


def test_failure_puts_the_previous_plan_back(tiny_kind):
    pipe = build_tiny(tiny_kind)
    previous = make_plan(pipe, LEAF, vae_slicing=True)
    previous.apply(pipe)
    applied = pipe_state(pipe)
    with group_offloading_spy(fail_at=3), pytest.raises(RuntimeError, match="injected failure"):
        _failing_plan(pipe, tiny_kind).apply(pipe)
    after = pipe_state(pipe)
    assert after["tensors"] == applied["tensors"] and after["hooks"] == applied["hooks"]
    assert after["vae"] == applied["vae"] == (False, True)
    assert pipe._memplan_plan.choice == previous.choice
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))


def test_failure_puts_accelerate_offload_back():
    """accelerate's model offload, enabled by the user (it runs on CPU when given device='cpu'), survives a
    failed apply: its hooks are re-attached and the pipeline still runs."""
    pipe = build_tiny("sdxl")
    pipe.enable_model_cpu_offload(device="cpu")
    before = pipe_state(pipe)
    assert {c for (c, n), (_, hf, _) in before["hooks"].items() if hf} == set(modules(pipe))
    with group_offloading_spy(fail_at=2), pytest.raises(RuntimeError, match="injected failure"):
        make_plan(pipe, BLOCK1).apply(pipe)
    assert pipe_state(pipe) == before
    assert torch.equal(run_tiny(pipe), reference("sdxl"))


def test_failure_with_fp8_already_applied_keeps_the_casting(tiny_kind):
    pipe = build_tiny(tiny_kind)
    denoiser = DENOISER[tiny_kind]
    make_plan(pipe, **{denoiser: ComponentPlan(storage_dtype=E4M3)}).apply(pipe)
    fp8_out = run_tiny(pipe)
    before = pipe_state(pipe)
    with group_offloading_spy(fail_at=4), pytest.raises(RuntimeError, match="injected failure"):
        make_plan(pipe, BLOCK1, **{denoiser: dataclasses.replace(BLOCK1, storage_dtype=E4M3)}).apply(pipe)
    after = pipe_state(pipe)
    assert after["tensors"] == before["tensors"] and after["hooks"] == before["hooks"]
    assert torch.equal(run_tiny(pipe), fp8_out)


# ---------------------------------------------------------------- applying again, applying another plan

def test_applying_the_same_plan_twice_is_a_no_op():
    pipe = build_tiny("flux")
    plan = make_plan(pipe, BLOCK1)
    with group_offloading_spy() as spy:
        plan.apply(pipe)
        state = pipe_state(pipe)
        Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).apply(pipe)  # an equal plan, not the same object
    assert spy.call_count == len(modules(pipe))
    assert pipe_state(pipe) == state
    assert torch.equal(run_tiny(pipe), reference("flux"))


@pytest.mark.usefixtures("pretend_cuda")
def test_the_same_choice_on_another_device_is_applied_again():
    pipe = build_tiny("flux")
    plan = make_plan(pipe, BLOCK1)
    plan.apply(pipe)
    with mock.patch("diffusers.hooks.apply_group_offloading") as group:
        plan.apply(pipe, device="cuda")
    assert group.call_args_list == [expected_group_call(m, BLOCK1, "cuda") for m in modules(pipe).values()]
    assert hook_names(pipe) == {}  # the CPU plan's hooks were removed first (the mock added none)


@pytest.mark.parametrize("first", ["block_level_n2", "leaf_level"])
def test_another_plan_replaces_the_previous_hooks(tiny_kind, first):
    pipe = build_tiny(tiny_kind)
    make_plan(pipe, GROUP_PLANS[first], vae_tiling=True).apply(pipe)
    denoiser = DENOISER[tiny_kind]
    second = dict(text_encoder=LEAF, vae=GROUP_PLANS["block_level_n2"], **{denoiser: BLOCK1})
    make_plan(pipe, vae_slicing=True, **second).apply(pipe)
    fresh = build_tiny(tiny_kind)
    make_plan(fresh, vae_slicing=True, **second).apply(fresh)
    assert hook_names(pipe) == hook_names(fresh)
    assert (pipe.vae.use_tiling, pipe.vae.use_slicing) == (False, True)
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))


def test_an_all_resident_plan_removes_every_hook(tiny_kind):
    pipe = build_tiny(tiny_kind)
    before = pipe_state(pipe)
    make_plan(pipe, LEAF, vae_tiling=True, vae_slicing=True).apply(pipe)
    make_plan(pipe).apply(pipe)
    after = pipe_state(pipe)
    assert after["hooks"] == before["hooks"] == {}
    assert after["tensors"] == before["tensors"] and after["vae"] == before["vae"]
    assert torch.equal(run_tiny(pipe), reference(tiny_kind))


def test_a_plan_replaces_accelerate_offload():
    pipe = build_tiny("sdxl")
    pipe.enable_model_cpu_offload(device="cpu")
    make_plan(pipe, BLOCK1).apply(pipe)
    assert not any(hf for _, hf, _ in hook_state(pipe).values())
    assert all(groups(m) for m in modules(pipe).values())
    assert torch.equal(run_tiny(pipe), reference("sdxl"))


@pytest.mark.parametrize("second", ["float8_e5m2", None])
def test_fp8_then_another_storage_dtype_asks_to_reload(second):
    pipe = build_tiny("flux")
    make_plan(pipe, transformer=ComponentPlan(storage_dtype=E4M3)).apply(pipe)
    before = pipe_state(pipe)
    with pytest.raises(PlanError, match="transformer: its weights are already stored in float8_e4m3fn.*reload"):
        make_plan(pipe, BLOCK1, transformer=dataclasses.replace(BLOCK1, storage_dtype=second)).apply(pipe)
    assert pipe_state(pipe) == before


# ---------------------------------------------------------------- Plan.load: refused clearly, or accepted

def _saved(tmp_path, data: dict):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def flux_plan_dict() -> dict:
    return make_plan(build_tiny("flux"), BLOCK1).to_dict()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=2), "schema_version 2 is not supported.*re-plan"),
    (lambda d: d.pop("schema_version"), "schema_version None is not supported"),
    (lambda d: d.update(colour="blue"), r"unknown keys \['colour'\]"),
    (lambda d: d["choice"]["components"]["vae"].update(offload="yes"), r"choice.components.vae has unknown keys \['offload'\]"),
    (lambda d: d["choice"].update(vae_tilling=True), r"choice has unknown keys \['vae_tilling'\]"),
    (lambda d: d["choice"].pop("components"), r"choice is missing \['components'\]"),
    (lambda d: d["components"]["vae"].update({"config-hash": "x"}),
     r"components.vae has unknown keys \['config-hash'\]"),
    (lambda d: d.update(components=["vae"]), "plan.components must be a JSON object of JSON objects of strings, got list"),
    (lambda d: d.pop("choice"), r"missing \['choice'\]"),
    (lambda d: d["choice"]["components"].pop("vae"), r"missing \['vae'\]"),
    (lambda d: d["choice"]["components"]["vae"].update(strategy="teleport"), "vae: strategy 'teleport'"),
])
def test_load_refuses_bad_plans(tmp_path, flux_plan_dict, edit, message):
    edit(flux_plan_dict)
    with pytest.raises(PlanError, match=message):
        Plan.load(_saved(tmp_path, flux_plan_dict))


@pytest.mark.parametrize("text, message", [("{not json", "cannot read plan .*plan.json"),
                                           ("[1, 2]", "a plan is a JSON object, got list")])
def test_load_refuses_what_is_not_a_plan_object(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_load_refuses_a_missing_file(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path / "nope.json")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(pipeline_class="StableDiffusionXLPipeline"),
     "plan is for StableDiffusionXLPipeline, the pipeline is FluxPipeline"),
    (lambda d: d["components"]["transformer"].update(config_hash="0123456789abcdef"),
     "transformer: its config differs .*config hash.*re-plan"),
    (lambda d: d["components"]["vae"].update({"class": "AutoencoderTiny"}),
     "vae: plan is for AutoencoderTiny, the pipeline has AutoencoderKL"),
])
def test_a_plan_for_another_pipeline_is_refused_at_apply_untouched(tmp_path, flux_plan_dict, edit, message):
    edit(flux_plan_dict)
    plan = Plan.load(_saved(tmp_path, flux_plan_dict))
    pipe = build_tiny("flux")
    before = pipe_state(pipe)
    with pytest.raises(PlanError, match=message):
        plan.apply(pipe)
    assert pipe_state(pipe) == before


def test_a_plan_for_another_component_set_is_refused(tmp_path):
    data = make_plan(build_tiny("sdxl")).to_dict()
    data["pipeline_class"] = "FluxPipeline"
    plan = Plan.load(_saved(tmp_path, data))
    with pytest.raises(PlanError, match=r"missing \['transformer'\], unknown \['unet'\]"):
        plan.apply(build_tiny("flux"))


MINIMAL = {  # the README's hand-written plan, without streams so that it runs on CPU
    "schema_version": 1, "pipeline_class": "FluxPipeline",
    "components": {"text_encoder": {"class": "CLIPTextModel"}, "text_encoder_2": {"class": "T5EncoderModel"},
                   "transformer": {"class": "FluxTransformer2DModel"}, "vae": {"class": "AutoencoderKL"}},
    "choice": {"components": {
        "text_encoder": {}, "vae": {},
        "text_encoder_2": {"strategy": "group_offload", "offload_type": "leaf_level"},
        "transformer": {"strategy": "group_offload", "offload_type": "block_level", "num_blocks_per_group": 1}}},
}


def test_a_hand_written_minimal_plan_is_accepted_and_applied(tmp_path):
    plan = Plan.load(_saved(tmp_path, MINIMAL))
    assert plan.predicted is None and plan.device == "cuda" and plan.choice.vae_tiling is False
    assert plan.choice.components["vae"] == ComponentPlan()
    pipe = build_tiny("flux")
    plan.apply(pipe, device="cpu")
    assert groups(pipe.transformer) and groups(pipe.text_encoder_2) and not groups(pipe.vae)
    assert torch.equal(run_tiny(pipe), reference("flux"))


@pytest.mark.usefixtures("pretend_cuda")
def test_the_readme_plan_with_streams_loads_and_is_refused_on_cpu(tmp_path):
    data = json.loads(json.dumps(MINIMAL))
    comps = data["choice"]["components"]
    comps["text_encoder_2"]["use_stream"] = True
    comps["transformer"].update(use_stream=True, storage_dtype=E4M3)
    plan = Plan.load(_saved(tmp_path, data))
    pipe = build_tiny("flux")
    with pytest.raises(PlanError, match="text_encoder_2, transformer: streams"):
        plan.apply(pipe, device="cpu")
    with mock.patch("diffusers.hooks.apply_group_offloading") as group, \
            mock.patch.object(pipe.text_encoder, "to") as te_to, mock.patch.object(pipe.vae, "to") as vae_to:
        plan.apply(pipe)  # the plan's device: cuda
    assert group.call_args_list == [
        expected_group_call(pipe.text_encoder_2, plan.choice.components["text_encoder_2"]),
        expected_group_call(pipe.transformer, plan.choice.components["transformer"])]
    te_to.assert_called_once_with("cuda")  # resident components are moved to the device
    vae_to.assert_called_once_with("cuda")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


def test_fp8_on_an_upcast_fp16_vae_is_refused_untouched():
    """SDXL decodes an fp16 VAE with force_upcast in fp32; fp8 casting hooks would cast it back (mixed dtypes)."""
    pipe = build_tiny("sdxl")
    pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    before = pipe_state(pipe)
    with pytest.raises(PlanError, match="vae: an fp16 VAE with force_upcast"):
        make_plan(pipe, vae=ComponentPlan(storage_dtype=E4M3)).apply(pipe)
    assert pipe_state(pipe) == before


@pytest.mark.parametrize("knob", [{"use_stream": "false"}, {"offload_to_disk": 1}])
def test_plan_flags_must_be_booleans(knob):
    plan = ComponentPlan("group_offload", "leaf_level", **knob)
    with pytest.raises(PlanError, match=f"{next(iter(knob))} must be true or false"):
        plan.validate("transformer")
    with pytest.raises(PlanError, match="vae_tiling must be true or false"):
        Choice({}, vae_tiling="false").validate()
