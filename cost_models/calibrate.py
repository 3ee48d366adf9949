"""calibrate(): measure the CUDA GPU this process sees and return a HardwareSpec fitted to it.

What is measured, and which HardwareSpec field it sets:
    H2D pinned / pageable, D2H     256 MiB copies, best of REPEATS   h2d_pinned/pageable_bytes_per_s, d2h_bytes_per_s
    pinning                        pin_memory() of 256 MiB            pin_bytes_per_s
    device memory                  256 MiB device-to-device copy      mem_bytes_per_s (read + write), mem_efficiency=1
    dense bf16 GEMM                8192^3 matmul                      compute_efficiency (bf16_flops for an unknown card)
    attention                      scaled_dot_product_attention      attention_efficiency
    launch floor                   LAUNCHES tiny adds, back to back   launch_s
    CUDA context + library state   mem_get_info - memory_reserved     context_bytes
    card memory                    get_device_properties             vram_bytes
The table entry of the same card (matched by device name) supplies what is not measured: the datasheet bf16
peak, the PCIe generation, fp8 support, and its fitted constants (conv efficiency, offload overheads). Nothing here runs on import; only calibrate() touches the GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from cost_models.gpu_names import match
from cost_models.hardware import GPUS, HardwareSpec, save_spec

logger = logging.getLogger(__name__)

__all__ = ["Measurements", "calibrate", "measure", "save_spec", "spec_from_measurements", "table_entry"]

COPY_BYTES = 256 * 2**20
MATMUL_N = 8192
# Flux-dev at 1024x1024: 24 heads of 128 dims over 4096 image + 512 text tokens.
ATTENTION_SHAPE = (1, 24, 4608, 128)  # batch, heads, tokens, head dim
WARMUP, REPEATS = 2, 5
LAUNCHES = 1000
# For a card not in the table: the PCIe generation guessed from the measured pinned H2D rate (bytes/s), against
# the realistic rates of hardware._PINNED_BY_LINK (Gen3 x16 ~12, Gen4 x16 ~25, Gen5 x16 ~50 GB/s).
PCIE_GEN_BY_PINNED_RATE = ((40e9, 5), (18e9, 4), (0.0, 3))
# fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
FP8_COMPUTE_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Measurements:
    """What calibrate() measured on one card. Units in the names; FLOP/s are achieved, not peak."""

    device_name: str
    total_bytes: int
    h2d_pinned_bytes_per_s: float
    h2d_pageable_bytes_per_s: float
    d2h_bytes_per_s: float
    mem_bytes_per_s: float
    matmul_flops: float
    attention_flops: float
    context_bytes: int
    fp8_capable: bool
    launch_s: float | None = None  # one tiny kernel launched from Python, back to back
    pin_bytes_per_s: float | None = None  # tensor.pin_memory() of a pageable tensor


# ---------------------------------------------------------------- pure: table lookup and spec

def table_entry(device_name: str, total_bytes: int) -> HardwareSpec | None:
    """The GPUS entry for `device_name` (as torch.cuda.get_device_name gives it) holding `total_bytes`, or None.
    The one name matcher of memplan (cost_models.gpu_names.match) decides."""
    key = match(device_name, total_bytes)
    return GPUS[key] if key else None


def _pcie_gen_guess(pinned_bytes_per_s: float) -> int:
    return next(gen for rate, gen in PCIE_GEN_BY_PINNED_RATE if pinned_bytes_per_s >= rate)


def spec_from_measurements(m: Measurements, name: str) -> HardwareSpec:
    """A calibrated HardwareSpec: measured figures where measured, the table entry's elsewhere (its datasheet
    figures and its fitted constants, see cost_models/fitted.json), or a guess for a card not in the table.

    compute_efficiency = GEMM rate / bf16 peak and attention_efficiency = attention rate / bf16 peak, where the
    peak is the datasheet figure for a card in the table and the measured GEMM rate otherwise (capped at 1 for
    cards running above their datasheet). mem_bytes_per_s is the measured device copy rate, which is already an
    achieved rate: mem_efficiency becomes 1. Measured seconds take precedence over fitted ones."""
    table = table_entry(m.device_name, m.total_bytes)
    peak = table.bf16_flops if table else m.matmul_flops
    measured = dict(
        name=name, vram_bytes=m.total_bytes, bf16_flops=peak, mem_bytes_per_s=m.mem_bytes_per_s,
        pcie_gen=table.pcie_gen if table else _pcie_gen_guess(m.h2d_pinned_bytes_per_s),
        h2d_pinned_bytes_per_s=m.h2d_pinned_bytes_per_s, h2d_pageable_bytes_per_s=m.h2d_pageable_bytes_per_s,
        d2h_bytes_per_s=m.d2h_bytes_per_s, fp8=table.fp8 if table else m.fp8_capable,
        source=f"calibrate() on {m.device_name}", compute_efficiency=min(1.0, m.matmul_flops / peak),
        attention_efficiency=min(1.0, m.attention_flops / peak), mem_efficiency=1.0,
        context_bytes=m.context_bytes, calibrated=True, fitted_from=(),
    )
    if m.launch_s is not None:
        measured["launch_s"] = m.launch_s
    if m.pin_bytes_per_s is not None:
        measured["pin_bytes_per_s"] = m.pin_bytes_per_s
    return dataclasses.replace(table, **measured) if table else HardwareSpec(**measured)


# ---------------------------------------------------------------- CUDA: the measurements

def _cuda_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type != "cuda":
        raise RuntimeError(f"calibrate() needs a CUDA GPU: device {str(device)!r} is not a CUDA device; "
                           "pass device='cuda' (or 'cuda:1', ...)")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"calibrate() needs a CUDA GPU, and torch.cuda.is_available() is False here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}). Run it on the machine with the card to plan for, or use a table "
            f"entry: get_gpu(name), names: {', '.join(GPUS)}")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def _best_s(fn: Callable[[], object], dev: torch.device) -> float:
    """Best of REPEATS runs of `fn`, timed by CUDA events on the current stream of `dev` (after WARMUP runs).
    The device is synchronized before each run so that a run starts on an idle stream; a host-synchronous
    pageable copy is bracketed too, since the end event is only enqueued once the copy call returns."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)  # ms -> s
    return min(times)


