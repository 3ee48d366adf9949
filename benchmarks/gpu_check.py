"""The GPU check: one command that measures memplan's plans on a real card and writes the evidence to one folder.

    python -m benchmarks.gpu_check                       # CUDA: benchmarks/results/<date>-<card>/ (torch's exact name)
    python -m benchmarks.gpu_check --out-root $OUT       # the same folder under another root
    python -m benchmarks.gpu_check --dry-run [--out DIR] # the same code path on CPU with the tiny pipelines

On CUDA: SDXL-base and Flux-dev built at full size with random weights (never downloaded; the text encoders run
on token ids from small in-code word-level tokenizers), 1024x1024, 2 measured denoising steps + decode after a
1-step warm-up. For each budget (6, 8, 12, 16, 24 GB, simulated with set_per_process_memory_fraction):
optimize -> apply -> run -> measure; then the fixed reference strategies. If cost_models.calibrate exists, the
card is calibrated first and the plans are priced with the fitted spec (else with the table entry).
Written: rows.jsonl, rows.csv, report.html, env.json, log.txt (+ gpu-calibrated.json). Scenarios that would
start after --time-limit seconds are recorded as skipped, so the whole command stays within ~8 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import scenarios as sc
from benchmarks.report import write_report
from benchmarks.runner import run_scenarios
from planner.units import format_size

logger = logging.getLogger("benchmarks.gpu_check")

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
DEFAULT_TIME_LIMIT_S = 390  # last scenario start; build + calibration + the last runs + report fit in 8 min
DRY_RUN_TIME_LIMIT_S = 120  # every scenario profiles its pipeline by running its call (discovery): ~1 s each here


@dataclass(frozen=True)
class Card:
    """The card the check runs on: torch's exact name, a folder-safe form of it, and its GPU-table key (None
    for a card the table does not hold: plans are then priced only with its calibrated spec, never as another)."""

    device_name: str
    slug: str
    table_key: str | None


def detect_gpu() -> Card:
    """CUDA device 0, matched against the GPU table by the one name matcher (cost_models.gpu_names)."""
    from cost_models.gpu_names import match

    name = torch.cuda.get_device_name(0)
    key = match(name, torch.cuda.get_device_properties(0).total_memory)
    if key is None:
        logger.warning("GPU %r is not in the table: plans are priced with its calibration only", name)
    return Card(name, card_slug(name), key)


def card_slug(device_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": the exact name, lower-cased, safe in a path."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown-gpu"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("diffusers", "transformers", "accelerate", "optuna", "pandas", "matplotlib", "memplan"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def environment(device: str) -> dict:
    env = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
           "host": platform.node(), "platform": platform.platform(), "argv": sys.argv, **_versions()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=torch.cuda.get_device_name(0), gpu_total_bytes=props.total_memory,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), driver=_driver())
    return env


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def calibrate_into(folder: Path, device: str, env: dict) -> str | None:
    """Run cost_models.calibrate.calibrate() if it exists and we are on CUDA; the spec's JSON path or None."""
    if device != "cuda":
        env["calibration"] = "skipped: needs CUDA"
        return None
    try:
        from cost_models.calibrate import calibrate
        from cost_models.hardware import save_spec
    except ImportError as err:
        env["calibration"] = f"skipped: {err}"
        return None
    try:
        start = time.perf_counter()
        spec = calibrate(name=f"{env.get('gpu_slug', 'gpu')}-calibrated", device="cuda")
        path = folder / "gpu-calibrated.json"
        save_spec(spec, path)
        env["calibration"] = f"ok in {time.perf_counter() - start:.1f}s: {path.name}"
        return str(path)
    except Exception as err:  # a failed calibration must not cost the sweep
        logger.warning("calibration failed: %s: %s", type(err).__name__, err)
        env["calibration"] = f"failed: {type(err).__name__}: {err}"
        return None
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _progress(start: float):
    def show(row: dict) -> None:
        def gb(key):
            v = row.get(key)
            return f"{format_size(v):>10s}" if isinstance(v, (int, float)) else "         -"

        def s(key):
            v = row.get(key)
            return f"{v:9.3f}" if isinstance(v, (int, float)) else "        -"

        msg = f" {row['message'][:120]}" if row.get("status") != "ok" else ""
        print(f"[{time.perf_counter() - start:6.1f}s] {row['scenario']:28s} {row['status']:12s} card pred "
              f"{gb('pred_card_peak_bytes')} meas {gb('meas_card_peak_bytes')}  s pred {s('pred_total_s')} "
              f"extrap {s('extrap_total_s')}{msg}", flush=True)

    return show


