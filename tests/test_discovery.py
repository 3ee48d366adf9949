"""Discovery against real CPU runs of tiny real pipelines of six families (Flux, SD3, SDXL, Wan 2.1/2.2, CogVideoX,
LTX-Video): what the meta run records is what the real run does.

Call counts: the real run is counted with forward pre-hooks on every component and counting wrappers on the VAE
methods pipelines call directly (`encode`, `decode`), a mechanism that shares nothing with discovery's own.

Activation peaks, accounting rule: for each distinct call, the bytes allocated from the call's start until it
returns, at their peak, with the call's result counted while it is live; the weights and the call's inputs
existed before the call and are not counted (on CUDA they would be resident before the call too, and the cost
model counts them as weights and as the previous phase's outputs). The measured side is the CPU allocator's own
event stream (`tests/allocator.py`) for the same module, real weights, on the real arguments the real run passed,
without this CPU backend's kernel scratch (freed inside the op that made it; a GPU's workspaces differ).
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from allocator import measured_peaks
from planner import tiny
from planner.discovery import UntracedCallError, discover
from planner.sources import meta_twin

TOLERANCE = 0.10
PROMPT = "a photo of a cat riding a horse on mars"

# family -> (builder, call kwargs): small sizes so that the real CPU run takes a second
FAMILIES = {
    "flux": (tiny.tiny_flux_pipeline, dict(height=64, width=64, guidance_scale=3.5, max_sequence_length=32)),
    "sd3": (tiny.tiny_sd3_pipeline, dict(height=32, width=32, max_sequence_length=32)),
    "sdxl": (tiny.tiny_sdxl_pipeline, dict(height=64, width=64, negative_prompt="a dog")),
    "wan": (tiny.tiny_wan_pipeline, dict(height=64, width=64, num_frames=9, max_sequence_length=32)),
    "wan2.2": (lambda: tiny.tiny_wan_pipeline(two_denoisers=True),
               dict(height=64, width=64, num_frames=9, max_sequence_length=32)),
    "cogvideox": (tiny.tiny_cogvideox_pipeline, dict(height=16, width=16, num_frames=8, max_sequence_length=16)),
    "ltx": (tiny.tiny_ltx_pipeline, dict(height=32, width=32, num_frames=9, max_sequence_length=32)),
}
STEPS = 4
DIRECT_METHODS = ("encode", "decode")


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _kwargs(family: str) -> dict:
    return dict(prompt=PROMPT, num_inference_steps=STEPS, output_type="pt", **FAMILIES[family][1])


class _RealRun:
    """Counts every call of every component in a real run and keeps the arguments of the first of each kind."""

    def __init__(self, pipe):
        self.pipe, self.counts, self.first_args = pipe, {}, {}
        self.depth = 0

    def _seen(self, name, method, args, kwargs):
        key = (name, method)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.first_args.setdefault(key, copy.deepcopy((args, kwargs)))

    def run(self, kwargs: dict):
        handles, patched = [], []
        for name, module in _modules(self.pipe).items():
            def pre(mod, args, kw, _n=name):
                if self.depth == 0:
                    self._seen(_n, "forward", args, kw)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            for method in DIRECT_METHODS:
                if hasattr(module, method):
                    patched.append((module, method))
                    object.__setattr__(module, method, self._counting(name, method, getattr(module, method)))
        try:
            with torch.no_grad():
                return self.pipe(**kwargs)
        finally:
            for h in handles:
                h.remove()
            for module, method in patched:
                del module.__dict__[method]

    def _counting(self, name, method, original):
        def counted(*args, **kwargs):
            self._seen(name, method, args, kwargs)
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
        return counted


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_runs(request):
    family = request.param
    pipe = FAMILIES[family][0]()
    pipe.set_progress_bar_config(disable=True)
    real = _RealRun(pipe)
    real.run(_kwargs(family))
    twins = {k: meta_twin(v) for k, v in _modules(pipe).items()}
    found = discover(pipe, twins, _kwargs(family))
    return family, pipe, real, found


def test_calls_per_run_equal_a_real_run(family_runs):
    family, _, real, found = family_runs
    recorded: dict = {}
    for call in found.calls:
        key = (call.component, call.method)
        recorded[key] = recorded.get(key, 0) + call.count
    assert recorded == real.counts, family
    assert found.loop_steps >= STEPS - 1  # img2img-free calls: the loop ran its steps (some drop one)


def test_activation_peak_of_each_call_matches_the_cpu_allocator(family_runs, record_property):
    family, pipe, real, found = family_runs
    modules = _modules(pipe)
    for call in found.calls:
        args, kwargs = real.first_args[(call.component, call.method)]
        if [tuple(t.shape) for t in _tensors((args, kwargs))] != [tuple(t.shape) for t in
                                                                  _tensors((call.args, call.kwargs))]:
            continue  # another distinct call of the same method (e.g. a second CFG pass shape): covered elsewhere
        method = getattr(modules[call.component], call.method)
        measured, with_scratch = measured_peaks(lambda: method(*args, **kwargs))
        predicted = call.trace.peak_bytes
        record_property(f"{call.component}.{call.method}", (predicted, measured, with_scratch))
        assert measured > 0, (family, call.component)
        assert abs(predicted / measured - 1) <= TOLERANCE, (family, call.component, call.method, predicted,
                                                            measured, with_scratch)


def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("family", ["sd3", "cogvideox"])
def test_sd3_and_cogvideox_denoisers_are_traced(family):
    pipe = FAMILIES[family][0]()
    found = discover(pipe, {k: meta_twin(v) for k, v in _modules(pipe).items()}, _kwargs(family))
    denoise = [c for c in found.calls if c.phase == "denoise"]
    assert [c.component for c in denoise] == ["transformer"]
    assert denoise[0].trace.flops > 0 and denoise[0].trace.peak_bytes > 0


def test_wan22_counts_each_denoiser_for_its_own_steps():
    pipe = tiny.tiny_wan_pipeline(two_denoisers=True)
    kwargs = dict(_kwargs("wan2.2"), num_inference_steps=10)
    found = discover(pipe, {k: meta_twin(v) for k, v in _modules(pipe).items()}, kwargs)
    counts = {c.component: c.count for c in found.calls if c.phase == "denoise"}
    # boundary 0.875 x 1000 training steps: the high-noise expert takes the timesteps >= 875, two CFG passes each
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(10)  # as WanPipeline calls it
    high = int((scheduler.timesteps >= 875).sum())
    assert counts == {"transformer": 2 * high, "transformer_2": 2 * (10 - high)}
    assert 0 < high < 10


class _MetaUntraceableVAE(AutoencoderKL):
    """A VAE whose decode reads a data-dependent size (repeat_interleave without output_size): no meta answer."""

    def decode(self, z, *args, **kwargs):
        torch.repeat_interleave(torch.ones(2, dtype=torch.long, device=z.device))
        return super().decode(z, *args, **kwargs)


def test_untraceable_component_is_a_clear_error_naming_it():
    pipe = tiny.tiny_flux_pipeline()
    vae = _MetaUntraceableVAE.from_config(pipe.vae.config)
    pipe.register_modules(vae=vae)
    twins = {k: meta_twin(v) for k, v in _modules(pipe).items()}
    with pytest.raises(UntracedCallError, match=r"vae\.decode\(float32\[1,4,32,32\].*repeat_interleave"):
        discover(pipe, twins, _kwargs("flux"))
    assert "decode" not in vae.__dict__ and "forward" not in twins["vae"].__dict__  # patches removed on error


def test_untraced_opt_in_gives_a_partly_blind_profile_that_says_so(caplog):
    from planner.profiler import profile
    from planner.sources import from_pipeline

    pipe = tiny.tiny_flux_pipeline()
    pipe.register_modules(vae=_MetaUntraceableVAE.from_config(pipe.vae.config))
    knobs = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    with pytest.raises(UntracedCallError, match=r"vae\.decode"):
        profile(from_pipeline(pipe), **knobs)
    with caplog.at_level("WARNING"):
        prof = profile(from_pipeline(pipe), allow_untraced=True, **knobs)
    vae = prof.components["vae"]
    assert not vae.activations_known and vae.role == "untraced"
    assert all(c.activations_known and c.calls for n, c in prof.components.items() if n != "vae")
    assert any("PARTLY BLIND: vae" in note for note in prof.assumptions)
    assert "partly blind" in caplog.text


def test_fp8_cast_subclassed_pipeline_traces_in_its_compute_dtype():
    """A pipeline already cast by layerwise casting (fp8 storage, fp32 compute) and of a user's subclass."""
    from diffusers import FluxPipeline

    from planner.profiler import profile
    from planner.sources import from_pipeline

    class MyFlux(FluxPipeline):
        pass

    base = tiny.tiny_flux_pipeline()
    pipe = MyFlux(**base.components)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    prof = profile(from_pipeline(pipe), height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    assert prof.pipeline_class == "MyFlux" and prof.workload.dtype == "float32"
    transformer = prof.components["transformer"]
    assert transformer.calls[0].args.startswith("hidden_states=float32") and transformer.flops_per_call > 0
