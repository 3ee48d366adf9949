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


def _workload_args(p: argparse.ArgumentParser, default: str = "the pipeline's default") -> None:
    p.add_argument("--height", type=int, help=f"image height in pixels (default: {default})")
    p.add_argument("--width", type=int, help=f"image width in pixels (default: {default})")
    p.add_argument("--frames", type=int, dest="num_frames", help=f"video frames (default: {default})")
    p.add_argument("--steps", type=int, dest="num_inference_steps", help=f"denoising steps (default: {default})")
    p.add_argument("--batch", type=int, dest="batch_size", help=f"images per prompt (default: {default})")
    p.add_argument("--max-sequence-length", type=int, dest="max_sequence_length",
                   help=f"text tokens (default: {default})")
    p.add_argument("--call", action="append", default=[], metavar="NAME=VALUE",
                   help="any other argument of the pipeline's __call__, e.g. --call guidance_scale=5 (VALUE is "
                        "read as JSON, else as a string); repeatable (default: none)")
    p.add_argument("--allow-untraced", action="store_true",
                   help="plan even if a component call cannot be traced (partly blind: its activations and "
                        "compute go unpriced; default: refuse)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memplan", description="Fastest diffusers memory plan within a budget.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs (default: off)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log memplan's decisions at INFO on stderr (default: warnings only)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="plan a zoo model or a diffusers model folder", epilog=EPILOG_PLAN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="zoo name (memplan zoo) or a folder with model_index.json")
    p.add_argument("--budget", required=True, help="VRAM of the card, e.g. 8GB (8e9 bytes) or 8GiB (required)")
    p.add_argument("--gpu", help="target GPU: any common name (rtx-4090, 'NVIDIA GeForce RTX 4090', 4090; see "
                                 "memplan gpus) or a spec JSON (default: this machine's CUDA card, detected)")
    p.add_argument("--ram", help="host RAM budget, e.g. 64GB (default: this machine's total RAM minus a reserve of "
                                 "10%%, at least 4 GiB)")
    p.add_argument("--device", help="device the plan runs on: cuda or cpu (default: cuda, as in the Python API)")
    p.add_argument("--no-lossy", action="store_true",
                   help="forbid fp8 storage and VAE tiling (default: allowed, but taken only when needed to fit or "
                        "at least 1.25x faster)")
    p.add_argument("--trials", type=int,
                   help="Optuna trials before the exact polish (default: planner.search.DEFAULT_N_TRIALS)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    p.add_argument("--storage", help="Optuna RDB URL, e.g. sqlite:///memplan.db (default: in memory)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: shown while profiling and searching when stderr is a terminal)")
    p.add_argument("-o", "--output", help="write the plan JSON here (default: not written)")
    _workload_args(p)

    e = sub.add_parser("estimate", help="price a given plan", epilog=EPILOG_ESTIMATE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", help="zoo name (memplan zoo) or a folder with model_index.json")
    e.add_argument("--plan", required=True, help="plan JSON to price (required)")
    e.add_argument("--gpu", help="GPU, any common name or a spec JSON (default: the plan's)")
    e.add_argument("--budget", help="VRAM budget to check the plan against, e.g. 8GB (default: the plan's budget)")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON (default: text)")
    _workload_args(e, "the plan's workload")

    s = sub.add_parser("show", help="print a plan file", epilog="example:\n  memplan show plans/flux-dev-8GB.json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("plan", help="plan JSON written by memplan plan -o or plan.save()")
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
    b.add_argument("-o", "--output", default="rows.jsonl",
                   help="rows JSONL, a CSV is written beside it (default: rows.jsonl)")
    b.add_argument("--time-limit", type=float, help="seconds after which no new scenario starts (default: none)")
    b.add_argument("--storage", help="Optuna RDB URL shared by every worker (PostgreSQL across machines, SQLite on "
                                     "one): each scenario is run once by one of them; rows of all are written "
                                     "(default: none, one process)")
    b.add_argument("--sweep", help="name of the sweep study (default: derived from the scenarios)")
    r = sub.add_parser("report", help="render benchmark rows or a plan file as HTML (or markdown)",
                       epilog=EPILOG_REPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("rows", help="rows JSONL from `memplan bench`, or a plan JSON from `memplan plan -o`")
    r.add_argument("-o", "--output", default="report.html", help="where to write (default: report.html)")
    r.add_argument("--md", action="store_true", help="write markdown, PNGs beside it (default: HTML)")


def cmd_bench(args) -> int:
    from benchmarks.runner import run_scenarios
    from benchmarks.scenarios import resolve

    check_output(args.output)
    def show(row: dict) -> None:
        pred, meas = row.get("pred_total_s"), row.get("extrap_total_s")
        where = f"pred for {row.get('pred_for')}, measured on {row.get('measured_on')}"
        times = f"pred {pred:.4g}s extrap {meas:.4g}s ({where})" if pred is not None and meas is not None else ""
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
    knobs = {k: getattr(args, k) for k in ("height", "width", "num_frames", "num_inference_steps", "batch_size",
                                           "max_sequence_length") if getattr(args, k, None) is not None}
    for item in getattr(args, "call", []):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--call {item!r} is not NAME=VALUE: write e.g. --call guidance_scale=5")
        try:
            knobs[name] = json.loads(value)
        except ValueError:
            knobs[name] = value
    return knobs


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
                    progress=False if args.no_progress else None, allow_untraced=args.allow_untraced,
                    **_workload(args))
    if args.output:  # first, so a bad path fails before anything is printed
        plan.save(args.output)
    print(plan.summary())
    if plan.loading:
        print(f"\nload: {plan.loading['advice']}")
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


def cmd_estimate(args) -> int:
    from cost_models import estimate, get_gpu
    from planner.plan import Plan
    from planner.profiler import profile
    from planner.sources import load_source
    from planner.workload import Workload

    plan = Plan.load(args.plan)
    source = load_source(args.model)
    overrides = _workload(args)
    hw = get_gpu(args.gpu) if args.gpu else _plan_gpu(plan)
    untraced = args.allow_untraced
    if plan.workload:  # the plan's workload as it was resolved, the command line's knobs on top
        prof = profile(source, Workload.from_dict(plan.workload), allow_untraced=untraced, **overrides)
    else:
        prof = profile(source, allow_untraced=untraced, **overrides)
    plan.check_fits(prof.pipeline_class, {n: (c.class_name, c.config_hash) for n, c in prof.components.items()})
    est = estimate(prof, plan.choice, hw)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        from planner.plan import describe_estimate

        print(describe_estimate(est))
        print(_fits(est, hw, args.budget, plan.budgets.get("vram_bytes")))
    return 0


def _fits(est, hw, budget: str | None, plan_budget_bytes: int | None) -> str:
    """Whether the estimate fits the budget (given, else the plan's) and the card itself."""
    from planner.units import parse_size

    def verdict(limit: int, what: str) -> str:
        fits = "fits" if est.card_peak_bytes <= limit else "does NOT fit"
        return (f"{fits} {what}: card peak {format_size(est.card_peak_bytes)} = "
                f"{100 * est.card_peak_bytes / limit:.0f}% of {format_size(limit)}")

    lines = []
    if budget is not None:
        lines.append(verdict(parse_size(budget), f"the budget {budget}"))
    elif plan_budget_bytes:
        lines.append(verdict(plan_budget_bytes, "the plan's budget"))
    lines.append(verdict(hw.vram_bytes, f"the card ({hw.name})"))
    return "\n".join(lines)


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
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
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
