"""The meta-traced activation peak against a real CPU run of the same component, measured by the allocator.

Prediction: `trace_call` on a `meta` copy of the component (same config, built under `torch.device("meta")`): our
storage-lifetime TorchDispatchMode with the flash-like SDPA stand-in, no data, on the inputs of the hand-written
per-family recipes of `tests/recipes.py` (kept as a cross-check of the tracer at real widths; planning itself takes
every call from discovery, see tests/test_discovery.py).

Measurement: the same component with random float32 weights, run for real on the CPU under
`torch.profiler.profile(profile_memory=True)`. The live-bytes curve is rebuilt from the allocator's own event
stream (`tests/allocator.py`), so it shares nothing with the tracer but the module code and the call recipe:
real kernels (CPU SDPA takes its
flash kernel, which like our stand-in keeps no L*S scores), real frees, no dispatch mode.

Kernel scratch: an allocation freed inside the same top-level aten op that made it is a workspace of this CPU
backend: oneDNN's weight/activation reorders in `mkldnn_convolution` (up to a whole weight: 118 MB for one SD1.5
up-block conv), `slow_conv3d`'s im2col columns, the flash kernel's per-thread buffers. A GPU has other workspaces
(cuDNN's), which memplan does not model. The assertion is on the curve without that scratch; the curve with it is
recorded beside it (`record_property`) so the gap stays visible. (The rule also drops intermediates of composite
ops, e.g. the clone inside a reshape, which the tracer does count: those could only make it over-predict.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from allocator import measured_peaks
from planner.sources import build_on_meta
from planner.tracing import trace_call
from recipes import call_builder
from planner.workload import Workload

ZOO = Path(__file__).parents[1] / "planner" / "zoo"
TOLERANCE = 0.10


def _zoo_config(model: str, component: str, **overrides) -> dict:
    config = json.loads((ZOO / model / component / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    return config | overrides


# role (which recipe), library, class, config at real widths with few layers, small workload
CASES = {
    "flux_transformer": ("denoiser", "diffusers", "FluxTransformer2DModel",
                         _zoo_config("flux-dev", "transformer", num_layers=1, num_single_layers=1),
                         Workload(256, 256, 1, max_sequence_length=64, dtype="float32")),
    "sd15_unet": ("denoiser", "diffusers", "UNet2DConditionModel", _zoo_config("sd15", "unet", layers_per_block=1),
                  Workload(128, 128, 1, cfg_batch=2, dtype="float32")),
    "flux_vae_decode": ("vae", "diffusers", "AutoencoderKL", _zoo_config("flux-dev", "vae"),
                        Workload(128, 128, 1, dtype="float32")),
    "sd15_clip_2_layers": ("text_encoder", "transformers", "CLIPTextModel",
                           _zoo_config("sd15", "text_encoder", num_hidden_layers=2), Workload(256, 256, 1, dtype="float32")),
    "wan_transformer": ("denoiser", "diffusers", "WanTransformer3DModel",
                        _zoo_config("wan2.1-t2v-1.3b", "transformer", num_layers=1),
                        Workload(128, 128, 1, num_frames=9, max_sequence_length=64, dtype="float32")),
    "wan_vae_decode": ("vae", "diffusers", "AutoencoderKLWan", _zoo_config("wan2.1-t2v-1.3b", "vae"),
                       Workload(32, 32, 1, num_frames=5, dtype="float32")),
}


def _real(library: str, class_name: str, config: dict) -> torch.nn.Module:
    """Random float32 weights on the CPU. diffusers models go through meta + to_empty (fast for big layers, and
    they hold no buffers that need init); transformers ones are built on the CPU for their position_ids."""
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        torch.manual_seed(0)
        return cls(cls.config_class(**config)).eval()
    module = build_on_meta(library, class_name, config).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    for param in module.parameters():
        param.data.uniform_(-0.02, 0.02, generator=generator)
    return module


@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_activation_peak_matches_cpu_allocator(case, record_property):
    role, library, class_name, config, workload = CASES[case]
    meta = build_on_meta(library, class_name, config)
    predicted = trace_call(meta, call_builder(meta, role, workload)).peak_bytes
    real = _real(library, class_name, config)
    measured, measured_with_scratch = measured_peaks(call_builder(real, role, workload))
    record_property("predicted_bytes", predicted)
    record_property("measured_bytes", measured)
    record_property("measured_with_kernel_scratch_bytes", measured_with_scratch)
    assert measured > 0
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted, measured, measured_with_scratch)


def test_meta_memo_leaves_traces_unchanged(monkeypatch):
    """The tracer memoizes meta ops by input metadata; a per-frame video VAE decode (mostly memo hits) and a
    transformer give the same peak, peak block and FLOPs as with every op run."""
    from planner import tracing

    cases = [("vae", "AutoencoderKLWan", _zoo_config("wan2.1-t2v-1.3b", "vae"), Workload(64, 64, 1, num_frames=9)),
             ("denoiser", "FluxTransformer2DModel", _zoo_config("flux-dev", "transformer", num_layers=2,
                                                                   num_single_layers=2), Workload(256, 256, 1))]
    for role, class_name, config, workload in cases:
        module = build_on_meta("diffusers", class_name, config)
        memoized = tracing.trace_call(module, call_builder(module, role, workload))
        with monkeypatch.context() as patch:
            patch.setattr(tracing, "_signature", lambda *a: None)
            plain = tracing.trace_call(module, call_builder(module, role, workload))
        assert memoized == plain


def test_vae_tiled_variant_only_where_a_tiled_path_runs():
    """The tiny Flux VAE tiles at 16 px (8 latents): a 16 px decode fits one tile and gets no tiled variant, a
    64 px one takes the tiled path, traced on the same latents; the VAE's flags and methods are restored."""
    from planner.profiler import profile
    from planner.sources import from_pipeline
    from planner.tiny import tiny_flux_pipeline

    source = from_pipeline(tiny_flux_pipeline())
    fits = profile(source, height=16, width=16, num_inference_steps=1, max_sequence_length=8).components["vae"]
    assert fits.tiled_activation_peak_bytes is None and [c.variant for c in fits.calls] == [""]
    tiled = profile(source, height=64, width=64, num_inference_steps=1, max_sequence_length=8).components["vae"]
    assert [(c.variant, c.args) for c in tiled.calls] == [("", "float32[1,4,32,32]"), ("tiled", "float32[1,4,32,32]")]
    assert tiled.tiled_activation_peak_bytes == tiled.calls[1].activation_peak_bytes > 0
    vae = source.components["vae"]
    assert vae.use_tiling is False and "tiled_decode" not in vae.__dict__ and "decode" not in vae.__dict__
