"""What memplan assumes about a GPU: memory, dense bf16 throughput, memory and host-link bandwidths.

Every figure in `GPUS` is a public datasheet/whitepaper number (or one derived from SM count x boost clock,
said so in `source`), not a measurement. The few figures no datasheet gives (efficiency, CUDA context size,
allocator overhead, sync cost) are named defaults on `HardwareSpec`; they stay uncalibrated until
calibrate() replaces them with fitted values and sets `calibrated=True`.

Units are in the field names: bytes, bytes/s, FLOP/s, seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from planner.errors import HardwareError
from planner.schema import check_fields

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU as the cost models see it.

    `bf16_flops` is the dense (no 2:4 sparsity) bf16/fp16 tensor-core peak with FP32 accumulate, because
    that is what cuBLAS runs for torch bf16/fp16 matmuls. GeForce cards do FP32 accumulate at half the
    FP16-accumulate rate, so their figure is half the one on the box.

    `source` comes before the defaulted fields only because a dataclass needs fields without defaults first.
    """

    name: str
    vram_bytes: int
    bf16_flops: float
    mem_bytes_per_s: float
    pcie_gen: int
    h2d_pinned_bytes_per_s: float
    h2d_pageable_bytes_per_s: float
    d2h_bytes_per_s: float
    fp8: bool
    source: str
    # --- constants no datasheet gives: defaults below, replaced per GPU by cost_models/fitted.json (fitted on
    # published measurements by `python -m benchmarks.fit`, with the row ids) or by calibrate() on the card.
    # Fractions of the dtype's peak FLOP/s that each kernel family reaches (roofline compute): cuBLAS GEMMs,
    # flash / memory-efficient attention, cuDNN convolutions (VAEs in NCHW reach far less than GEMMs).
    compute_efficiency: float = 0.6
    attention_efficiency: float = 0.4
    conv_efficiency: float = 0.3
    # Fraction of the datasheet memory bandwidth that memory-bound kernels (elementwise, norms, copies) reach.
    mem_efficiency: float = 0.7
    # Floor of one kernel launch in eager PyTorch: the CPU-side dispatch (Python, ATen, CUDA launch) that a
    # kernel shorter than it cannot hide. 5-20 us on current CPUs.
    launch_s: float = 10e-6
    # Memory the torch caching allocator never sees: the CUDA context itself, loaded kernel images
    # (torch + cuBLAS + cuDNN fatbins, fewer with lazy module loading) and the libraries' handle state.
    # nvidia-smi minus torch.cuda.memory_reserved() is typically 300-600 MiB on recent drivers;
    # 600 MiB is the upper end, so plans err towards fitting.
    context_bytes: int = 600 * 2**20
    # torch.cuda.memory_reserved() / memory_allocated() at peak. Above 1 because the caching allocator
    # rounds requests up (512 B blocks, 2 MiB segments for small tensors, 2 MiB-rounded large segments)
    # and split blocks leave free tails that later, larger tensors cannot use (fragmentation).
    # Inference runs usually land at 1.05-1.2.
    reserved_over_allocated: float = 1.10
    # One diffusers offload group's onload beyond bytes / bandwidth, per group per call: the hook's Python,
    # one `.to()` per tensor, and the stream / event synchronisations around it.
    sync_s: float = 30e-6
    # One accelerate AlignDevicesHook move (sequential CPU offload), per module with weights per call:
    # set_module_tensor_to_device per tensor, in Python.
    module_hook_s: float = 200e-6
    # Pinning on each onload (low_cpu_mem_usage=True, and disk offload with streams): tensor.pin_memory(), a
    # host copy into page-locked memory, on the CPU thread before the copy is issued.
    pin_bytes_per_s: float = 5e9
    # offload_to_disk reads of files the OS page cache holds (every call after the first, when host RAM holds
    # the files): safetensors' load_file, a host memcpy.
    page_cache_bytes_per_s: float = 10e9
    # offload_to_disk reads from the disk itself (cold page cache): a mid-range NVMe through the filesystem.
    disk_read_bytes_per_s: float = 2e9
    # Dense fp32 FLOP/s on CUDA cores (fp32 matmuls and attention; torch leaves TF32 off for matmuls). None:
    # half the bf16 figure, which is the GeForce datasheet ratio (RTX 3090/4090/5090); data-centre cards differ
    # and get their datasheet figure from cost_models/fitted.json.
    fp32_flops: float | None = None
    # calibration rows the fitted constants of this spec came from (empty: defaults or calibrate())
    fitted_from: tuple[str, ...] = ()
    calibrated: bool = False

    def __post_init__(self) -> None:
        # Catch a hand-written or corrupted JSON spec here rather than as a nonsense plan later.
        positive = ("vram_bytes", "bf16_flops", "mem_bytes_per_s", "h2d_pinned_bytes_per_s",
                    "h2d_pageable_bytes_per_s", "d2h_bytes_per_s", "disk_read_bytes_per_s")
        bad = [f for f in positive if not getattr(self, f) > 0]
        if bad:
            raise HardwareError(f"HardwareSpec {self.name!r}: {', '.join(bad)} must be > 0")
        for frac in ("compute_efficiency", "attention_efficiency", "conv_efficiency", "mem_efficiency"):
            if not 0 < getattr(self, frac) <= 1:
                raise HardwareError(f"HardwareSpec {self.name!r}: {frac} must be in (0, 1], got {getattr(self, frac)}")
        rates = ("launch_s", "sync_s", "module_hook_s", "pin_bytes_per_s", "page_cache_bytes_per_s")
        bad = [f for f in rates if not getattr(self, f) >= 0] + (
            ["fp32_flops"] if self.fp32_flops is not None and not self.fp32_flops > 0 else [])
        if bad:
            raise HardwareError(f"HardwareSpec {self.name!r}: {', '.join(bad)} must be >= 0 (fp32_flops > 0 or null)")
        if self.reserved_over_allocated < 1:
            raise HardwareError(f"HardwareSpec {self.name!r}: reserved_over_allocated must be >= 1, "
                                f"got {self.reserved_over_allocated}")
        if not 0 <= self.context_bytes < self.vram_bytes:
            raise HardwareError(f"HardwareSpec {self.name!r}: context_bytes must be in [0, vram_bytes)")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fitted_from": list(self.fitted_from)}  # as JSON reads it back

    @classmethod
    def from_dict(cls, data: dict, where: str = "HardwareSpec") -> HardwareSpec:
        """Build a spec from `to_dict()` output. Unknown keys, missing required keys and values of the wrong type
        are errors naming `where`; defaulted fields may be left out and take their stated defaults."""
        check_fields(where, data, cls, HardwareError)
        if "fitted_from" in data:  # a JSON list; the spec is frozen, so a tuple
            data = {**data, "fitted_from": tuple(data["fitted_from"])}
        try:
            return cls(**data)
        except HardwareError as err:
            raise HardwareError(f"{where}: {err}") from err

    @property
    def fp32_peak_flops(self) -> float:
        return self.fp32_flops if self.fp32_flops is not None else self.bf16_flops / 2