def _copy_rates(dev: torch.device) -> dict[str, float]:
    """Host<->device rates. D2H is `.to("cpu")` into a fresh pageable tensor, because that is the copy every
    D2H term of the time model prices (model offload and group offload without streams)."""
    n = COPY_BYTES
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.ones(n, dtype=torch.uint8)  # written, so its pages exist before timing
    on_device = torch.empty(n, dtype=torch.uint8, device=dev)
    other = torch.empty_like(on_device)
    rates = {
        "h2d_pinned_bytes_per_s": n / _best_s(lambda: on_device.copy_(pinned, non_blocking=True), dev),
        "h2d_pageable_bytes_per_s": n / _best_s(lambda: on_device.copy_(pageable), dev),
        "d2h_bytes_per_s": n / _best_s(lambda: on_device.to("cpu"), dev),
        "mem_bytes_per_s": 2 * n / _best_s(lambda: other.copy_(on_device), dev),  # each byte read and written
    }
    return rates


def _pin_rate(dev: torch.device) -> float:
    """pin_memory() of a written pageable tensor: what low_cpu_mem_usage pays on every onload (host work)."""
    import time

    pageable = torch.ones(COPY_BYTES, dtype=torch.uint8)
    best = float("inf")
    for _ in range(WARMUP + REPEATS):
        start = time.perf_counter()
        pageable.pin_memory()
        best = min(best, time.perf_counter() - start)
    return COPY_BYTES / best


def _launch_s(dev: torch.device) -> float:
    """Seconds per launch of a tiny kernel issued from Python back to back: the eager-mode floor."""
    x = torch.zeros(16, device=dev)
    return _best_s(lambda: [x.add_(1) for _ in range(LAUNCHES)], dev) / LAUNCHES


def _matmul_flops(dev: torch.device) -> float:
    a = torch.randn(MATMUL_N, MATMUL_N, device=dev, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * MATMUL_N**3 / _best_s(lambda: a @ b, dev)


def _attention_flops(dev: torch.device) -> float:
    batch, heads, tokens, dim = ATTENTION_SHAPE
    q, k, v = (torch.randn(ATTENTION_SHAPE, device=dev, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * batch * heads * tokens**2 * dim  # QK^T and PV, 2 FLOP per multiply-add each
    return flops / _best_s(lambda: F.scaled_dot_product_attention(q, k, v), dev)


def _context_bytes(dev: torch.device) -> int:
    """Device memory the allocator does not hold: CUDA context, kernel images, cuBLAS/cuDNN state. Taken after
    the GEMM and attention runs loaded their kernels; memory of other processes on the card is counted too."""
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    return max(0, total - free - torch.cuda.memory_reserved(dev))


def measure(device: str | torch.device = "cuda") -> Measurements:
    """Run every measurement on `device` (a CUDA device; takes a few seconds and about 1 GiB of VRAM)."""
    dev = _cuda_device(device)
    with torch.cuda.device(dev):
        copies = _copy_rates(dev)
        matmul, attention = _matmul_flops(dev), _attention_flops(dev)
        launch, pin = _launch_s(dev), _pin_rate(dev)
        context = _context_bytes(dev)
    props = torch.cuda.get_device_properties(dev)
    m = Measurements(device_name=torch.cuda.get_device_name(dev), total_bytes=props.total_memory, **copies,
                     matmul_flops=matmul, attention_flops=attention, context_bytes=context, launch_s=launch,
                     pin_bytes_per_s=pin,
                     fp8_capable=(props.major, props.minor) >= FP8_COMPUTE_CAPABILITY)
    logger.info("measured %s: %s", m.device_name, {k: f"{v:.4g}" for k, v in dataclasses.asdict(m).items()
                                                     if isinstance(v, float)})
    return m


def calibrate(name: str = "my-gpu", device: str = "cuda") -> HardwareSpec:
    """Measure the CUDA GPU `device` and return a HardwareSpec fitted to it (`calibrated=True`).

    Example:
        >>> from cost_models.calibrate import calibrate, save_spec
        >>> spec = calibrate("my-4090")            # a few seconds, about 1 GiB of VRAM
        >>> save_spec(spec, "my-4090.json")        # later: optimize(pipe, "8GB", gpu="my-4090.json")

    Measures H2D (pinned and pageable), D2H and device-memory bandwidth, a dense bf16 GEMM, attention through
    F.scaled_dot_product_attention, and the memory the CUDA context holds outside the allocator. The card's
    table entry (matched by torch.cuda.get_device_name) supplies the figures not measured; a card not in the
    table gets its measured GEMM rate as its bf16 peak (see spec_from_measurements). Run it on an otherwise
    idle card: other processes' memory and kernels skew the context size and the rates.

    Raises RuntimeError ("calibrate() needs a CUDA GPU ...") without a CUDA device.

    Not yet run on a GPU: the CUDA paths (measure and its helpers) are written to the torch API but have only
    been exercised by the CPU tests of the pure parts (table_entry, spec_from_measurements).
    """
    return spec_from_measurements(measure(device), name)
