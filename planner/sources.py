"""Where a plan's model comes from: a zoo name, a diffusers model folder (configs suffice), or a loaded pipeline.

Every source ends as a `PipelineSource`: the pipeline class name and its nn.Module components. Zoo and folder
components are built from their configs on the `meta` device, so full-size models cost no memory and no weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from planner.errors import ArgumentError

logger = logging.getLogger(__name__)

ZOO_DIR = Path(str(resources.files("planner") / "zoo"))


@dataclass
class PipelineSource:
    """A pipeline's class name and modules; `pipeline` is set when it came from a loaded pipeline object."""

    pipeline_class: str
    components: dict[str, torch.nn.Module]
    workload_defaults: dict = field(default_factory=dict)
    pipeline: object | None = None
    name: str = ""
    folder: Path | None = None  # the model folder (component sub-folders, maybe weights), when there is one


def zoo_names() -> list[str]:
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "model_index.json").is_file())


def load_source(model: str | Path, dtype: str | None = None) -> PipelineSource:
    """A zoo name or a diffusers model folder, built on meta in `dtype` (default: the pipeline's usual dtype)."""
    path = Path(model)
    if (path / "model_index.json").is_file():
        return _load_folder(path, dtype)
    if str(model) in zoo_names():
        return _load_folder(ZOO_DIR / str(model), dtype, name=str(model))
    raise ArgumentError(
                        f"model {str(model)!r} is neither a zoo name ({', '.join(zoo_names())}) nor a folder with a "
        "model_index.json: pass one of those"
    )


def from_pipeline(pipe, meta: bool = True) -> PipelineSource:
    """The nn.Module components of a loaded diffusers pipeline.

    With `meta=True` (the default) each component is replaced by a weightless twin on the meta device (same
    class, config and per-tensor dtypes), so profiling a full-size pipeline loaded on the CPU costs seconds,
    not a real forward pass. `meta=False` profiles the real modules on their device (the device backend)."""
    if not hasattr(pipe, "components"):
        raise ArgumentError(f"{type(pipe).__name__} is not a diffusers pipeline: it has no `components`")
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    if not modules:
        raise ArgumentError(f"{type(pipe).__name__} has no nn.Module components to plan for")
    if meta:
        modules = {k: meta_twin(v) for k, v in modules.items()}
    loaded_from = getattr(pipe, "name_or_path", None)  # a hub id or the local folder it was loaded from
    folder = Path(loaded_from) if loaded_from and (Path(loaded_from) / "model_index.json").is_file() else None
    return PipelineSource(type(pipe).__name__, modules, pipeline=pipe, name=type(pipe).__name__, folder=folder)


def meta_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` on the meta device: rebuilt from its config, each tensor in the original's dtype."""
    config = getattr(module, "config", None)
    if config is None:
        raise ArgumentError(f"{type(module).__name__} has no config to rebuild it from; profile it with meta=False")
    with torch.device("meta"):
        twin = instantiate(type(module), config)
    originals = dict([*module.named_parameters(), *module.named_buffers()])
    for name, tensor in [*twin.named_parameters(), *twin.named_buffers()]:
        if name in originals:
            tensor.data = tensor.data.to(originals[name].dtype)
    return twin.eval()


def _load_folder(path: Path, dtype: str | None, name: str = "") -> PipelineSource:
    index = json.loads((path / "model_index.json").read_text())
    pipeline_class = index["_class_name"]
    from planner.workload import default_workload

    defaults = dict(index.get("_memplan_workload", {}))
    torch_dtype = getattr(torch, dtype or defaults.get("dtype") or default_workload(pipeline_class).dtype)
    components = {}
    start = time.perf_counter()
    for comp, (library, class_name) in _module_entries(index).items():
        config_file = path / comp / "config.json"
        if not config_file.is_file():
            raise ArgumentError(f"{config_file} is missing: a model folder needs <component>/config.json")
        config = json.loads(config_file.read_text())
        components[comp] = cast_like_from_pretrained(build_on_meta(library, class_name, config), torch_dtype)
    logger.debug("built %s on meta in %.2fs", path, time.perf_counter() - start)
    return PipelineSource(pipeline_class, components, defaults, name=name or path.name, folder=path)


_MODULE_LIBRARIES = ("diffusers", "transformers")


def _module_entries(index: dict) -> dict[str, tuple[str, str]]:
    """Components that are models (diffusers/transformers classes with a config), not tokenizers/schedulers."""
    entries = {}
    for comp, value in index.items():
        if comp.startswith("_") or not isinstance(value, list) or value[0] not in _MODULE_LIBRARIES:
            continue
        if "tokenizer" in value[1].lower() or "scheduler" in value[1].lower() or "processor" in value[1].lower():
            continue
        if value[1].endswith("FeatureExtractor") or value[1].endswith("ImageProcessor"):
            continue
        entries[comp] = (value[0], value[1])
    return entries


def build_on_meta(library: str, class_name: str, config: dict) -> torch.nn.Module:
    """Instantiate a diffusers or transformers model class from its config on the meta device (no memory)."""
    import diffusers
    import transformers

    module = diffusers if library == "diffusers" else transformers
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ArgumentError(f"{library} has no class {class_name!r}; is your {library} too old?")
    if library == "transformers":
        config = cls.config_class(**{k: v for k, v in config.items() if not k.startswith("_")})
    with torch.device("meta"):
        return instantiate(cls, config).eval()


def instantiate(cls: type, config) -> torch.nn.Module:
    """`cls` built from its config, as each library does it: a diffusers `from_config(dict or FrozenDict)`, a
    transformers `cls(PretrainedConfig)`. Weights land on the current default device (meta, under a context)."""
    if cls.__module__.startswith("transformers"):
        return cls(config)
    return cls.from_config(config)


# Config keys that do not change the module built from it. Private keys (`_name_or_path`, `_diffusers_version`,
# `_class_name`, `_use_default_values`, `_commit_hash`) are dropped too. transformers' save_pretrained writes
# `architectures` (into the saved file and the saving model's own config) and the dtype, so without this a
# pipeline saved and loaded again would no longer match its plan.
_NOT_ARCHITECTURE = ("architectures", "transformers_version", "torch_dtype", "dtype")


def config_hash(module: torch.nn.Module) -> str:
    """A short hash of a component's constructor config: the same architecture gives the same hash, and
    save_pretrained -> from_pretrained keeps it."""
    config = getattr(module, "config", None)
    if config is None:
        data = {"class": type(module).__name__, "params": [(n, tuple(p.shape)) for n, p in module.named_parameters()]}
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    else:
        data = dict(config)
    data = {k: v for k, v in data.items() if not k.startswith("_") and k not in _NOT_ARCHITECTURE}
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating tensors to `dtype` except `_keep_in_fp32_modules`, as `from_pretrained(torch_dtype=...)` does."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    is_transformers = type(model).__module__.startswith("transformers")
    if not is_transformers or dtype == torch.float16:  # transformers keeps these in fp32 only for fp16
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        parts = name.split(".")
        target = torch.float32 if any(k in parts for k in keep) else dtype
        tensor.data = tensor.data.to(target)
    return model
