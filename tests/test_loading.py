"""Load-time host-RAM peaks (planner/loading.py): shard sizes from a real sharded checkpoint, its index alone,
or the libraries' default max_shard_size; the max_shard_size advice really makes loading fit."""

from __future__ import annotations

import dataclasses
import re

import pytest
from huggingface_hub import split_torch_state_dict_into_shards

from planner.loading import (DEFAULT_MAX_SHARD_BYTES, advise_max_shard_size, component_shards, load_shards,
                             pipeline_load_peak_bytes, split_shards, tensor_bytes, with_shards)
from planner.profiler import profile
from planner.sources import from_pipeline, load_source
from planner.tiny import tiny_flux_pipeline

SHARD = 20_000  # bytes: small enough that the tiny Flux transformer (fp32) is saved in several shards


@pytest.fixture(scope="module")
def transformer():
    return tiny_flux_pipeline(seed=0).transformer


def test_split_shards_is_huggingface_hubs_split(transformer):
    state = transformer.state_dict()
    split = split_torch_state_dict_into_shards(state, max_shard_size=SHARD)
    theirs = sorted(sum(state[k].numel() * state[k].element_size() for k in keys)
                    for keys in split.filename_to_tensors.values())
    assert sorted(split_shards(list(tensor_bytes(transformer).values()), SHARD)) == theirs
    assert len(theirs) > 2


def test_a_saved_sharded_checkpoint_is_read_from_its_index_and_files(transformer, tmp_path):
    transformer.save_pretrained(tmp_path, max_shard_size=SHARD)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and list(tmp_path.glob("*.safetensors.index.json"))
    shards = component_shards(transformer, tmp_path)
    assert shards == dataclasses.replace(shards, largest_bytes=max(f.stat().st_size for f in files),
                                         count=len(files), source="index")
    for f in files:  # the index alone (weights not downloaded yet): tensors' bytes grouped by its weight map
        f.unlink()
    by_map = component_shards(transformer, tmp_path)
    assert by_map.count == len(files) and by_map.source == "index"
    assert by_map.largest_bytes == max(split_shards(list(tensor_bytes(transformer).values()), SHARD))


def test_a_single_file_is_one_shard_and_no_files_means_the_default_size(transformer, tmp_path):
    transformer.save_pretrained(tmp_path)  # well under diffusers' 10GB default: one file, no index
    (file,) = tmp_path.glob("*.safetensors")
    assert component_shards(transformer, tmp_path) == component_shards(transformer, tmp_path).__class__(
        file.stat().st_size, 1, "single file")
    default = component_shards(transformer, None)
    assert default.count == 1 and default.largest_bytes == sum(tensor_bytes(transformer).values())
    assert default.source == "default max_shard_size=10GB (diffusers)"


def test_zoo_flux_dev_shards_at_the_default_sizes():
    """Flux-dev's transformer (bf16, ~23.8 GB) splits into 10 GB shards; T5-XXL (~9.5 GB) stays one 50 GB shard."""
    source = load_source("flux-dev")
    shards = load_shards(source.components, source.folder)
    tr, t5 = source.components["transformer"], source.components["text_encoder_2"]
    tr_bytes = sum(tensor_bytes(tr).values())
    assert shards["transformer"].count == 3 and shards["transformer"].largest_bytes <= 10 * 10**9
    assert shards["text_encoder_2"].largest_bytes == sum(tensor_bytes(t5).values())
    assert shards["text_encoder_2"].source == "default max_shard_size=50GB (transformers)"
    assert DEFAULT_MAX_SHARD_BYTES == {"diffusers": 10**10, "transformers": 5 * 10**10}
    assert 23e9 < tr_bytes < 24.5e9


def _tiny_profile(max_shard_bytes: int | None = None):
    pipe = tiny_flux_pipeline(seed=0)
    source = from_pipeline(pipe)
    prof = profile(source, height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    if max_shard_bytes is None:
        return prof, load_shards(source.components, None)
    shards = {n: component_shards(m, None) for n, m in source.components.items()}
    resplit = {n: dataclasses.replace(s, largest_bytes=max(split_shards(list(tensor_bytes(m).values()),
                                                                        max_shard_bytes)))
               for (n, s), m in zip(shards.items(), source.components.values())}
    return prof, resplit


def test_load_peak_is_weights_plus_largest_shard_and_the_advice_makes_it_fit():
    prof, shards = _tiny_profile()
    prof = with_shards(prof, shards)
    weights = sum(c.total_bytes for c in prof.components.values())
    for c in prof.components.values():
        assert c.load_peak_bytes == c.total_bytes + shards[c.name].largest_bytes
    assert pipeline_load_peak_bytes(prof) == weights + max(s.largest_bytes for s in shards.values())
    assert advise_max_shard_size(prof, pipeline_load_peak_bytes(prof)).startswith("loading fits")

    # Room for a 140 kB shard: more than the largest tensor (the text encoders' 128 kB embeddings), less than the
    # largest component saved whole (the 192 kB CLIP text encoder).
    budget = weights + 140_000
    assert pipeline_load_peak_bytes(prof) > budget
    advice = advise_max_shard_size(prof, budget)
    kb = int(re.search(r'max_shard_size="(\d+)KB"', advice).group(1))
    assert kb == 140
    _, resaved = _tiny_profile(max_shard_bytes=kb * 10**3)  # re-saved at the advice: loading fits
    assert pipeline_load_peak_bytes(with_shards(prof, resaved)) <= budget

    hopeless = advise_max_shard_size(prof, weights)
    assert "no max_shard_size helps" in hopeless


def test_plan_json_and_the_cli_carry_the_loading_advice(tmp_path, capsys):
    from planner.cli import main
    from planner.plan import Plan

    out = tmp_path / "p.json"
    assert main(["plan", "sd15", "--budget", "4GB", "--gpu", "rtx-4090", "--ram", "2GB", "--trials", "4",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    loading = Plan.load(out).loading
    assert loading["ram_bytes"] == 2 * 10**9 and set(loading["components"]) == {"text_encoder", "unet", "vae"}
    assert f"load: {loading['advice']}" in printed and "no max_shard_size helps" in loading["advice"]
    assert sum(c["model_bytes"] for c in loading["components"].values()) > 2 * 10**9  # fp16 sd15: ~2.1 GB