# Realistic pinned host->device copy rates (bandwidthTest-style), well below the raw link rate because of
# PCIe packet/protocol overhead. Gen4 x8 (RTX 4060 / 4060 Ti) has the raw rate of Gen3 x16.
_PINNED_BY_LINK: dict[tuple[int, int], float] = {
    (3, 16): 12e9,
    (4, 8): 12e9,
    (4, 16): 25e9,
    (5, 16): 50e9,
}
# Pageable copies go through a driver staging buffer (an extra host memcpy), typically 40-60% of pinned.
_PAGEABLE_FRACTION = 0.5


def _gpu(name: str, *, vram_gib: float, bf16_tflops: float, mem_gb_per_s: float, pcie: tuple[int, int],
         fp8: bool, source: str) -> HardwareSpec:
    """Table row in datasheet units; derives the host-link rates from the PCIe generation and width."""
    pinned = _PINNED_BY_LINK[pcie]
    return HardwareSpec(
        name=name,
        vram_bytes=int(vram_gib * 2**30),
        bf16_flops=bf16_tflops * 1e12,
        mem_bytes_per_s=mem_gb_per_s * 1e9,
        pcie_gen=pcie[0],
        h2d_pinned_bytes_per_s=pinned,
        h2d_pageable_bytes_per_s=pinned * _PAGEABLE_FRACTION,
        # bandwidthTest reports device->host within a few percent of pinned host->device on these links.
        d2h_bytes_per_s=pinned,
        fp8=fp8,
        source=source,
    )


