"""Tiny but real diffusers pipelines (Flux, SDXL) built in code, for tests and CPU dry runs.

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
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
WORDS = "a an the of on in with and photo painting picture cat dog astronaut horse riding mars red blue".split()
VOCAB: dict[str, int] = {t: i for i, t in enumerate([PAD, EOS, UNK, BOS, *WORDS])}
TEXT_VOCAB_SIZE = 1000  # model embedding rows; the tokenizer only ever emits ids < len(VOCAB)
TEXT_HIDDEN = 32

M = TypeVar("M", bound=torch.nn.Module)


def _seeded(seed: int, dtype: torch.dtype, build: Callable[[], M]) -> M:
    torch.manual_seed(seed)
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast of a fresh (unquantized) model.
    return torch.nn.Module.to(build(), dtype=dtype).eval()


def _tokenizer(max_length: int, bos: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lowercase, whitespace split, `[<s>] words </s>`, padded with <pad>."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{BOS} $A {EOS}" if bos else f"$A {EOS}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, VOCAB[t]) for t in (BOS, EOS)]
    )
    extra = {"bos_token": BOS} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_length, padding_side="right",
        pad_token=PAD, eos_token=EOS, unk_token=UNK, **extra,
    )


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
    text_encoder_2 = _seeded(seed, dtype, lambda: T5EncoderModel(T5Config(
        vocab_size=TEXT_VOCAB_SIZE, d_model=TEXT_HIDDEN, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0,
        pad_token_id=VOCAB[PAD], eos_token_id=VOCAB[EOS], decoder_start_token_id=VOCAB[PAD],
    )))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer(77, bos=True),
        text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer(512, bos=False), transformer=transformer,
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
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=_tokenizer(77, bos=True),
        tokenizer_2=_tokenizer(77, bos=True), unet=unet, scheduler=scheduler, add_watermarker=False,
    )


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
