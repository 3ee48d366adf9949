import json
import re
from pathlib import Path

import pytest
import torch

from planner.profiler import fp8_layers, profile, profile_component
from planner.sources import load_source, zoo_names
from planner.workload import Workload

W = Workload(height=64, width=64, num_inference_steps=2)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 8)  # 4*8 + 8 = 40 params
        self.norm = torch.nn.LayerNorm(8)  # 16 params

    def forward(self, x):
        return self.norm(self.lin(x))


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(2, 4)  # 12 params, skipped by fp8 (^proj_in$)
        self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])
        self.register_buffer("scale", torch.ones(5))


def test_hand_computed_bytes_blocks_and_fp8():
    comp = profile_component("other_thing", Toy(), [])  # never called: weights only
    assert comp.role == "unused" and comp.calls == () and comp.calls_per_run == 0
    assert comp.param_bytes_by_dtype == {"float32": (12 + 3 * 56) * 4}
    assert comp.buffer_bytes == 5 * 4
    assert comp.total_bytes == (12 + 168 + 5) * 4
    assert comp.block_lists == {"blocks": 3}
    assert [b.n_bytes for b in comp.blocks] == [56 * 4] * 3
    assert comp.unmatched.n_bytes == (12 + 5) * 4
    # fp8 keeps norms and proj_in: only the 3 block Linears (40 params each) go from 4 to 1 byte
    assert comp.fp8_saving_bytes == 3 * 40 * 3
    assert [b.fp8_saving_bytes for b in comp.blocks] == [120] * 3
    assert comp.leaf_count == 4 and comp.largest_leaf_bytes == 40 * 4


def test_fp8_rules_follow_diffusers_on_flux():
    flux = load_source("flux-dev").components["transformer"]
    names = [n for n, _ in fp8_layers(flux)]
    assert not any(re.search("norm", n) for n in names)  # AdaLN norm*.linear stay in bf16
    assert any(n.endswith("attn.to_q") for n in names)


def _reference_counts() -> dict[tuple[str, str], float]:
    """Parameter counts (millions) from the reference table copied into planner/zoo/README.md."""
    text = (Path(__file__).parents[1] / "planner" / "zoo" / "README.md").read_text()
    counts, pipeline = {}, None
    for row in re.findall(r"^\|(.+)\|$", text, flags=re.M):
        cells = [c.strip() for c in row.split("|")]
        if len(cells) < 4 or not cells[3].endswith(" M"):
            continue
        pipeline = cells[0].split(" ")[0] or pipeline
        counts[(pipeline, cells[1])] = float(cells[3][:-2].replace(",", ""))
    return counts


def test_zoo_parameter_counts_match_reference():
    counts = _reference_counts()
    assert len(counts) >= 12
    for (pipeline, component), millions in counts.items():
        module = load_source(pipeline).components[component]
        numel = sum(p.numel() for p in module.parameters())
        assert abs(numel / 1e6 - millions) / millions < 1e-3, (pipeline, component)


@pytest.mark.parametrize("name", zoo_names())  # every entry profiles: its calls come from discovery
def test_zoo_param_bytes_are_exact(name):
    source = load_source(name)
    prof = profile(source, W)  # every component (the loop used to check only the VAE)
    for comp_name, module in source.components.items():
        expected = sum(p.numel() * p.element_size() for p in module.parameters())
        assert prof.components[comp_name].param_bytes == expected, comp_name


def test_profile_is_cached_and_serializable(tmp_path):
    source = load_source("sd15")
    first = profile(source, W)
    again = profile(source, W)
    assert again is first
    from planner.profiler import Profile

    assert Profile.from_dict(json.loads(json.dumps(first.to_dict()))) == first


def test_fp8_is_offered_only_where_diffusers_can_apply_it():
    from planner.profiler import layerwise_casting_works

    sdxl, flux = load_source("sdxl-base").components, load_source("flux-dev").components
    assert not layerwise_casting_works(sdxl["vae"])  # fp16 + force_upcast: decoded in fp32
    assert layerwise_casting_works(sdxl["unet"])
    assert layerwise_casting_works(flux["vae"])  # bf16: the Flux pipeline does not upcast
    assert not layerwise_casting_works(flux["text_encoder_2"])  # transformers: no casting API


