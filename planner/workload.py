"""The workload a plan is made for: image/video size, steps, batch, CFG, text length, dtype."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from planner.errors import WorkloadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    """One pipeline call. `cfg_passes` is how many denoiser calls one step makes (2: separate CFG calls),
    `cfg_batch` how many copies of the batch one denoiser call carries (2: CFG batched)."""

    height: int
    width: int
    num_inference_steps: int
    batch_size: int = 1
    num_frames: int | None = None
    cfg_batch: int = 1
    cfg_passes: int = 1
    max_sequence_length: int = 77
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _validate(dataclasses.asdict(self))

    @property
    def torch_dtype(self):
        """The `torch.dtype` (torch imported here only: the data model itself stays torch-free)."""
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        return cls(**data)


# The default call of each pipeline class (from the diffusers pipelines' own defaults).
# Flux embeds guidance (no CFG batch); SDXL/SD batch CFG into one UNet call; Wan makes two calls.
_DEFAULTS: dict[str, dict] = {
    "FluxPipeline": dict(height=1024, width=1024, num_inference_steps=28, max_sequence_length=512),
    "StableDiffusionXLPipeline": dict(
        height=1024, width=1024, num_inference_steps=50, cfg_batch=2, dtype="float16"
    ),
    "StableDiffusionPipeline": dict(
        height=512, width=512, num_inference_steps=50, cfg_batch=2, dtype="float16"
    ),
    "WanPipeline": dict(
        height=480, width=832, num_frames=81, num_inference_steps=50, cfg_passes=2, max_sequence_length=512
    ),
}
_FALLBACK = dict(height=1024, width=1024, num_inference_steps=30, cfg_batch=2)


def default_workload(pipeline_class: str, **overrides) -> Workload:
    """The pipeline class's default call, with the user's non-None overrides on top."""
    base = _DEFAULTS.get(pipeline_class)
    if base is None:
        logger.warning("no default workload for %s; assuming %s", pipeline_class, _FALLBACK)
        base = _FALLBACK
    fields = dict(base)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return Workload(**fields)


def _validate(fields: dict) -> None:
    for key in ("height", "width", "num_inference_steps", "batch_size", "num_frames", "cfg_batch", "cfg_passes",
                "max_sequence_length"):
        value = fields.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise WorkloadError(f"{key}={value!r} is not valid: give a positive int")
    if fields.get("dtype", "bfloat16") not in ("float32", "float16", "bfloat16"):
        raise WorkloadError(f"dtype={fields.get('dtype')!r} is not valid: give float32, float16 or bfloat16")
