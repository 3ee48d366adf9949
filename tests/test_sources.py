"""Model inputs: zoo names, diffusers model folders (configs only) and loaded pipelines give the same profile."""

import json
import shutil

import pytest
import torch

from conftest import build_tiny
from planner.profiler import profile
from planner.sources import ZOO_DIR, config_hash, from_pipeline, load_source, meta_twin
from planner.workload import Workload

W = dict(height=256, width=256, num_inference_steps=2)


def test_model_folder_without_weights_equals_zoo(tmp_path):
    folder = tmp_path / "my-sd15"
    shutil.copytree(ZOO_DIR / "sd15", folder)
    from_folder = load_source(folder)
    from_zoo = load_source("sd15")
    assert from_folder.pipeline_class == "StableDiffusionPipeline"
    assert {n: config_hash(m) for n, m in from_folder.components.items()} == \
           {n: config_hash(m) for n, m in from_zoo.components.items()}
    assert all(p.device.type == "meta" for m in from_folder.components.values() for p in m.parameters())


def test_folder_missing_config_is_named(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(ZOO_DIR / "sd15", folder)
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(ValueError, match="unet/config.json is missing"):
        load_source(folder)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="flux-dev"):
        load_source("no-such-model")


def test_unknown_component_class_is_profiled_generically(tmp_path, caplog):
    """A component memplan has no call recipe for still gets its weights, blocks and fp8 bytes by module walk."""
    folder = tmp_path / "odd"
    shutil.copytree(ZOO_DIR / "sd15", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPVisionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "image_encoder").mkdir()
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": 32, "patch_size": 8}
    (folder / "image_encoder" / "config.json").write_text(json.dumps(cfg))
    source = load_source(folder)
    prof = profile(source, **W)
    comp = prof.components["image_encoder"]
    expected = sum(p.numel() * p.element_size() for p in source.components["image_encoder"].parameters())
    # the pipeline takes an image_encoder (IP-Adapter) but a text-to-image call never runs it
    assert comp.param_bytes == expected and comp.role == "unused" and comp.calls == () and comp.calls_per_run == 0


def test_loaded_pipeline_profiles_through_meta_twins(tiny_kind):
    pipe = build_tiny(tiny_kind, seed=0)
    source = from_pipeline(pipe)
    for name, twin in source.components.items():
        real = getattr(pipe, name)
        assert config_hash(twin) == config_hash(real)
        assert [(n, p.dtype, p.shape) for n, p in twin.named_parameters()] == \
               [(n, p.dtype, p.shape) for n, p in real.named_parameters()]
        assert all(p.device.type == "meta" for p in twin.parameters())
    # the user's modules are untouched: still real tensors on the CPU
    assert all(p.device.type == "cpu" for n in source.components for p in getattr(pipe, n).parameters())


def test_meta_twin_keeps_mixed_dtypes():
    wan = load_source("wan2.1-t2v-1.3b").components["transformer"]
    twin = meta_twin(wan)
    assert {p.dtype for p in twin.parameters()} == {torch.float32, torch.bfloat16}
    assert [p.dtype for p in twin.parameters()] == [p.dtype for p in wan.parameters()]


@pytest.mark.parametrize("name,knobs,expected", [
    # the pipelines' own defaults: default_sample_size x vae_scale_factor, __call__'s steps; CFG as traced
    ("flux-dev", {}, (1024, 1024, None, 28, 1, 1, "bfloat16")),
    ("sdxl-base", {}, (1024, 1024, None, 50, 2, 1, "float16")),
    # Wan's size given small (its default 480x832 VAE trace takes a minute here): frames, steps, CFG are its own
    ("wan2.1-t2v-1.3b", {"height": 64, "width": 64}, (64, 64, 81, 50, 1, 2, "bfloat16")),
])
def test_default_workloads_come_from_the_pipeline(name, knobs, expected):
    w = profile(load_source(name), **knobs).workload
    assert (w.height, w.width, w.num_frames, w.num_inference_steps, w.cfg_batch, w.cfg_passes, w.dtype) == expected


def test_workload_knobs_are_validated_against_the_pipeline():
    from planner.call_args import call_kwargs
    from planner.tiny import tiny_sdxl_pipeline

    with pytest.raises(ValueError, match="height"):
        Workload(height=-3, width=64, num_inference_steps=2)
    sdxl = type(tiny_sdxl_pipeline())
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline.__call__ takes no 'max_sequence_length'"):
        call_kwargs(sdxl, {"max_sequence_length": 256})
    assert call_kwargs(sdxl, {"guidance_scale": 2.0, "batch_size": 2})["num_images_per_prompt"] == 2


def test_folder_glue_real_where_files_exist_else_stand_ins_said(tmp_path):
    from planner.glue import word_tokenizer

    zoo = load_source("flux-dev")  # configs only: both tokenizers are stand-ins, the scheduler has its config
    assert [n.split(":")[0] for n in zoo.assumptions] == ["tokenizer", "tokenizer_2"]
    assert "max length 77" in zoo.assumptions[0] and "max length 512" in zoo.assumptions[1]
    assert zoo.pipeline.scheduler.config.use_dynamic_shifting  # read from scheduler/scheduler_config.json
    folder = tmp_path / "flux"
    shutil.copytree(ZOO_DIR / "flux-dev", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index))
    word_tokenizer(77, bos=True).save_pretrained(folder / "tokenizer")
    source = load_source(folder)
    assert [n.split(":")[0] for n in source.assumptions] == ["tokenizer_2"]
    assert source.pipeline.tokenizer.model_max_length == 77
