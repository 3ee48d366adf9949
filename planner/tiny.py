"""Tiny but real diffusers pipelines (Flux, SDXL, SD3, Wan 2.1/2.2, CogVideoX, LTX-Video) built in code, for tests
and CPU dry runs.

Nothing is downloaded: weights are random but deterministic from `seed` (`torch.manual_seed` before
each component), and tokenizers are small word-level `tokenizers` models wrapped in
`PreTrainedTokenizerFast`. Each VAE has `sample_size=16`, so at the 32x32 call size of
`tiny_call_kwargs` `enable_tiling()` really takes the tiled encode/decode path.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from planner.glue import BOS, EOS, PAD, VOCAB, word_tokenizer

TEXT_VOCAB_SIZE = 1000  # model embedding rows; the tokenizer only ever emits ids < len(VOCAB)
TEXT_HIDDEN = 32

M = TypeVar("M", bound=torch.nn.Module)


def _seeded(seed: int, dtype: torch.dtype, build: Callable[[], M]) -> M:
    torch.manual_seed(seed)
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast of a fresh (unquantized) model.
    return torch.nn.Module.to(build(), dtype=dtype).eval()


def _clip_config(projection_dim: int = TEXT_HIDDEN) -> CLIPTextConfig:
    # eos_token_id != 2, so the pooled output is taken at the first </s> (the modern CLIP rule).
    return CLIPTextConfig(
        vocab_size=TEXT_VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=37, projection_dim=projection_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
        pad_token_id=VOCAB[PAD], bos_token_id=VOCAB[BOS], eos_token_id=VOCAB[EOS],
    )


def _vae(**overrides: Any) -> AutoencoderKL:
    config: dict[str, Any] = dict(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16,
    )
    return AutoencoderKL(**{**config, **overrides})


def _t5(d_model: int = TEXT_HIDDEN) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=TEXT_VOCAB_SIZE, d_model=d_model, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0,
        pad_token_id=VOCAB[PAD], eos_token_id=VOCAB[EOS], decoder_start_token_id=VOCAB[PAD],
    ))


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """Flux: 2+2-layer transformer (16 = 4 * 4 packed latent channels), CLIP-L-like + T5-like encoders."""
    transformer = _seeded(seed, dtype, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ))
    vae = _seeded(seed, dtype, lambda: _vae(
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    ))
    text_encoder = _seeded(seed, dtype, lambda: CLIPTextModel(_clip_config()))
    text_encoder_2 = _seeded(seed, dtype, _t5)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=word_tokenizer(77, bos=True),
        text_encoder_2=text_encoder_2, tokenizer_2=word_tokenizer(512, bos=False), transformer=transformer,
    )


def tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """SDXL: text_time UNet (cross dim 32 + 32, add-embed input 6 * 8 + 32), two tiny CLIP encoders."""
    unet = _seeded(seed, dtype, lambda: UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=1, use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8, norm_num_groups=32,
    ))
    vae = _seeded(seed, dtype, lambda: _vae(scaling_factor=0.13025))
    text_encoder = _seeded(seed, dtype, lambda: CLIPTextModel(_clip_config()))
    text_encoder_2 = _seeded(seed, dtype, lambda: CLIPTextModelWithProjection(_clip_config()))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=word_tokenizer(77, bos=True),
        tokenizer_2=word_tokenizer(77, bos=True), unet=unet, scheduler=scheduler, add_watermarker=False,
    )


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """SD3: 1-layer MMDiT; two CLIPs with projections (pooled 32 + 32) and a T5 of width 64 (the joint dim)."""
    transformer = _seeded(seed, dtype, lambda: SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=2 * TEXT_HIDDEN, pooled_projection_dim=2 * TEXT_HIDDEN,
        out_channels=4,
    ))
    vae = _seeded(seed, dtype, lambda: _vae(scaling_factor=1.5305, shift_factor=0.0609))
    encoders = [_seeded(seed, dtype, lambda: CLIPTextModelWithProjection(_clip_config())) for _ in range(2)]
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=word_tokenizer(77, bos=True), text_encoder_2=encoders[1],
        tokenizer_2=word_tokenizer(77, bos=True), text_encoder_3=_seeded(seed, dtype, lambda: _t5(2 * TEXT_HIDDEN)),
        tokenizer_3=word_tokenizer(256, bos=False),
    )


def _wan_transformer() -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_HIDDEN, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, two_denoisers: bool = False) -> WanPipeline:
    """Wan 2.1 (one 2-layer transformer); `two_denoisers`: Wan 2.2's high-noise `transformer` and low-noise
    `transformer_2`, switching at boundary_ratio 0.875 of the training timesteps."""
    transformer = _seeded(seed, dtype, _wan_transformer)
    vae = _seeded(seed, dtype, lambda: AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ))
    extra: dict[str, Any] = {}
    if two_denoisers:
        extra = dict(transformer_2=_seeded(seed + 1, dtype, _wan_transformer), boundary_ratio=0.875)
    return WanPipeline(
        tokenizer=word_tokenizer(512, bos=False), text_encoder=_seeded(seed, dtype, _t5), transformer=transformer,
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **extra,
    )


def tiny_cogvideox_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> CogVideoXPipeline:
    """CogVideoX: 1-layer expert transformer (inner dim 32 = the T5 width), 4-block 3D VAE (8x, 4x in time)."""
    transformer = _seeded(seed, dtype, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=TEXT_HIDDEN, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    ))
    vae = _seeded(seed, dtype, lambda: AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ))
    return CogVideoXPipeline(tokenizer=word_tokenizer(226, bos=False), text_encoder=_seeded(seed, dtype, _t5), vae=vae,
                             transformer=transformer, scheduler=DDIMScheduler())


def tiny_ltx_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> LTXPipeline:
    """LTX-Video: 1-layer transformer on 8 latent channels, a 4-block causal video VAE (4x spatial, 4x time)."""
    transformer = _seeded(seed, dtype, lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=TEXT_HIDDEN,
    ))
    vae = _seeded(seed, dtype, lambda: AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ))
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_seeded(seed, dtype, _t5),
                       tokenizer=word_tokenizer(128, bos=False), transformer=transformer)


def tiny_call_kwargs(pipe: DiffusionPipeline, seed: int = 0) -> dict[str, Any]:
    """A fast deterministic 32x32, 2-step call; SDXL uses guidance 5.0 so classifier-free guidance runs."""
    kwargs: dict[str, Any] = dict(
        prompt="a photo of a cat", height=32, width=32, num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
    )
    if isinstance(pipe, FluxPipeline):
        kwargs.update(guidance_scale=3.5, max_sequence_length=16)
    else:
        kwargs.update(guidance_scale=5.0)
    return kwargs
