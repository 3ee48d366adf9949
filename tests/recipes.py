"""The tensors a pipeline feeds each component, per model family, for tracing one call.

This is the one per-family table of memplan (the issue allows it for denoiser inputs); everything else about a
component is found by walking its modules. Each builder returns a zero-argument function that creates the inputs
(inside the tracer, so they count as live bytes) and calls the module the way the pipeline does.
"""

from __future__ import annotations

from typing import Callable

import torch

from planner.workload import Workload

VAE_SCALE = 8  # spatial downsampling of every image/video VAE in the zoo (2 ** (len(block_out_channels) - 1))
WAN_TEMPORAL_SCALE = 4


class NoInputsKnown(ValueError):
    """memplan does not know which tensors the pipeline feeds this component class."""


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of the module's floating parameters hold (fp32-kept layers aside): what it computes in."""
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else next(module.parameters()).dtype


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    return next(module.parameters()).device, compute_dtype(module)


def _flux(module, w: Workload) -> Callable[[], object]:
    device, dtype = _device_dtype(module)
    cfg = module.config
    batch, tokens = w.batch_size * w.cfg_batch, (w.height // 16) * (w.width // 16)
    seq = w.max_sequence_length

    def call():
        kwargs = dict(
            hidden_states=torch.randn(batch, tokens, cfg.in_channels, device=device, dtype=dtype),
            encoder_hidden_states=torch.randn(batch, seq, cfg.joint_attention_dim, device=device, dtype=dtype),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
            timestep=torch.ones(batch, device=device, dtype=dtype),
            img_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
            txt_ids=torch.zeros(seq, 3, device=device, dtype=dtype),
            return_dict=False,
        )
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.ones(batch, device=device, dtype=torch.float32)
        return module(**kwargs)

    return call


def _unet(module, w: Workload) -> Callable[[], object]:
    device, dtype = _device_dtype(module)
    cfg = module.config
    batch = w.batch_size * w.cfg_batch
    shape = (batch, cfg.in_channels, w.height // VAE_SCALE, w.width // VAE_SCALE)

    def call():
        added = None
        if cfg.addition_embed_type == "text_time":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {
                "text_embeds": torch.randn(batch, text_dim, device=device, dtype=dtype),
                "time_ids": torch.randn(batch, 6, device=device, dtype=dtype),
            }
        return module(
            torch.randn(shape, device=device, dtype=dtype),
            torch.tensor(999, device=device),
            encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )

    return call


def _wan_latent_frames(w: Workload) -> int:
    return ((w.num_frames or 1) - 1) // WAN_TEMPORAL_SCALE + 1


def _wan(module, w: Workload) -> Callable[[], object]:
    device, dtype = _device_dtype(module)
    cfg = module.config
    batch = w.batch_size * w.cfg_batch
    shape = (batch, cfg.in_channels, _wan_latent_frames(w), w.height // VAE_SCALE, w.width // VAE_SCALE)

    def call():
        return module(
            hidden_states=torch.randn(shape, device=device, dtype=dtype),
            timestep=torch.ones(batch, device=device, dtype=torch.long),
            encoder_hidden_states=torch.randn(batch, w.max_sequence_length, cfg.text_dim, device=device, dtype=dtype),
            return_dict=False,
        )

    return call


def _vae_decode(module, w: Workload) -> Callable[[], object]:
    device, dtype = _device_dtype(module)
    cfg = module.config
    channels = getattr(cfg, "latent_channels", None) or getattr(cfg, "z_dim")
    spatial = (w.height // VAE_SCALE, w.width // VAE_SCALE)
    frames = (_wan_latent_frames(w),) if type(module).__name__ == "AutoencoderKLWan" else ()
    shape = (w.batch_size, channels, *frames, *spatial)

    def call():
        return module.decode(torch.randn(shape, device=device, dtype=dtype), return_dict=False)

    return call


def _text_encoder(module, w: Workload) -> Callable[[], object]:
    device, _ = _device_dtype(module)
    cfg = module.config
    limit = getattr(cfg, "max_position_embeddings", None)
    length = min(w.max_sequence_length, limit) if limit else w.max_sequence_length

    def call():
        ids = torch.zeros(w.batch_size, length, device=device, dtype=torch.long)
        return module(input_ids=ids)

    return call


_DENOISERS = {
    "FluxTransformer2DModel": _flux,
    "UNet2DConditionModel": _unet,
    "WanTransformer3DModel": _wan,
}


def call_builder(module: torch.nn.Module, role: str, workload: Workload) -> Callable[[], object]:
    """A zero-argument function calling `module` as the pipeline would for `workload`."""
    name = type(module).__name__
    if role == "denoiser" and name in _DENOISERS:
        return _DENOISERS[name](module, workload)
    if role == "vae" and hasattr(module, "decode"):
        return _vae_decode(module, workload)
    if role == "text_encoder" and type(module).__module__.startswith("transformers"):
        return _text_encoder(module, workload)
    raise NoInputsKnown(f"no input recipe for {name} as {role}")
