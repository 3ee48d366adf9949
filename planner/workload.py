"""The workload a plan is made for: image/video size, steps, batch, CFG, text length, dtype."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from planner.errors import WorkloadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    """One pipeline call, as the pipeline ran it (discovery reads it back from the traced call: the output's size,
    the steps, the CFG layout). `cfg_passes` is how many denoiser calls one step makes (2: separate CFG calls),
    `cfg_batch` how many copies of the batch one denoiser call carries (2: CFG batched); `dtype` is the
    denoiser's compute dtype."""

    height: int
    width: int
    num_inference_steps: int
    batch_size: int = 1
    num_frames: int | None = None
    cfg_batch: int = 1
    cfg_passes: int = 1
    max_sequence_length: int = 77
    dtype: str = "bfloat16"
    # other arguments of the pipeline call the user set (e.g. guidance_scale), passed as given
    pipeline_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate(dataclasses.asdict(self))

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


WORKLOAD_FIELDS = ("height", "width", "num_inference_steps", "batch_size", "num_frames", "max_sequence_length")


def split_knobs(knobs: dict) -> tuple[dict, dict]:
    """(Workload fields, other pipeline arguments) of the user's workload knobs, None values dropped."""
    given = {k: v for k, v in knobs.items() if v is not None}
    return ({k: v for k, v in given.items() if k in WORKLOAD_FIELDS},
            {k: v for k, v in given.items() if k not in WORKLOAD_FIELDS})


def validate(fields: dict) -> None:
    for key in ("height", "width", "num_inference_steps", "batch_size", "num_frames", "cfg_batch", "cfg_passes",
                "max_sequence_length"):
        value = fields.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise WorkloadError(f"{key}={value!r} is not valid: give a positive int")
    if fields.get("dtype", "bfloat16") not in ("float32", "float16", "bfloat16"):
        raise WorkloadError(f"dtype={fields.get('dtype')!r} is not valid: give float32, float16 or bfloat16")
    extra = fields.get("pipeline_kwargs", {})
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise WorkloadError(f"pipeline_kwargs={extra!r} is not valid: give a dict of argument names to values")
