"""The `memplan` command line: plan, estimate, show, gpus, zoo (and bench/report from benchmarks/)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from planner.errors import ArgumentError, MemplanError
from planner.units import format_size

logger = logging.getLogger(__name__)

EPILOG_PLAN = """examples:
  memplan plan flux-dev --budget 8GB --gpu rtx-4090 -o plans/flux-dev-8GB.json
  memplan plan ./my-model-folder --budget 12GiB --gpu l4 --height 768 --width 768 --steps 20
"""
EPILOG_ESTIMATE = """examples:
  memplan estimate flux-dev --plan plans/flux-dev-8GB.json
  memplan estimate sdxl-base --plan my-hand-written-plan.json --gpu rtx-4060-8gb --json
"""


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, dest="num_frames")
    p.add_argument("--steps", type=int, dest="num_inference_steps")
    p.add_argument("--batch", type=int, dest="batch_size")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memplan", description="Fastest diffusers memory plan within a budget.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan a zoo model or a diffusers model folder", epilog=EPILOG_PLAN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="zoo name (memplan zoo) or a folder with model_index.json")
    p.add_argument("--budget", required=True, help="VRAM of the card, e.g. 8GB or 8GiB")
    p.add_argument("--gpu", help="target GPU: any common name (rtx-4090, 'NVIDIA GeForce RTX 4090', 4090; see "
                                 "memplan gpus) or a spec JSON (default: this machine's CUDA card, detected)")
    p.add_argument("--ram", help="host RAM budget (default: this machine's available RAM)")
    p.add_argument("--device", default="cuda", help="device the plan runs on (default cuda)")
    p.add_argument("--no-lossy", action="store_true", help="forbid fp8 storage")
    p.add_argument("--trials", type=int, help="Optuna trials before the exact polish (default: the search's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", help="Optuna RDB URL, e.g. sqlite:///memplan.db")
    p.add_argument("-o", "--output", help="write the plan JSON here")
    _workload_args(p)

    e = sub.add_parser("estimate", help="price a given plan", epilog=EPILOG_ESTIMATE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model")
    e.add_argument("--plan", required=True)
    e.add_argument("--gpu", help="GPU (default: the plan's)")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")
    _workload_args(e)

    s = sub.add_parser("show", help="print a plan file", epilog="example:\n  memplan show plans/flux-dev-8GB.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("plan")
    sub.add_parser("gpus", help="list the GPU table", epilog="example:\n  memplan gpus",
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_parser("zoo", help="list the built-in pipelines", epilog="example:\n  memplan zoo",
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _bench_args(sub)
    return parser


EPILOG_BENCH = """examples:
  memplan bench smoke -o rows.jsonl              # built-in sets: smoke, tiny-references, dry-run, gpu
  memplan bench my-scenarios.json -o results/rows.jsonl --time-limit 400
  memplan bench gpu --storage postgresql://user:pw@db-host/memplan -o rows.jsonl   # same line on every worker
"""
EPILOG_REPORT = """examples:
  memplan report rows.jsonl -o report.html
  memplan report rows.jsonl -o report.md --md    # PNGs are written beside the markdown
  memplan report plans/flux-dev-8GB.json -o plan.html
"""


def _bench_args(sub) -> None:
    b = sub.add_parser("bench", help="run benchmark scenarios: predicted beside measured, one row each",
                       epilog=EPILOG_BENCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("scenarios", help="a built-in set name or a scenarios JSON file")
    b.add_argument("-o", "--output", default="rows.jsonl", help="rows JSONL (a CSV is written beside it)")
    b.add_argument("--time-limit", type=float, help="seconds after which no new scenario starts")
    b.add_argument("--storage", help="Optuna RDB URL shared by every worker (PostgreSQL across machines, SQLite on "
                                     "one): each scenario is run once by one of them; rows of all are written")
    b.add_argument("--sweep", help="name of the sweep study (default: derived from the scenarios)")
    r = sub.add_parser("report", help="render benchmark rows or a plan file as HTML (or markdown)",
                       epilog=EPILOG_REPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("rows", help="rows JSONL from `memplan bench`, or a plan JSON from `memplan plan -o`")
    r.add_argument("-o", "--output", default="report.html")
    r.add_argument("--md", action="store_true", help="write markdown (PNGs beside it) instead of HTML")


def cmd_bench(args) -> int:
    from benchmarks.runner import run_scenarios
    from benchmarks.scenarios import resolve

    check_output(args.output)
    def show(row: dict) -> None:
        pred, meas = row.get("pred_total_s"), row.get("meas_total_s")
        times = f"pred {pred:.4g}s meas {meas:.4g}s" if pred is not None and meas is not None else ""
        print(f"{row['scenario']:32s} {row['status']:12s} {times} {row.get('message', '')[:100]}")

    scenarios = resolve(args.scenarios)
    if args.storage:
        rows = _bench_sweep(scenarios, args, show)
    else:
        if args.sweep:
            raise ValueError("--sweep names a study in a shared storage: give --storage too")
        rows = run_scenarios(scenarios, args.output, time_limit_s=args.time_limit, progress=show)
    print(f"\nwrote {len(rows)} rows to {args.output}")
    return 0


def _bench_sweep(scenarios: list, args, show) -> list[dict]:
    """Work on the shared sweep until it is done; every scenario's row (whoever ran it) goes to the output."""
    import dataclasses

    from benchmarks.runner import write_rows
    from benchmarks.sweep import run_sweep

    if args.time_limit is not None:
        raise ValueError("--time-limit applies to a local run; a shared sweep runs until every scenario is done")
    # The scenarios' searches and measured runs go to the same storage, so the workers share those studies too.
    scenarios = [s if s.storage else dataclasses.replace(s, storage=args.storage) for s in scenarios]
    rows = run_sweep(scenarios, args.storage, name=args.sweep, on_row=show)
    write_rows(rows, args.output)
    return rows


