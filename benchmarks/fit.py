"""Fit the per-GPU constants of the cost model on the published calibration rows: `python -m benchmarks.fit`.

One mechanism at a time (the calibration README's advice), per GPU with rows:
  1. compute: the kernel efficiencies, memory efficiency and launch floor, on the times of rows that keep every
     component on the GPU (no transfers in them);
  2. transfers: the host-link rates and the offload overheads, on the times of rows that offload, with the
     compute constants of stage 1 held;
  3. memory: the allocator's reserved/allocated ratio, on the memory rows.
Each stage is least squares on log(predicted / published), each constant bounded to the physical range below, in
log space (scipy's trust-region reflective solver), plus a weak prior (PRIOR_WEIGHT per e-fold away from the
default) so that a constant few rows pin down stays near its default instead of wandering. Only constants the
stage's rows move are fitted. A GPU without rows keeps its datasheet-derived link rates and gets, for what does
not depend on the card's link (kernel efficiencies, launch and hook costs, allocator ratio), the median of the
fitted GPUs' values ("default" in the file).

Writes cost_models/fitted.json (per GPU: constants, the row ids they came from, bounds, errors) and prints the
errors on the rows with leave-one-out errors beside them (each row predicted by constants fitted without it).
calibrate() on a real GPU measures these constants directly; its spec takes precedence over the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from benchmarks.published import DEFAULT_ROWS, Comparison, compare_all, load_rows
from cost_models.hardware import DATASHEET_GPUS, FITTED_PATH, HardwareSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bound:
    lo: float
    hi: float
    why: str


# Physical ranges. Link rates are bounded by the bandwidth figures of the calibration set (B1-B5, GB/s):
# pinned H2D on PCIe 4.0 x16 measures 23.9-26.4 and 11-16 with both directions busy (B1); on PCIe 5.0 56.3 (B2),
# 57.1 and 14.2 in a bad slot (B3); SM-driven copies 35.2 (B4), large buffers 16.5-25.1 (B5).
_PINNED_BY_GEN = {3: (5e9, 13e9), 4: (11e9, 26.4e9), 5: (14.2e9, 57.1e9)}
_D2H_MAX_BY_GEN = {3: 13e9, 4: 27.1e9, 5: 57.3e9}


def bounds(spec: HardwareSpec) -> dict[str, Bound]:
    pinned_lo, pinned_hi = _PINNED_BY_GEN[spec.pcie_gen] if spec.pcie_gen in _PINNED_BY_GEN else (5e9, 57.1e9)
    return {
        "compute_efficiency": Bound(0.3, 0.9, "cuBLAS GEMMs reach 50-85% of the dense peak on large shapes"),
        "attention_efficiency": Bound(0.15, 0.8, "flash/mem-efficient attention: 35-75% of peak (FA2 to FA3)"),
        "conv_efficiency": Bound(0.03, 0.8, "cuDNN convolutions in NCHW, GroupNorm-heavy VAEs: far below GEMMs"),
        "mem_efficiency": Bound(0.4, 0.95, "STREAM-like kernels reach 70-90% of datasheet bandwidth"),
        "launch_s": Bound(3e-6, 40e-6, "eager PyTorch dispatch + launch: a few to tens of microseconds per op"),
        "h2d_pinned_bytes_per_s": Bound(pinned_lo, pinned_hi, "B1-B3 for this PCIe generation"),
        "h2d_pageable_fraction": Bound(0.1, 1.0, "pageable / pinned H2D: a staged copy is never faster than pinned"),
        "d2h_bytes_per_s": Bound(1e9, _D2H_MAX_BY_GEN.get(spec.pcie_gen, 57.3e9),
                                 "into fresh pageable memory (page faults) up to the link's D2H rate (B1, B2)"),
        "sync_s": Bound(10e-6, 3e-3, "per group: hook Python, a .to() per tensor, stream/event syncs"),
        "module_hook_s": Bound(20e-6, 3e-3, "per module: accelerate's AlignDevicesHook, Python per tensor"),
        "pin_bytes_per_s": Bound(1e9, 30e9, "host memcpy into page-locked memory (+ registration)"),
        "page_cache_bytes_per_s": Bound(2e9, 40e9, "safetensors read of cached pages: a host memcpy"),
        "reserved_over_allocated": Bound(1.0, 1.3, "caching-allocator rounding and fragmentation"),
    }


# Constants that describe the libraries and kernels rather than the card's host link: a GPU without rows takes
# the fitted GPUs' median of these.
PORTABLE = ("compute_efficiency", "attention_efficiency", "conv_efficiency", "mem_efficiency", "launch_s", "sync_s", "module_hook_s", "pin_bytes_per_s",
            "page_cache_bytes_per_s", "reserved_over_allocated")
# Datasheet dense fp32 (CUDA-core) FLOP/s of the data-centre cards, where it is not half the bf16 figure.
DATASHEET_FP32_FLOPS = {
    "a100-40gb": 19.5e12, "a100-80gb": 19.5e12,  # NVIDIA A100 datasheet: FP32 19.5 TFLOPS
    "h100": 67e12, "h200": 67e12,  # H100 / H200 SXM datasheets: FP32 67 TFLOPS
    "h100-pcie": 51e12,  # H100 PCIe datasheet: FP32 51 TFLOPS
    "l4": 30.3e12, "t4": 8.1e12, "a10g": 31.2e12,  # L4, T4 datasheets; A10G (AWS): 31.2
}
SENSITIVITY = 1e-4  # a constant whose 1% change moves no row's log error by more than this is not fitted
# Weight of the prior: one e-fold (2.7x) away from the default costs as much as one row 10% off.
PRIOR_WEIGHT = 0.1
COMPUTE = ("compute_efficiency", "attention_efficiency", "conv_efficiency", "mem_efficiency", "launch_s")
TRANSFERS = ("h2d_pinned_bytes_per_s", "h2d_pageable_fraction", "d2h_bytes_per_s", "sync_s", "module_hook_s",
             "pin_bytes_per_s", "page_cache_bytes_per_s")
MEMORY = ("reserved_over_allocated",)


@dataclass(frozen=True)
class Stage:
    name: str
    constants: tuple[str, ...]
    quantity: str
    offloaded: bool | None  # rows with (True) / without (False) offloading; None: all

    def takes(self, c: Comparison) -> bool:
        return (c.fit and c.quantity == self.quantity
                and (self.offloaded is None or (c.category == "offload") == self.offloaded))


STAGES = (Stage("compute", COMPUTE, "time", False), Stage("transfers", TRANSFERS, "time", True),
          Stage("memory", MEMORY, "memory", None))


def _base(name: str) -> HardwareSpec:
    spec = DATASHEET_GPUS[name]
    fp32 = DATASHEET_FP32_FLOPS.get(name)
    return dataclasses.replace(spec, fp32_flops=fp32) if fp32 else spec


def _residuals(rows: list[dict], spec: HardwareSpec, stage: Stage | None = None
               ) -> tuple[np.ndarray, list[Comparison]]:
    comps, _ = compare_all(rows, {spec.name: spec})
    comps = [c for c in comps if (stage.takes(c) if stage else c.fit)]
    return np.array([math.log(max(c.predicted, 1e-12) / c.published) for c in comps]), comps


def _get(spec: HardwareSpec, name: str) -> float:
    if name == "h2d_pageable_fraction":
        return spec.h2d_pageable_bytes_per_s / spec.h2d_pinned_bytes_per_s
    return getattr(spec, name)


def _set(spec: HardwareSpec, values: dict[str, float]) -> HardwareSpec:
    """`spec` with `values`; the pageable rate is fitted as a fraction of the pinned one (so never above it)."""
    fraction = values.pop("h2d_pageable_fraction", _get(spec, "h2d_pageable_fraction"))
    spec = dataclasses.replace(spec, **values)
    return dataclasses.replace(spec, h2d_pageable_bytes_per_s=fraction * spec.h2d_pinned_bytes_per_s)


def _with(spec: HardwareSpec, names: list[str], logs: np.ndarray) -> HardwareSpec:
    return _set(spec, {n: float(math.exp(v)) for n, v in zip(names, logs)})


def sensitive(rows: list[dict], spec: HardwareSpec, stage: Stage) -> list[str]:
    """The stage's constants whose 1% change moves at least one of the stage's rows."""
    base, _ = _residuals(rows, spec, stage)
    moved = []
    for name in stage.constants:
        bound = bounds(spec)[name]
        value = min(max(_get(spec, name), bound.lo), bound.hi)
        nudged, _ = _residuals(rows, _set(spec, {name: value * 1.01}), stage)
        if base.size and np.max(np.abs(nudged - base)) > SENSITIVITY:
            moved.append(name)
    return moved


def fit_stage(rows: list[dict], spec: HardwareSpec, stage: Stage) -> tuple[HardwareSpec, list[str]]:
    """`spec` with the stage's constants that its rows move fitted (least squares on log error + prior)."""
    names = sensitive(rows, spec, stage)
    if not names:
        return spec, names
    b = bounds(spec)
    lo = np.log([b[n].lo for n in names])
    hi = np.log([b[n].hi for n in names])
    start = np.clip(np.log([_get(spec, n) for n in names]), lo + 1e-9, hi - 1e-9)

    def residuals(x: np.ndarray) -> np.ndarray:
        return np.concatenate([_residuals(rows, _with(spec, names, x), stage)[0], PRIOR_WEIGHT * (x - start)])

    result = least_squares(residuals, start, bounds=(lo, hi), diff_step=1e-3)
    return _with(spec, names, result.x), names