# VRAM convention: the "GB" NVIDIA sells is taken as GiB (24 GB -> 24 * 2**30), which is what the chips
# hold; nvidia-smi shows a little less (ECC/driver reservations), e.g. 81559 MiB on an H100 80GB.
# H200 "141 GB" is likewise 141 GiB (nvidia-smi: 143771 MiB), B200 "180 GB" 180 GiB (nvidia-smi: 183359 MiB).
# Keys are stable (plans, studies and calibration rows name them); every spelling people use for a card, torch's
# device names included, resolves to its key in cost_models/gpu_names.py.
# GeForce FLOPs marked "derived" are SM count x boost clock x 512 FLOP/clk/SM (half-rate FP32 accumulate),
# which reproduces the whitepaper figures for the 3090, 4080 and 4090.
GPUS: dict[str, HardwareSpec] = {
    spec.name: spec
    for spec in (
        # --- Turing GeForce (no bf16 tensor cores, no fp8) ---
        _gpu("rtx-2080-ti", vram_gib=11, bf16_tflops=53.8, mem_gb_per_s=616, pcie=(3, 16), fp8=False,
             source="NVIDIA Turing whitepaper: RTX 2080 Ti (reference, 68 SM, 1545 MHz boost) FP16 tensor w/ FP32 "
                    "acc 53.8 TFLOPS (Turing has NO bf16 tensor cores: plan fp16); 616 GB/s GDDR6; PCIe 3.0 x16"),
        # --- Ampere GeForce (no fp8) ---
        _gpu("rtx-3060-12gb", vram_gib=12, bf16_tflops=25.5, mem_gb_per_s=360, pcie=(4, 16), fp8=False,
             source="NVIDIA RTX 3060 12GB specs (28 SM, 1777 MHz boost, 192-bit 15 Gbps); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 4.0 x16"),
        _gpu("rtx-3080", vram_gib=10, bf16_tflops=59.5, mem_gb_per_s=760, pcie=(4, 16), fp8=False,
             source="NVIDIA Ampere GA102 whitepaper: RTX 3080 10GB dense FP16/BF16 w/ FP32 acc 59.5 TFLOPS "
                    "(68 SM, 1710 MHz boost); 760 GB/s GDDR6X; PCIe 4.0 x16"),
        _gpu("rtx-3080-ti", vram_gib=12, bf16_tflops=68.2, mem_gb_per_s=912, pcie=(4, 16), fp8=False,
             source="NVIDIA RTX 3080 Ti specs (80 SM, 1665 MHz boost, 384-bit 19 Gbps); dense FP16/BF16 "
                    "w/ FP32 acc derived; 912 GB/s GDDR6X; PCIe 4.0 x16"),
        _gpu("rtx-3090", vram_gib=24, bf16_tflops=71, mem_gb_per_s=936.2, pcie=(4, 16), fp8=False,
             source="NVIDIA Ampere GA102 whitepaper: RTX 3090 dense FP16/BF16 w/ FP32 acc 71 TFLOPS; "
                    "936 GB/s GDDR6X; PCIe 4.0 x16"),
        # --- Ada GeForce (fp8 tensor cores) ---
        _gpu("rtx-4060-8gb", vram_gib=8, bf16_tflops=30.2, mem_gb_per_s=272, pcie=(4, 8), fp8=True,
             source="NVIDIA RTX 4060 specs (24 SM, 2460 MHz boost, 128-bit 17 Gbps); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 4.0 x8"),
        _gpu("rtx-4060-ti-8gb", vram_gib=8, bf16_tflops=44.1, mem_gb_per_s=288, pcie=(4, 8), fp8=True,
             source="NVIDIA RTX 4060 Ti 8GB specs (34 SM, 2535 MHz boost, 128-bit 18 Gbps); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 4.0 x8"),
        _gpu("rtx-4060-ti-16gb", vram_gib=16, bf16_tflops=44.1, mem_gb_per_s=288, pcie=(4, 8), fp8=True,
             source="NVIDIA RTX 4060 Ti 16GB specs (34 SM, 2535 MHz boost, 128-bit 18 Gbps); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 4.0 x8"),
        _gpu("rtx-4070-12gb", vram_gib=12, bf16_tflops=58.3, mem_gb_per_s=504.2, pcie=(4, 16), fp8=True,
             source="NVIDIA RTX 4070 specs (46 SM, 2475 MHz boost, 192-bit 21 Gbps); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 4.0 x16"),
        _gpu("rtx-4070-ti-super", vram_gib=16, bf16_tflops=88.2, mem_gb_per_s=672, pcie=(4, 16), fp8=True,
             source="NVIDIA RTX 4070 Ti SUPER specs (66 SM, 2610 MHz boost, 256-bit 21 Gbps); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 4.0 x16"),
        _gpu("rtx-4080", vram_gib=16, bf16_tflops=97.5, mem_gb_per_s=716.8, pcie=(4, 16), fp8=True,
             source="NVIDIA Ada whitepaper: RTX 4080 16GB dense FP16/BF16 w/ FP32 acc 97.5 TFLOPS; "
                    "716.8 GB/s GDDR6X; PCIe 4.0 x16"),
        _gpu("rtx-4080-super", vram_gib=16, bf16_tflops=104.4, mem_gb_per_s=736, pcie=(4, 16), fp8=True,
             source="NVIDIA RTX 4080 SUPER specs (80 SM, 2550 MHz boost, 256-bit 23 Gbps); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 4.0 x16"),
        _gpu("rtx-4090", vram_gib=24, bf16_tflops=165.2, mem_gb_per_s=1008, pcie=(4, 16), fp8=True,
             source="NVIDIA Ada whitepaper: RTX 4090 dense FP16/BF16 w/ FP32 acc 165.2 TFLOPS; "
                    "1008 GB/s GDDR6X; PCIe 4.0 x16"),
        # --- Blackwell GeForce ---
        _gpu("rtx-5070-ti", vram_gib=16, bf16_tflops=87.9, mem_gb_per_s=896, pcie=(5, 16), fp8=True,
             source="NVIDIA RTX 5070 Ti specs (70 SM, 2452 MHz boost, 256-bit 28 Gbps GDDR7); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 5.0 x16"),
        _gpu("rtx-5080", vram_gib=16, bf16_tflops=112.6, mem_gb_per_s=960, pcie=(5, 16), fp8=True,
             source="NVIDIA RTX 5080 specs (84 SM, 2617 MHz boost, 256-bit 30 Gbps GDDR7); dense FP16/BF16 "
                    "w/ FP32 acc derived; PCIe 5.0 x16"),
        _gpu("rtx-5090", vram_gib=32, bf16_tflops=209.5, mem_gb_per_s=1792, pcie=(5, 16), fp8=True,
             source="NVIDIA Blackwell GeForce specs: RTX 5090 dense FP16/BF16 w/ FP32 acc 209.5 TFLOPS "
                    "(170 SM, 2407 MHz boost); 1792 GB/s GDDR7; PCIe 5.0 x16"),
        # --- Workstation cards (full-rate FP32 accumulate) ---
        _gpu("rtx-a6000", vram_gib=48, bf16_tflops=154.8, mem_gb_per_s=768, pcie=(4, 16), fp8=False,
             source="NVIDIA RTX A6000 datasheet: tensor 309.7 TFLOPS with sparsity -> 154.8 dense FP16/BF16 "
                    "(84 SM, 1800 MHz boost); 48GB GDDR6 768 GB/s; PCIe 4.0 x16"),
        _gpu("rtx-6000-ada", vram_gib=48, bf16_tflops=364.2, mem_gb_per_s=960, pcie=(4, 16), fp8=True,
             source="NVIDIA RTX 6000 Ada datasheet: 1457 TFLOPS FP8 tensor with sparsity -> 364.2 dense "
                    "FP16/BF16 (142 SM, 2505 MHz boost); 48GB GDDR6 960 GB/s; PCIe 4.0 x16"),
        # --- Data-centre / cloud inference cards (full-rate FP32 accumulate) ---
        _gpu("t4", vram_gib=16, bf16_tflops=65, mem_gb_per_s=320, pcie=(3, 16), fp8=False,
             source="NVIDIA T4 datasheet: 65 TFLOPS FP16 mixed precision (Turing has NO bf16 tensor cores: "
                    "bf16 runs far slower, plan fp16 on T4); 320 GB/s GDDR6; PCIe 3.0 x16"),
        _gpu("a10g", vram_gib=24, bf16_tflops=70, mem_gb_per_s=600, pcie=(4, 16), fp8=False,
             source="AWS G5 A10G: ~70 TFLOPS dense BF16 (approximate; AWS-only part without an NVIDIA "
                    "datasheet, the A10 is 125); 600 GB/s GDDR6; PCIe 4.0 x16"),
        _gpu("l4", vram_gib=24, bf16_tflops=121, mem_gb_per_s=300, pcie=(4, 16), fp8=True,
             source="NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity -> 121 dense; 300 GB/s GDDR6; "
                    "PCIe 4.0 x16"),
        _gpu("l20", vram_gib=48, bf16_tflops=119.5, mem_gb_per_s=864, pcie=(4, 16), fp8=True,
             source="NVIDIA L20 product brief: FP16/BF16 tensor 119.5 TFLOPS dense (239 with sparsity; the tensor "
                    "rate is cut below the L40S's on this export part); 48GB GDDR6 864 GB/s; PCIe 4.0 x16"),
        _gpu("l40s", vram_gib=48, bf16_tflops=362.05, mem_gb_per_s=864, pcie=(4, 16), fp8=True,
             source="NVIDIA L40S datasheet: BF16 tensor 362.05 TFLOPS dense (733 with sparsity); 48GB GDDR6 "
                    "864 GB/s; PCIe 4.0 x16"),
        _gpu("a100-40gb", vram_gib=40, bf16_tflops=312, mem_gb_per_s=1555, pcie=(4, 16), fp8=False,
             source="NVIDIA A100 datasheet: BF16 312 TFLOPS dense; 40GB HBM2 1555 GB/s; PCIe 4.0 host link"),
        _gpu("a100-80gb", vram_gib=80, bf16_tflops=312, mem_gb_per_s=2039, pcie=(4, 16), fp8=False,
             source="NVIDIA A100 datasheet: BF16 312 TFLOPS dense; 80GB HBM2e 2039 GB/s (SXM; PCIe card "
                    "1935 GB/s); PCIe 4.0 host link"),
        _gpu("a100-pcie-80gb", vram_gib=80, bf16_tflops=312, mem_gb_per_s=1935, pcie=(4, 16), fp8=False,
             source="NVIDIA A100 datasheet: A100 80GB PCIe BF16 312 TFLOPS dense; HBM2e 1935 GB/s; PCIe 4.0 x16"),
        _gpu("h100", vram_gib=80, bf16_tflops=989, mem_gb_per_s=3350, pcie=(5, 16), fp8=True,
             source="NVIDIA H100 SXM5 80GB datasheet: BF16 1979 TFLOPS with sparsity -> 989 dense; "
                    "HBM3 3.35 TB/s; PCIe 5.0 host link"),
        _gpu("h100-pcie", vram_gib=80, bf16_tflops=756, mem_gb_per_s=2000, pcie=(5, 16), fp8=True,
             source="NVIDIA H100 PCIe 80GB datasheet: BF16 1513 TFLOPS with sparsity -> 756 dense; "
                    "HBM2e 2.0 TB/s; PCIe 5.0 x16"),
        _gpu("h200", vram_gib=141, bf16_tflops=989, mem_gb_per_s=4800, pcie=(5, 16), fp8=True,
             source="NVIDIA H200 SXM datasheet: BF16 1979 TFLOPS with sparsity -> 989 dense; "
                    "141GB HBM3e 4.8 TB/s; PCIe 5.0 host link"),
        _gpu("b200", vram_gib=180, bf16_tflops=2250, mem_gb_per_s=8000, pcie=(5, 16), fp8=True,
             source="NVIDIA HGX/DGX B200 specs per GPU (8-GPU totals / 8): FP16/BF16 tensor 4.5 PFLOPS with "
                    "sparsity -> 2250 dense; 180GB HBM3e 8 TB/s; the chip's PCIe Gen6 link runs at Gen5 x16 on "
                    "the Gen5 host CPUs of HGX B200 servers"),
    )
}