def cmd_report(args) -> int:
    from benchmarks.report import write_report

    check_output(args.output)
    print(f"wrote {write_report(args.rows, args.output, markdown=args.md)}")
    return 0


def _workload(args) -> dict:
    return {k: getattr(args, k) for k in ("height", "width", "num_frames", "num_inference_steps", "batch_size")
            if getattr(args, k, None) is not None}


def check_output(path: str) -> None:
    """Refuse an output path that cannot be written, before the planning work rather than after it."""
    target = Path(path)
    if target.is_dir():
        raise ArgumentError(f"output {path!r} is a directory: give a file path, e.g. {target / 'plan.json'}")
    parent = next(p for p in [target.parent, *target.parent.parents] if p.exists() or p == Path(p.anchor))
    if not parent.is_dir():
        raise ArgumentError(f"output {path!r}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ArgumentError(f"output {path!r} cannot be written (permission denied on {target if target.exists() else parent})")


def cmd_plan(args) -> int:
    from planner.optimizer import plan_for

    if args.output:
        check_output(args.output)
    plan = plan_for(args.model, args.budget, ram_budget=args.ram, gpu=args.gpu, device=args.device,
                    allow_lossy=not args.no_lossy, n_trials=args.trials, seed=args.seed, storage=args.storage,
                    show_progress_bar=sys.stderr.isatty(),
                    **_workload(args))
    if args.output:  # first, so a bad path fails before anything is printed
        plan.save(args.output)
    print(plan.summary())
    if plan.loading:
        print(f"\nload: {plan.loading['advice']}")
    print(f"\nalternatives (Pareto front, {len(plan.alternatives)}):")
    for alt in plan.alternatives[:10]:
        e = alt.predicted
        print(f"  card {format_size(e.card_peak_bytes):>10s}  host {format_size(e.host_ram_bytes):>10s}  {e.total_s:8.2f}s")
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


def cmd_estimate(args) -> int:
    from cost_models import estimate, get_gpu
    from planner.plan import Plan
    from planner.profiler import profile
    from planner.sources import load_source
    from planner.workload import Workload, default_workload

    plan = Plan.load(args.plan)
    source = load_source(args.model)
    overrides = _workload(args)
    work = Workload.from_dict({**plan.workload, **overrides}) if plan.workload else default_workload(
        source.pipeline_class, **{**source.workload_defaults, **overrides})
    hw = get_gpu(args.gpu) if args.gpu else _plan_gpu(plan)
    prof = profile(source, work)
    plan.check_fits(prof.pipeline_class, {n: (c.class_name, c.config_hash) for n, c in prof.components.items()})
    est = estimate(prof, plan.choice, hw)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        from planner.plan import describe_estimate

        print(describe_estimate(est))
    return 0


def _plan_gpu(plan):
    from cost_models import HardwareSpec

    if not plan.hardware:
        raise ArgumentError("the plan names no GPU: pass --gpu")
    return HardwareSpec.from_dict(plan.hardware)


def cmd_show(args) -> int:
    from planner.plan import Plan

    print(Plan.load(args.plan).summary())
    return 0


def cmd_gpus(args) -> int:
    from cost_models import GPUS
    from cost_models.gpu_names import CARDS

    for name, hw in GPUS.items():
        print(f"{name:18s} {format_size(hw.vram_bytes):>11s} {hw.bf16_flops / 1e12:7.1f} TFLOP/s  "
              f"PCIe{hw.pcie_gen} {hw.h2d_pinned_bytes_per_s / 1e9:5.1f} GB/s pinned  fp8={hw.fp8!s:5s}  "
              f"{CARDS[name].label}")
    return 0


def cmd_zoo(args) -> int:
    from planner.sources import zoo_names

    print("\n".join(zoo_names()))
    return 0


COMMANDS = {"plan": cmd_plan, "estimate": cmd_estimate, "show": cmd_show, "gpus": cmd_gpus, "zoo": cmd_zoo,
            "bench": cmd_bench, "report": cmd_report}


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line with exit code 2, like every other memplan error."""

    def error(self, message: str):
        self.exit(2, f"memplan: error: {message} (see `{self.prog} --help`)\n")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (MemplanError, OSError)):
        return text
    return f"unexpected {type(err).__name__}: {text} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error is one line on stderr and exit code 2 (`--debug`: the traceback instead);
    Ctrl-C is one line and exit code 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("memplan: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (memplan's own errors and OSError are the expected ones)
        if args.debug:
            raise
        print(f"memplan: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
