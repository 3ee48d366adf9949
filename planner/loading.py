"""Load-time host-RAM peaks: what `from_pretrained` holds in RAM while it reads a (sharded) checkpoint.

Accounting (a bound, stated): a component being loaded holds its full weights plus the one shard being read,
so its load peak is `model bytes + largest shard bytes`; a pipeline loads its components one after another and
keeps the earlier ones, so its load peak is at most `sum of model bytes + the largest shard of any component`.

The largest shard comes from the component's folder when it has one:
- a `*.safetensors.index.json`: its weight map's files, sized from disk when they are there, else from the
  model's own tensor bytes grouped by the map;
- a single `*.safetensors` file: one shard, the whole file;
- no weights at all (a config-only folder, the zoo): the shards `save_pretrained` would write at its default
  `max_shard_size`, split the way huggingface_hub splits them (tensors in state-dict order, a new shard when the
  next tensor would overflow, a tensor bigger than the limit alone in its own shard).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from planner.units import format_size

logger = logging.getLogger(__name__)

# The defaults of `save_pretrained(max_shard_size=...)` in the installed libraries (GB = 10**9, as
# huggingface_hub parses it): diffusers 0.42 ModelMixin "10GB", transformers 5.x PreTrainedModel "50GB".
DEFAULT_MAX_SHARD_BYTES = {"diffusers": 10 * 10**9, "transformers": 50 * 10**9}
# Advice is rounded down to whole megabytes (whole kilobytes below 100 MB): `save_pretrained` takes "1234MB".
MB, KB = 10**6, 10**3


@dataclasses.dataclass(frozen=True)
class Shards:
    """How one component's checkpoint is split: the largest shard, how many, and where that was read from."""

    largest_bytes: int
    count: int
    source: str  # "index", "single file" or "default max_shard_size=<n>GB (<library>)"


def tensor_bytes(module) -> dict[str, int]:
    """State-dict names -> bytes (shared tensors once, non-persistent buffers left out, as save_pretrained does)."""
    out: dict[str, int] = {}
    for name, p in module.named_parameters():  # remove_duplicate=True: a tied weight is saved once
        out[name] = p.numel() * p.element_size()
    skip = {f"{prefix}.{b}".lstrip(".") for prefix, m in module.named_modules() for b in m._non_persistent_buffers_set}
    for name, b in module.named_buffers():
        if name not in skip:
            out[name] = b.numel() * b.element_size()
    return out


def split_shards(sizes: list[int], max_shard_bytes: int) -> list[int]:
    """Shard sizes as huggingface_hub's split_state_dict_into_shards_factory forms them."""
    shards, current = [], 0
    for size in sizes:
        if size > max_shard_bytes:
            shards.append(size)
            continue
        if current and current + size > max_shard_bytes:
            shards.append(current)
            current = 0
        current += size
    return shards + ([current] if current else [])


def library_of(module) -> str:
    return "transformers" if type(module).__module__.startswith("transformers") else "diffusers"


def component_shards(module, folder: Path | None) -> Shards:
    """The component's shards, from its folder's files when there are any, else at the default shard size."""
    sizes = tensor_bytes(module)
    if folder is not None and folder.is_dir():
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            return _from_index(indexes[0], sizes)
        files = sorted(folder.glob("*.safetensors"))
        if files:
            return Shards(max(f.stat().st_size for f in files), len(files), "single file")
    library = library_of(module)
    limit = DEFAULT_MAX_SHARD_BYTES[library]
    shards = split_shards(list(sizes.values()), limit)
    return Shards(max(shards, default=0), len(shards), f"default max_shard_size={limit // 10**9}GB ({library})")


def _from_index(index_file: Path, sizes: dict[str, int]) -> Shards:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{index_file}: not a safetensors index with a weight_map ({err})") from err
    per_file: dict[str, int] = {}
    for tensor, file in weight_map.items():
        per_file.setdefault(file, 0)
        per_file[file] += sizes.get(tensor, 0)
    on_disk = {f: (index_file.parent / f).stat().st_size for f in per_file if (index_file.parent / f).is_file()}
    if len(on_disk) == len(per_file):
        per_file = on_disk  # the files themselves: their dtype, not the planned one
    return Shards(max(per_file.values(), default=0), len(per_file), "index")


def load_shards(components: dict, folder: Path | None) -> dict[str, Shards]:
    """Every component's shards; `folder` is the model folder (component sub-folders inside) or None."""
    return {name: component_shards(module, folder / name if folder else None) for name, module in components.items()}


def with_shards(profile, shards: dict[str, Shards]):
    """The profile with each component's `largest_shard_bytes` / `shard_source` filled in."""
    comps = {n: dataclasses.replace(c, largest_shard_bytes=shards[n].largest_bytes, shard_source=shards[n].source)
             for n, c in profile.components.items() if n in shards}
    return dataclasses.replace(profile, components={**profile.components, **comps})


def pipeline_load_peak_bytes(profile) -> int:
    """Bound on the host RAM while the pipeline loads: every component's weights + the largest shard of any."""
    comps = profile.components.values()
    return sum(c.total_bytes for c in comps) + max((_largest(c) for c in comps), default=0)


def _largest(comp) -> int:
    if comp.largest_shard_bytes is None:
        raise ValueError(f"{comp.name}: the profile has no shard sizes (planner.loading.with_shards fills them)")
    return comp.largest_shard_bytes


def loading_report(profile, ram_bytes: int) -> dict:
    """The plan JSON's `loading`: per component weights, largest shard, load peak and shard source; the
    pipeline's load peak and the max_shard_size advice for `ram_bytes`."""
    comps = {n: {"model_bytes": c.total_bytes, "largest_shard_bytes": c.largest_shard_bytes,
                 "load_peak_bytes": c.load_peak_bytes, "shard_source": c.shard_source}
             for n, c in profile.components.items()}
    return {"components": comps, "pipeline_load_peak_bytes": pipeline_load_peak_bytes(profile),
            "ram_bytes": ram_bytes, "advice": advise_max_shard_size(profile, ram_bytes)}


def advise_max_shard_size(profile, ram_bytes: int) -> str:
    """One line: does loading fit `ram_bytes`, and if not, which `max_shard_size` would make it fit."""
    weights = sum(c.total_bytes for c in profile.components.values())
    peak = pipeline_load_peak_bytes(profile)
    if peak <= ram_bytes:
        return f"loading fits {format_size(ram_bytes)} of RAM (peak {format_size(peak)})"
    room = ram_bytes - weights
    # A shard holds at least one tensor; the largest layer (weight + bias) is the profile's closest figure to that.
    biggest_layer = max(c.largest_leaf_bytes for c in profile.components.values())
    if room < max(biggest_layer, KB):
        return (f"loading needs {format_size(peak)} of RAM: the weights alone ({format_size(weights)}) leave no "
                f"room in {format_size(ram_bytes)} for a shard; no max_shard_size helps (load with device_map onto "
                "the GPU, or raise the RAM budget)")
    advice = f"{room // MB}MB" if room >= 100 * MB else f"{room // KB}KB"
    return (f"loading needs {format_size(peak)} of RAM (weights {format_size(weights)} + largest shard "
            f"{format_size(peak - weights)}); re-save the checkpoint with save_pretrained(max_shard_size=\"{advice}\") "
            f"to load within {format_size(ram_bytes)}")

