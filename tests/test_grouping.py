"""planner.grouping: the block_level layout, checked against what diffusers really builds."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny
from planner.grouping import group_of, layout
from planner.sources import load_source


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def _diffusers_groups(module: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(blocks, levels holding an unmatched group) as diffusers' apply_group_offloading really makes them."""
    from diffusers.hooks import apply_group_offloading

    groups = layout(module)
    bm = list(groups.block_modules) if groups.block_modules is not None else None
    apply_group_offloading(module, onload_device=torch.device("cpu"), offload_type="block_level",
                           num_blocks_per_group=1, block_modules=bm)
    blocks, owners = set(), set()
    for name, sub in module.named_modules():
        hook = sub._diffusers_hook.get_hook("group_offloading") if hasattr(sub, "_diffusers_hook") else None
        if hook is None:
            continue
        if hook.group.offload_leader is sub and sub in hook.group.modules:
            blocks.add(name)
        elif hook.group.offload_leader is sub:
            owners.add(name)
    return blocks, owners


def test_layout_is_what_diffusers_builds(tiny_kind):
    for name, module in _modules(build_tiny(tiny_kind)).items():
        groups = layout(module)
        blocks, owners = _diffusers_groups(module)
        assert blocks == set(groups.block_names), name
        assert owners == set(groups.unmatched_owners), name


def test_text_encoders_get_their_layers_as_blocks():
    flux = load_source("flux-dev").components
    sdxl = load_source("sdxl-base").components
    wan = load_source("wan2.1-t2v-14b").components
    t5, clip, clip_proj, umt5 = flux["text_encoder_2"], flux["text_encoder"], sdxl["text_encoder_2"], wan["text_encoder"]
    # T5-XXL: 24 layers; `shared` walked on its own so that only the encoder level has an unmatched group
    assert layout(t5).block_modules == ("encoder", "shared") and len(layout(t5).lists["encoder.block"]) == 24
    assert layout(umt5).block_modules == ("encoder", "shared") and len(layout(umt5).lists["encoder.block"]) == 24
    # CLIP-L: 12 layers, the embeddings and final norm stay the top level's unmatched group
    assert layout(clip).block_modules == ("encoder",) and layout(clip).unmatched_owners == ("",)
    assert len(layout(clip).lists["encoder.layers"]) == 12
    # OpenCLIP bigG with projection: 32 layers; text_projection its own group, the rest under text_model
    assert layout(clip_proj).block_modules == ("text_model", "encoder", "text_projection")
    assert len(layout(clip_proj).lists["text_model.encoder.layers"]) == 32


def test_diffusers_models_keep_diffusers_default():
    flux = load_source("flux-dev").components
    assert layout(flux["transformer"]).block_modules is None
    assert {k: len(v) for k, v in layout(flux["transformer"]).lists.items()} == {
        "transformer_blocks": 19, "single_transformer_blocks": 38}
    vae = layout(flux["vae"])  # AutoencoderKL._group_offload_block_modules: encoder / decoder walked inside
    assert vae.block_modules is None and set(vae.lists) == {"encoder.down_blocks", "decoder.up_blocks"}


@pytest.mark.parametrize("zoo", ["flux-dev", "sdxl-base", "wan2.1-t2v-14b"])
def test_every_block_list_has_exactly_one_prefetch_level(zoo):
    """With streams each block list needs one level with an unmatched group above it (grouping's docstring)."""
    for name, module in load_source(zoo).components.items():
        groups = layout(module)
        for fqn in groups.lists:
            above = [o for o in groups.unmatched_owners if o == "" or fqn.startswith(o + ".")]
            assert len(above) == 1, (zoo, name, fqn, above)


def test_tied_t5_embedding_lands_in_two_groups():
    t5 = build_tiny("flux").text_encoder_2
    groups = layout(t5)
    assert group_of(groups, "shared.weight") == "unmatched:shared"
    assert group_of(groups, "encoder.embed_tokens.weight") == "unmatched:encoder"
    assert group_of(groups, "encoder.block.1.layer.0.SelfAttention.q.weight") == "encoder.block.1"