def fit_gpu(rows: list[dict], spec: HardwareSpec) -> tuple[HardwareSpec, list[str]]:
    """`spec` fitted stage by stage (compute, transfers, memory); returns it and the constants fitted."""
    fitted: list[str] = []
    for stage in STAGES:
        spec, names = fit_stage(rows, spec, stage)
        fitted += names
    return spec, fitted


def leave_one_out(rows: list[dict], spec: HardwareSpec) -> dict[tuple[str, str], float]:
    """(row id, quantity) -> error of the row predicted with constants fitted on the other rows."""
    out = {}
    for row in rows:
        others = [r for r in rows if r["id"] != row["id"]]
        fitted = fit_gpu(others, spec)[0] if others else spec
        comps, _ = compare_all([row], {spec.name: fitted})
        out.update({(c.row, c.quantity): c.error for c in comps if c.fit})
    return out


def _fitting_rows(rows: list[dict]) -> dict[str, list[dict]]:
    by_gpu: dict[str, list[dict]] = {}
    for row in rows:
        usable = [m for m in row["measured"].values() if m.get("use_for_fitting", True)]
        if usable and row["gpu"] in DATASHEET_GPUS:
            by_gpu.setdefault(row["gpu"], []).append(row)
    return by_gpu


def fit_all(rows: list[dict], loo: bool = True) -> dict:
    """The fitted.json content, and the per-row errors (in-sample and leave-one-out)."""
    gpus, report = {}, []
    for gpu, gpu_rows in sorted(_fitting_rows(rows).items()):
        base = _base(gpu)
        fitted, names = fit_gpu(gpu_rows, base)
        _, comps = _residuals(gpu_rows, fitted)
        loo_err = leave_one_out(gpu_rows, base) if loo else {}
        constants = {n: getattr(fitted, n) for n in names if n != "h2d_pageable_fraction"}
        if "h2d_pageable_fraction" in names:
            constants["h2d_pageable_bytes_per_s"] = fitted.h2d_pageable_bytes_per_s
        gpus[gpu] = {"constants": constants, "fitted": sorted(constants), "rows": [r["id"] for r in gpu_rows]}
        report += [{"row": c.row, "gpu": gpu, "quantity": c.quantity, "category": c.category,
                    "published": c.published, "predicted": c.predicted, "error": c.error,
                    "loo_error": loo_err.get((c.row, c.quantity))} for c in comps]
    default = {n: statistics.median(g["constants"][n] for g in gpus.values() if n in g["constants"])
               for n in PORTABLE if any(n in g["constants"] for g in gpus.values())}
    for g in gpus.values():  # constants no row of that GPU moves take the default; "fitted" names the others
        g["constants"] = {**default, **g["constants"]}
    datasheet = {n: {"fp32_flops": v} for n, v in DATASHEET_FP32_FLOPS.items()}
    return {"format": 1, "note": "written by python -m benchmarks.fit; see its docstring", "datasheet": datasheet,
            "gpus": gpus, "default": {"constants": default, "from": sorted(gpus)},
            "bounds": {gpu: {n: [b.lo, b.hi, b.why] for n, b in bounds(_base(gpu)).items()} for gpu in gpus},
            "errors": report}


