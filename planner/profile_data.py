"""The profile as plain data: what each component weighs, how diffusers would split it, what each call costs.

No torch and no diffusers here: the cost models, the search and the CLI price a saved profile without importing
either. `planner.profiler` fills these records (on `meta` or on a device); `cost_models` only reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planner.workload import Workload

# 9: per-call records from discovery (issue 10), blocks/block lists by FQN as planner.grouping lays them out,
# the VAE upcast bytes and load-time shard sizes; 10: bytes in and out per call (CallProfile.io_bytes)
PROFILE_VERSION = 10
CALL_PHASES = ("encode", "denoise", "decode")  # before, inside and after the denoising loop


@dataclass(frozen=True)
class OpStat:
    """Identical ops of one traced call, aggregated: the input of a per-op roofline."""

    kind: str  # matmul | attention | conv | other (memory-bound: elementwise, norms, copies)
    dtype: str  # dtype of the op's floating inputs, e.g. "bfloat16"
    count: int  # kernel launches with exactly this (kind, dtype, flops, bytes_moved)
    flops: float  # per launch
    bytes_moved: int  # per launch: bytes of tensor inputs read plus outputs written


@dataclass(frozen=True)
class CallProfile:
    """One distinct call of one method of a component, as the pipeline makes it."""

    method: str  # forward | encode | decode | ... (the method the pipeline called)
    phase: str  # one of CALL_PHASES
    calls_per_run: int  # per pipeline call at the planned workload (steps extrapolated)
    args: str  # the arguments' shapes and dtypes, for humans
    activation_peak_bytes: int  # traced peak allocated by the call beyond weights and inputs
    activation_peak_module: str
    flops: float  # per call
    ops: tuple[OpStat, ...] = ()
    variant: str = ""  # "" the plain call; "tiled" / "sliced" for a VAE's tiled or sliced variant of it
    io_bytes: int = 0  # tensor bytes passed in plus returned: what crosses cards when the caller sits elsewhere

    def __post_init__(self) -> None:
        if self.phase not in CALL_PHASES:
            raise ValueError(f"CallProfile {self.method!r}: phase {self.phase!r} is not one of {CALL_PHASES}")

    @classmethod
    def from_dict(cls, data: dict) -> "CallProfile":
        fields = dict(data)
        fields["ops"] = tuple(OpStat(**op) for op in fields.get("ops", ()))
        return cls(**fields)


@dataclass(frozen=True)
class Unit:
    """A set of weights moved together by group offloading: one block, or the unmatched remainder."""

    name: str
    n_bytes: int
    fp8_saving_bytes: int  # how many of n_bytes fp8 storage would save
    flops: float = 0.0  # per call
    measured_s: float | None = None  # per call, device backend only


@dataclass(frozen=True)
class ComponentProfile:
    name: str
    class_name: str
    config_hash: str
    role: str  # the phase it works in (discovery): text_encoder | denoiser | vae | unused | untraced
    param_bytes_by_dtype: dict[str, int]
    buffer_bytes: int
    fp8_saving_bytes: int
    block_lists: dict[str, int]  # FQN of each block list (planner.grouping) -> number of blocks
    blocks: tuple[Unit, ...]  # in call order
    unmatched: Unit
    leaf_count: int
    largest_leaf_bytes: int
    largest_fp8_leaf_bytes: int  # compute-dtype bytes of the largest fp8-eligible layer (the upcast buffer)
    calls_per_run: int
    activation_peak_bytes: int
    activation_peak_module: str
    flops_per_call: float
    activations_known: bool = True
    tiled_activation_peak_bytes: int | None = None
    tiled_flops_per_call: float | None = None
    sliced_activation_peak_bytes: int | None = None
    supports_tiling: bool = False
    supports_slicing: bool = False
    # diffusers models only: their `.dtype` reports the compute dtype under layerwise casting; transformers
    # encoders would report fp8 and the pipeline would build its tensors in fp8.
    supports_layerwise_casting: bool = False
    # offload types whose groups would split a tied parameter: disk offload then corrupts it (diffusers 0.42)
    disk_unsafe_offload_types: tuple[str, ...] = ()
    # device backend: one real call's seconds, and the device it ran on (the cost model uses them on that device)
    measured_call_s: float | None = None
    measured_on: str | None = None
    # every distinct call the pipeline makes of this component (discovery); () on profiles made before it
    calls: tuple[CallProfile, ...] = ()
    # loading (planner/loading.py, from the source's files): the largest checkpoint shard and where it was read
    largest_shard_bytes: int | None = None
    shard_source: str | None = None

    @property
    def load_peak_bytes(self) -> int | None:
        """Host RAM while from_pretrained loads this component: its weights + the shard being read (a bound)."""
        return None if self.largest_shard_bytes is None else self.total_bytes + self.largest_shard_bytes

    # extra weight bytes on the device while the pipeline runs the component upcast (SDXL decodes its fp16 VAE
    # in fp32 when the VAE's config says force_upcast: the fp32 copy is twice the fp16 bytes)
    upcast_weight_bytes: int = 0

    @property
    def param_bytes(self) -> int:
        return sum(self.param_bytes_by_dtype.values())

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes

    @property
    def has_blocks(self) -> bool:
        return bool(self.blocks)

    @property
    def max_blocks(self) -> int:
        return max(self.block_lists.values(), default=0)


@dataclass(frozen=True)
class Profile:
    pipeline_class: str
    source_name: str
    workload: Workload
    components: dict[str, ComponentProfile]
    backend: str = "meta"
    version: int = PROFILE_VERSION
    # what the profile assumed, for humans: stand-in tokenizers, values read as zero, untraced components
    assumptions: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        comps = {}
        for name, c in data["components"].items():
            c = dict(c)
            c["blocks"] = tuple(Unit(**u) for u in c["blocks"])
            c["unmatched"] = Unit(**c["unmatched"])
            c["disk_unsafe_offload_types"] = tuple(c.get("disk_unsafe_offload_types", ()))
            c["calls"] = tuple(CallProfile.from_dict(call) for call in c.get("calls", ()))
            comps[name] = ComponentProfile(**c)
        return cls(data["pipeline_class"], data["source_name"], Workload.from_dict(data["workload"]), comps,
                   data.get("backend", "meta"), data.get("version", PROFILE_VERSION),
                   tuple(data.get("assumptions", ())))