def _folder(args, device: str, gpu: str) -> Path:
    """`gpu` is the card's slug (its exact torch name), never a table key it was matched to."""
    if args.out:
        return Path(args.out)
    if args.dry_run:
        return Path(tempfile.mkdtemp(prefix="memplan-gpu-check-dry-"))
    root = Path(args.out_root) if args.out_root else RESULTS_ROOT
    return root / f"{datetime.now(timezone.utc):%Y-%m-%d}-{gpu}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny pipelines, same code path (< 60 s)")
    p.add_argument("--out", help="write here (default: benchmarks/results/<date>-<gpu>/, or a temp folder)")
    p.add_argument("--out-root", help="parent of the <date>-<gpu> folder (default benchmarks/results)")
    p.add_argument("--time-limit", type=float, help="seconds after which no new scenario starts")
    p.add_argument("--budgets", default=",".join(map(str, sc.GPU_BUDGETS_GB)), help="GB budgets, comma-separated")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to exercise the code path on CPU", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # tiny models: threads only add contention noise on a shared CPU
    card = detect_gpu() if device == "cuda" else Card("cpu", "cpu", None)
    folder = _folder(args, device, card.slug)
    folder.mkdir(parents=True, exist_ok=True)
    handler = _log_to(folder / "log.txt")
    try:
        return _check(args, device, card, folder, start)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        torch.set_num_threads(threads)


def _check(args, device: str, card: Card, folder: Path, start: float) -> int:
    env = {**environment(device), "gpu_slug": card.slug, "gpu_table_name": card.table_key, "dry_run": args.dry_run,
           "folder": str(folder)}
    _write_env(folder, env)
    spec = calibrate_into(folder, device, env)
    gpu = card.table_key
    if device == "cuda" and spec is None and gpu is None:
        env["error"] = f"{card.device_name!r} is not in the GPU table and its calibration failed: no spec to price with"
        _write_env(folder, env)
        print(f"gpu_check: {env['error']}", file=sys.stderr)
        return 2
    env["gpu_spec_used"] = spec or gpu
    budgets = tuple(int(b) for b in args.budgets.split(",") if b.strip())
    if args.dry_run:
        todo = sc.dry_run() + folder_scenarios(Path(tempfile.mkdtemp(prefix="memplan-models-")))
    else:  # with a calibrated spec, the table entry's prices are kept beside it (cmp_* columns)
        todo = sc.gpu_sweep(spec or gpu, budgets, compare_gpu=gpu if spec and gpu else None)
    limit = args.time_limit or (DRY_RUN_TIME_LIMIT_S if args.dry_run else DEFAULT_TIME_LIMIT_S)
    print(f"gpu_check: {len(todo)} scenarios on {env.get('gpu_name', device)} -> {folder}", flush=True)
    rows = run_scenarios(todo, folder / "rows.jsonl", time_limit_s=limit - (time.perf_counter() - start),
                         progress=_progress(start))
    report = write_report(folder / "rows.jsonl", folder / "report.html")
    env.update(elapsed_s=round(time.perf_counter() - start, 1), statuses=_count(rows))
    _write_env(folder, env)
    print(f"gpu_check: {env['statuses']} in {env['elapsed_s']}s; report {report}", flush=True)
    return 0


def folder_scenarios(root: Path) -> list[sc.Scenario]:
    """Dry run only: the tiny pipelines written as config-only model folders (bf16 Flux, fp16 SDXL), so the
    full-size build path (meta build, random fill, in-code tokenizers and schedulers) runs on CPU too."""
    from benchmarks.runner import write_model_folder
    from planner.tiny import tiny_flux_pipeline, tiny_sdxl_pipeline

    flux = write_model_folder(tiny_flux_pipeline(), root / "tiny-flux-bf16", dtype="bfloat16")
    sdxl = write_model_folder(tiny_sdxl_pipeline(), root / "tiny-sdxl-fp16", dtype="float16")
    return [dataclasses.replace(s, name=f"{s.name}-folder", pipeline=str(path))
            for s, path in ((sc.smoke()[0], flux), (sc.smoke()[2], flux), (sc.smoke()[3], sdxl))]


def _count(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def _write_env(folder: Path, env: dict) -> None:
    (folder / "env.json").write_text(json.dumps(env, indent=2, default=str) + "\n")


def _log_to(path: Path) -> logging.Handler:
    """memplan's and the benchmarks' INFO logs into `path` (the caller removes the handler)."""
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    for name in ("planner", "benchmarks", "cost_models"):
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    return handler


if __name__ == "__main__":
    sys.exit(main())