def test_disk_offload_is_not_offered_where_it_would_split_tied_weights():
    from planner.space import PER_COMPONENT, SearchSpace, enumerate_component

    prof = profile(load_source("flux-dev"), Workload(height=256, width=256, num_inference_steps=2,
                                                     max_sequence_length=64))
    t5 = prof.components["text_encoder_2"]  # shared.weight is encoder.embed_tokens.weight
    assert t5.disk_unsafe_offload_types == ("block_level", "leaf_level")  # shared / encoder are separate groups
    options = enumerate_component("text_encoder_2", t5, PER_COMPONENT, SearchSpace(allow_disk=True))
    assert not any(p.offload_to_disk for p in options)
    clip = prof.components["text_encoder"]  # nothing tied: disk is offered at leaf level
    clip_options = enumerate_component("text_encoder", clip, PER_COMPONENT, SearchSpace(allow_disk=True))
    assert any(p.offload_to_disk and p.offload_type == "leaf_level" for p in clip_options)


def test_device_backend_measures_real_calls_and_agrees_with_meta():
    """The device backend runs the real modules (CPU here): its traced activation peaks equal the meta twin's,
    and it records seconds per call and per block, which price plans only on a spec calibrated on that device."""
    import dataclasses

    from conftest import build_tiny
    from cost_models import estimate, get_gpu
    from planner.sources import from_pipeline
    from planner.strategy import Choice, ComponentPlan
    pipe = build_tiny("flux")
    work = dict(height=64, width=64, num_inference_steps=3, max_sequence_length=16)
    meta, device = profile(from_pipeline(pipe), **work), profile(from_pipeline(pipe, meta=False), **work)
    assert (meta.backend, device.backend) == ("meta", "device")
    for name, comp in device.components.items():
        assert comp.activation_peak_bytes == meta.components[name].activation_peak_bytes
        assert comp.measured_call_s > 0 and comp.measured_on == "cpu"
        # a block the call never runs (the VAE encoder's, in a decode) has no time, not zero
        assert all(b.measured_s > 0 if b.flops > 0 else b.measured_s is None for b in comp.blocks)
    resident = Choice({n: ComponentPlan() for n in device.components})
    table = get_gpu("rtx-4090")
    here = dataclasses.replace(table, calibrated=True, source="calibrate() on cpu")
    denoiser = device.components["transformer"]
    assert estimate(device, resident, here).phase_s["denoise"] == pytest.approx(3 * denoiser.measured_call_s)
    from cost_models.time import roofline_s  # elsewhere: the roofline over the traced ops

    roofline = 3 * roofline_s(denoiser.calls[0].ops, table)
    assert roofline > 0 and estimate(device, resident, table).phase_s["denoise"] == pytest.approx(roofline)
    near = dataclasses.replace(table, calibrated=True, source="calibrate() on cpu (another one)")
    assert estimate(device, resident, near).phase_s["denoise"] == pytest.approx(roofline)  # exact device only


def test_device_profiles_are_cached_per_card(monkeypatch):
    """A device-backend profile holds one card's measured seconds and allocator peaks: another card (or the CPU)
    must not get it from the cache. Meta profiles do not depend on the device."""
    from conftest import build_tiny
    from planner import profiler
    from planner.sources import from_pipeline

    pipe, work = build_tiny("sdxl"), dict(height=32, width=32, num_inference_steps=2)
    real, twins = from_pipeline(pipe, meta=False), from_pipeline(pipe)
    cpu_key = profiler._cache_key(real, work, "device", False)
    meta_key = profiler._cache_key(twins, work, "meta", False)
    monkeypatch.setattr(profiler, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert profiler._cache_key(real, work, "device", False) != cpu_key
    assert profiler._cache_key(twins, work, "meta", False) == meta_key
