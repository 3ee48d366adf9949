"""How long meta profiling takes per zoo pipeline at its default workload, cold and cached.

    python -m benchmarks.profile_speed [NAME ...] [--json rows.jsonl]

Each pipeline is measured in fresh child processes, so imports, the in-process profile cache and the tracer's
meta-op memo start empty:
- cold: a fresh MEMPLAN_CACHE temp dir; import planner, `load_source` (imports the model classes, builds the
  components on meta), `profile` (traces every component);
- cached, same process: the in-process cache cleared, `load_source` + `profile` again (a disk-cache hit);
- cached, fresh process: a second child with the same MEMPLAN_CACHE: import + `load_source` + `profile`.
Times are wall seconds on this machine; the header gives its cores and load average, since other work on a
shared machine stretches them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

GOALS = {"flux-dev": (5.0, 0.5)}  # pipeline -> (cold s, cached s)


@dataclass
class Row:
    pipeline: str
    workload: str = ""
    import_s: float = 0.0
    load_s: float = 0.0  # load_source: build the components on meta
    profile_s: float = 0.0  # cold: trace every component
    cached_load_s: float = 0.0  # same process, second load_source
    cached_profile_s: float = 0.0  # same process, disk-cache hit
    fresh_import_s: float = 0.0  # fresh process with a warm disk cache
    fresh_load_s: float = 0.0
    fresh_profile_s: float = 0.0
    error: str = ""

    @property
    def cold_s(self) -> float:
        return self.import_s + self.load_s + self.profile_s

    @property
    def cached_s(self) -> float:
        return self.cached_load_s + self.cached_profile_s

    @property
    def fresh_s(self) -> float:
        return self.fresh_import_s + self.fresh_load_s + self.fresh_profile_s


def _child(name: str, again: bool) -> dict:
    """Runs in a child process: times import, load_source and profile (and the same-process repeat if `again`)."""
    start = time.perf_counter()
    from planner import profiler
    from planner.sources import load_source

    imported = time.perf_counter()
    source = load_source(name)
    loaded = time.perf_counter()
    work = profiler.profile(source).workload
    profiled = time.perf_counter()
    frames = f"{work.num_frames}x" if work.num_frames else ""
    row = dict(workload=f"{frames}{work.height}x{work.width}", import_s=imported - start, load_s=loaded - imported,
               profile_s=profiled - loaded)
    if again:
        profiler._MEMORY_CACHE.clear()
        t0 = time.perf_counter()
        source = load_source(name)
        t1 = time.perf_counter()
        profiler.profile(source, work)
        row.update(cached_load_s=t1 - t0, cached_profile_s=time.perf_counter() - t1)
    return row


def _run_child(name: str, cache_dir: str, again: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.profile_speed", "--child", name] + (["--again"] if again else [])
    env = dict(os.environ, MEMPLAN_CACHE=cache_dir)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str) -> Row:
    row = Row(name)
    with tempfile.TemporaryDirectory() as cache_dir:
        try:
            cold = _run_child(name, cache_dir, again=True)
            fresh = _run_child(name, cache_dir, again=False)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
            row.error = str(err)
            return row
    for key, value in cold.items():
        setattr(row, key, value)
    row.fresh_import_s, row.fresh_load_s, row.fresh_profile_s = fresh["import_s"], fresh["load_s"], fresh["profile_s"]
    return row


def table(rows: list[Row]) -> str:
    head = ("| pipeline | workload | cold: import + load + profile = s | cached, same process: load + profile = s "
            "| cached, fresh process: import + load + profile = s | goal (cold / cached s) |")
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        if r.error:
            lines.append(f"| {r.pipeline} | | failed: {r.error} | | | |")
            continue
        goal = GOALS.get(r.pipeline)
        lines.append(
            f"| {r.pipeline} | {r.workload} | {r.import_s:.2f} + {r.load_s:.2f} + {r.profile_s:.2f} = **{r.cold_s:.2f}** "
            f"| {r.cached_load_s:.2f} + {r.cached_profile_s:.3f} = **{r.cached_s:.2f}** "
            f"| {r.fresh_import_s:.2f} + {r.fresh_load_s:.2f} + {r.fresh_profile_s:.3f} = **{r.fresh_s:.2f}** "
            f"| {f'{goal[0]:g} / {goal[1]:g}' if goal else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="zoo names (default: all)")
    parser.add_argument("--json", help="also write the rows as JSON lines here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--again", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.again)))
        return 0
    from planner.sources import zoo_names

    names = args.names or zoo_names()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"meta profiling time, {os.cpu_count()} CPUs, load average {load} (wall seconds)\n")
    rows = [measure(name) for name in names]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(asdict(r)) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