def _load_json_spec(path: Path) -> HardwareSpec:
    logger.debug("loading hardware spec from %s", path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise HardwareError(f"cannot read hardware spec file {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise HardwareError(f"hardware spec file {path} is not UTF-8 text (byte {err.start}); "
                            "write it with save_spec()") from err
    except RecursionError as err:
        raise HardwareError(f"hardware spec file {path}: its JSON is nested too deeply to be a spec") from err
    except ValueError as err:  # JSONDecodeError, and ints longer than Python's digit limit
        raise HardwareError(f"hardware spec file {path} is not valid JSON: {err}") from err
    return HardwareSpec.from_dict(data, where=f"hardware spec file {path}")


def get_gpu(spec: str | os.PathLike | HardwareSpec | None) -> HardwareSpec:
    """Resolve `spec` to a HardwareSpec: a spec as is, the path of a .json file written by save_spec(), or any
    common name of a card in the table ("rtx-4090", "NVIDIA GeForce RTX 4090", "4090", "h100-sxm": see
    cost_models/gpu_names.py); an unknown name is a HardwareError suggesting the nearest ones."""
    from cost_models.gpu_names import lookup

    if spec is None:
        raise HardwareError("no GPU given: pass gpu=<name> (`memplan gpus` lists them, e.g. 'rtx-4090' or "
                            "'NVIDIA GeForce RTX 4090') or gpu=<path to a .json spec>")
    if isinstance(spec, HardwareSpec):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise HardwareError(f"GPU {spec!r} ({type(spec).__name__}) is not understood: give a name (`memplan gpus` "
                            "lists them), the path of a .json spec, or a HardwareSpec")
    text = os.fspath(spec)
    if text.lower().endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise HardwareError(f"hardware spec file {text!r} does not exist")
        return _load_json_spec(path)
    return GPUS[lookup(text)]


def save_spec(spec: HardwareSpec, path: str | os.PathLike) -> None:
    """Write `spec` as JSON that get_gpu(path) reads back."""
    Path(path).write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- fitted constants overlay

FITTED_PATH = Path(__file__).with_name("fitted.json")


def with_fitted(specs: dict[str, HardwareSpec], path: Path = FITTED_PATH) -> dict[str, HardwareSpec]:
    """The table with the constants of `path` (written by `python -m benchmarks.fit`) laid over it.

    Per GPU: `datasheet` figures no table column holds (fp32 FLOP/s), then `gpus[name].constants` fitted on the
    published rows `gpus[name].rows`; a GPU without rows gets `default.constants` (what does not depend on the
    card: kernel efficiencies, launch and hook costs, taken from the fitted GPUs) and keeps its datasheet-derived
    link rates. Entries are left as they are when the file is missing."""
    if not path.is_file():
        return dict(specs)
    data = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for name, spec in specs.items():
        fitted = data.get("gpus", {}).get(name)
        constants = {**data.get("datasheet", {}).get(name, {}),
                     **(fitted or data.get("default", {"constants": {}}))["constants"]}
        out[name] = dataclasses.replace(spec, **constants, fitted_from=tuple(fitted["rows"]) if fitted else ())
    return out


DATASHEET_GPUS: dict[str, HardwareSpec] = dict(GPUS)  # the table alone, before fitted constants
GPUS = with_fitted(DATASHEET_GPUS)
