"""Where a plan's model comes from: a zoo name, a diffusers model folder (configs suffice), or a loaded pipeline.

Every source ends as a `PipelineSource`: the pipeline class name, its nn.Module components and a pipeline object to
run (discovery calls its own `__call__`). Zoo and folder components are built from their configs on the `meta`
device, so full-size models cost no memory and no weights; the glue (scheduler, tokenizers, processors) is built
from the folder's files, or, where they are missing, from the class defaults / a stand-in tokenizer (said in
`assumptions`).
"""

from __future__ import annotations

import copy
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
    assumptions: tuple[str, ...] = ()  # stand-ins used for missing files, for the profile to state
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


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of the module's floating parameters hold (fp32-kept layers aside): what it computes in."""
    floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else next(module.parameters()).dtype


def _cast_dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    """Tensor name -> the dtype it computes in, for layers stored in another dtype by diffusers' layerwise
    casting (fp8 storage): the twin carries the compute dtype, as the layer holds it while it runs."""
    found = {}
    for prefix, sub in module.named_modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            for name, _ in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                found[f"{prefix}.{name}" if prefix else name] = hook.compute_dtype
    return found


def _copied_to_meta(module: torch.nn.Module) -> torch.nn.Module:
    """A module without a config (a plain nn.Module component): deep-copied with every tensor replaced by an
    empty meta tensor of its shape and dtype up front, so no weight is copied."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(
            tensor, torch.nn.Parameter) else empty
    return copy.deepcopy(module, memo).eval()


def meta_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` on the meta device: rebuilt from its config (same class, subclasses too), each tensor in
    the dtype it computes in: the original's, or the compute dtype of a layerwise-cast (fp8-stored) layer."""
    config = getattr(module, "config", None)
    if config is None:
        return _copied_to_meta(module)
    with torch.device("meta"):
        twin = instantiate(type(module), config)
    dtypes = {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]} | _cast_dtypes(module)
    for name, tensor in [*twin.named_parameters(), *twin.named_buffers()]:
        if name in dtypes:
            tensor.data = tensor.data.to(dtypes[name])
    return twin.eval()


def _load_folder(path: Path, dtype: str | None, name: str = "") -> PipelineSource:
    index = json.loads((path / "model_index.json").read_text())
    pipeline_class = index["_class_name"]
    defaults = dict(index.get("_memplan_workload", {}))
    chosen, notes = _folder_dtype(path, index, dtype or defaults.get("dtype"))
    torch_dtype = getattr(torch, chosen)
    components = {}
    start = time.perf_counter()
    for comp, (library, class_name) in _module_entries(index).items():
        config_file = path / comp / "config.json"
        if not config_file.is_file():
            raise ArgumentError(f"{config_file} is missing: a model folder needs <component>/config.json")
        config = json.loads(config_file.read_text())
        components[comp] = cast_like_from_pretrained(build_on_meta(library, class_name, config), torch_dtype)
    logger.debug("built %s on meta in %.2fs", path, time.perf_counter() - start)
    from planner.glue import build_pipeline

    pipe, glue_notes = build_pipeline(pipeline_class, index, path, components)
    return PipelineSource(pipeline_class, components, defaults, pipe, name=name or path.name,
                          assumptions=(*notes, *glue_notes), folder=path)


def _folder_dtype(path: Path, index: dict, given: str | None) -> tuple[str, list[str]]:
    """The dtype to build a folder's components in: the one given, else the `torch_dtype` most component configs
    name, else bfloat16 (said in the profile's assumptions)."""
    if given:
        return given, []
    named = []
    for comp in index:
        config_file = path / comp / "config.json"
        if not comp.startswith("_") and config_file.is_file():
            config = json.loads(config_file.read_text())
            named.append(config.get("torch_dtype") or config.get("dtype"))
    named = [d for d in named if d in ("float32", "float16", "bfloat16")]
    if named:
        return max(set(named), key=named.count), []
    return "bfloat16", [f"{path.name}: no dtype in the folder's configs; components built in bfloat16 (pass dtype=)"]


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
