"""The pipeline call a profile is made for: the user's workload knobs as `__call__` arguments, and the workload the
pipeline really ran, read back from what discovery recorded.

Defaults are the pipeline's own: only what the user sets is passed, so `__call__`'s signature defaults apply and
the pipeline sizes the image itself (`default_sample_size × vae_scale_factor`). No table keyed by class.
"""

from __future__ import annotations

import inspect
import logging

from planner.discovery import DENOISE, Discovery
from planner.errors import ArgumentError, WorkloadError
from planner.workload import Workload, split_knobs, validate

logger = logging.getLogger(__name__)

# A prompt of ordinary length; pipelines that pad to the longest prompt (not to a fixed length) size their text
# sequence from it, so it is part of the assumed workload.
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed, sharp focus, golden hour light"
# Workload fields that are the pipeline's arguments of the same name.
_DIRECT = ("height", "width", "num_inference_steps", "num_frames", "max_sequence_length")
_BATCH_ARGS = ("num_images_per_prompt", "num_videos_per_prompt")


def call_parameters(pipeline_cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipeline_cls.__call__).parameters)


def signature_defaults(pipeline_cls: type) -> dict:
    return {n: p.default for n, p in call_parameters(pipeline_cls).items()
            if p.default is not inspect.Parameter.empty}


def workload_knobs(workload: Workload, pipeline_cls: type) -> dict:
    """The knobs of a resolved workload (a plan's) to replay it: the fields this pipeline's call takes (a
    Workload always holds a max_sequence_length, which an SDXL call has no use for), the derived ones aside."""
    params = call_parameters(pipeline_cls)
    knobs = {k: getattr(workload, k) for k in _DIRECT if k in params}
    return {**knobs, "batch_size": workload.batch_size, **workload.pipeline_kwargs}


def call_kwargs(pipeline_cls: type, knobs: dict) -> dict:
    """`__call__` arguments for the user's knobs (None: the pipeline's default). `batch_size` maps to the
    pipeline's images/videos-per-prompt argument. Raises ValueError naming a knob the pipeline does not take."""
    params = call_parameters(pipeline_cls)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    fields, _ = split_knobs(knobs)
    validate(fields)
    kwargs: dict = {}
    batch = knobs.pop("batch_size", 1)
    if batch != 1:
        name = next((n for n in _BATCH_ARGS if n in params), None)
        if name is None:
            raise WorkloadError(f"{pipeline_cls.__name__}.__call__ has no {' or '.join(_BATCH_ARGS)}: batch_size="
                             f"{batch} cannot be passed; leave batch_size at 1")
        kwargs[name] = batch
    for name, value in knobs.items():
        if name not in params:  # a `**kwargs` catch-all would swallow it silently: only named arguments
            known = ", ".join(sorted(n for n in params if n != "self"))
            raise ArgumentError(f"{pipeline_cls.__name__}.__call__ takes no {name!r}: give one of {known}")
        kwargs[name] = value
    if "prompt" in params and "prompt" not in kwargs and "prompt_embeds" not in kwargs:
        kwargs["prompt"] = DEFAULT_PROMPT
    if "output_type" in params and "output_type" not in kwargs:
        kwargs["output_type"] = "pt"  # decoded, but left as a tensor: no conversion of a meta image to PIL
    return kwargs


def _size_from_output(shape: tuple[int, ...] | None) -> dict:
    if shape is None:
        return {}
    if len(shape) == 5:  # video: batch, frames, channels, height, width
        return dict(batch_size=shape[0], num_frames=shape[1], height=shape[3], width=shape[4])
    return dict(batch_size=shape[0], height=shape[-2], width=shape[-1])


def _cfg(found: Discovery, batch: int) -> tuple[int, int]:
    """(cfg_batch, cfg_passes): how many copies of the batch one denoiser call carries, and how many denoiser
    calls one loop step makes, as the trace found them."""
    calls = [c for c in found.calls if c.phase == DENOISE]
    if not calls or not found.loop_steps:
        return 1, 1
    passes = max(1, round(sum(c.count for c in calls) / found.loop_steps))
    widest = max((c.batch or batch) for c in calls)
    return max(1, widest // max(batch, 1)), passes


def resolved_workload(pipeline_cls: type, kwargs: dict, found: Discovery, dtype: str,
                      pipeline_kwargs: dict) -> Workload:
    """The workload the pipeline really ran: its output's size, the steps and text length it was called with
    (or defaulted to), the CFG layout the trace found."""
    defaults = signature_defaults(pipeline_cls)
    size = _size_from_output(found.output_shape)
    batch = size.get("batch_size", 1)
    for name in ("height", "width", "num_frames"):
        size.setdefault(name, kwargs.get(name, defaults.get(name)))
    if size["height"] is None or size["width"] is None:
        raise WorkloadError(f"{pipeline_cls.__name__}: the output's size could not be read from the traced call; "
                         "pass height= and width=")
    cfg_batch, cfg_passes = _cfg(found, batch)
    steps = kwargs.get("num_inference_steps", defaults.get("num_inference_steps")) or found.loop_steps or 1
    text = kwargs.get("max_sequence_length", defaults.get("max_sequence_length")) or Workload.max_sequence_length
    return Workload(height=int(size["height"]), width=int(size["width"]), num_inference_steps=int(steps),
                    batch_size=int(batch), num_frames=size["num_frames"], cfg_batch=cfg_batch, cfg_passes=cfg_passes,
                    max_sequence_length=int(text), dtype=dtype, pipeline_kwargs=dict(pipeline_kwargs))