def _summary(report: list[dict], key: str) -> str:
    lines = []
    for quantity in ("memory", "time"):
        errs = [abs(r[key]) for r in report if r["quantity"] == quantity and r[key] is not None]
        if errs:
            lines.append(f"{quantity}: {len(errs)} rows, median |error| {100 * statistics.median(errs):.1f}%, "
                         f"max {100 * max(errs):.1f}%")
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", default=str(DEFAULT_ROWS))
    parser.add_argument("--out", default=str(FITTED_PATH), help="the fitted-constants file the GPU table reads")
    parser.add_argument("--no-loo", action="store_true", help="skip the leave-one-out refits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = fit_all(load_rows(Path(args.rows)), loo=not args.no_loo)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print("| row | gpu | quantity | published | predicted | error | leave-one-out |\n|---|---|---|---|---|---|---|")
    for r in data["errors"]:
        loo = "" if r["loo_error"] is None else f"{100 * r['loo_error']:+.1f}%"
        print(f"| {r['row']} | {r['gpu']} | {r['quantity']} | {r['published']:.4g} | {r['predicted']:.4g} | "
              f"{100 * r['error']:+.1f}% | {loo} |")
    for gpu, g in data["gpus"].items():
        print(f"\n{gpu} (from {len(g['rows'])} rows; * = fitted, else the default): "
              + ", ".join(f"{k}{'*' if k in g['fitted'] else ''}={v:.4g}" for k, v in g["constants"].items()))
    print(f"\ndefault for GPUs without rows (median of {', '.join(data['default']['from'])}): "
          + ", ".join(f"{k}={v:.4g}" for k, v in data["default"]["constants"].items()))
    print(f"\nin sample: {_summary(data['errors'], 'error')}")
    if not args.no_loo:
        print(f"leave-one-out: {_summary(data['errors'], 'loo_error')}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
