"""The `memplan` command line, run as a user runs it: `python -m planner.cli ...` in a subprocess.

plan → estimate agree on every number; show, gpus, zoo and every --help work; bad input exits with code 2 and one
stderr line naming the problem (no traceback), --debug shows the traceback. Subprocesses that do not depend on
each other run concurrently, so the whole file costs a few pipeline profiles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
TRIALS = "40"  # plenty for sd15's few components; the agreement checked here does not depend on it
BUDGETS = {"4GB": "fits resident", "2GB": "must offload"}


def _env(cache: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "MEMPLAN_CACHE": str(cache), "PYTHONPATH": path}


def memplan_many(runs: dict, cwd: Path, at_once: int = 4) -> dict[str, subprocess.CompletedProcess]:
    """Run `memplan <args>` for each entry of `runs` (key -> args), `at_once` at a time; results by key."""
    results: dict[str, subprocess.CompletedProcess] = {}
    pending = list(runs.items())
    while pending:
        batch, pending = pending[:at_once], pending[at_once:]
        procs = {key: subprocess.Popen([sys.executable, "-m", "planner.cli", *args], cwd=cwd, env=_env(cwd / "cache"),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for key, args in batch}
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[key] = subprocess.CompletedProcess(runs[key], proc.returncode, out, err)
    return results


def memplan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return memplan_many({"": list(args)}, cwd)[""]


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"memplan {' '.join(result.args)} failed:\n{result.stderr}"
    return result.stdout


# ---------------------------------------------------------------- plan → estimate → show

@pytest.fixture(scope="module")
def cwd(tmp_path_factory) -> Path:
    """One working directory (and profile cache) for the whole file: sd15 is profiled once."""
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def planned(cwd) -> dict:
    """For each budget: plan sd15 to a file, then estimate and show it (the estimates run concurrently)."""
    plans = memplan_many({b: ["plan", "sd15", "--budget", b, "--gpu", "rtx-4090", "--ram", "64GB", "--trials", TRIALS,
                              "-o", f"plan-{b}.json"] for b in BUDGETS}, cwd)
    for result in plans.values():
        _ok(result)
    later = {f"json {b}": ["estimate", "sd15", "--plan", f"plan-{b}.json", "--json"] for b in BUDGETS}
    later["text 2GB"] = ["estimate", "sd15", "--plan", "plan-2GB.json"]
    later["text 2GB at 1GB"] = ["estimate", "sd15", "--plan", "plan-2GB.json", "--budget", "1GB"]
    later["show 2GB"] = ["show", "plan-2GB.json"]
    return {"cwd": cwd, "plan": plans, **memplan_many(later, cwd)}


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_estimate_agrees_with_the_plan_on_every_number(planned, budget):
    saved = json.loads((planned["cwd"] / f"plan-{budget}.json").read_text())
    estimated = json.loads(_ok(planned[f"json {budget}"]))
    predicted = saved["predicted"]
    assert estimated == predicted  # every key and number, exactly (JSON floats round-trip)
    assert set(predicted) >= {"allocated_peak_bytes", "card_peak_bytes", "host_ram_bytes", "phase_s", "total_s"}
    assert set(predicted["phase_s"]) == {"encode", "denoise", "decode"}
    assert predicted["card_peak_bytes"] <= saved["budgets"]["vram_bytes"]
    assert saved["budgets"] == {"vram_bytes": int(budget.removesuffix("GB")) * 10**9, "ram_bytes": 64 * 10**9}


def test_a_small_budget_plan_offloads_and_is_priced_as_such(planned):
    small = json.loads((planned["cwd"] / "plan-2GB.json").read_text())
    large = json.loads((planned["cwd"] / "plan-4GB.json").read_text())
    assert any(c["strategy"] != "resident" for c in small["choice"]["components"].values())
    assert small["predicted"]["host_ram_bytes"] > 0
    assert small["predicted"]["card_peak_bytes"] < large["predicted"]["card_peak_bytes"]


def test_plan_estimate_and_show_print_the_same_prediction(planned, budget="2GB"):
    estimate_line = _ok(planned[f"text {budget}"]).splitlines()[0]
    assert estimate_line.startswith("predicted: card peak ")
    shown = _ok(planned[f"show {budget}"])
    table = shown.splitlines().index(next(line for line in shown.splitlines() if line.startswith("component ")))
    assert shown.splitlines()[table].split()[:2] == ["component", "class"]
    assert {line.split()[0] for line in shown.splitlines()[table + 1:table + 4]} == {"text_encoder", "unet", "vae"}
    assert estimate_line in shown.splitlines()
    planned_out = _ok(planned["plan"][budget])
    assert estimate_line in planned_out.splitlines()
    assert f"wrote plan-{budget}.json" in planned_out


def test_show_prints_gpu_workload_budgets_binding_and_lossy(planned, budget="2GB"):
    saved = json.loads((planned["cwd"] / f"plan-{budget}.json").read_text())
    lines = _ok(planned[f"show {budget}"]).splitlines()
    assert lines[0] == "StableDiffusionPipeline on rtx-4090 (GeForce RTX 4090, 24.00 GiB; given); device cuda"
    assert lines[1] == "workload: 512x512, 50 steps, batch 1, CFG batched x2, 77 text tokens, float16"
    card, host = saved["predicted"]["card_peak_bytes"], saved["predicted"]["host_ram_bytes"]
    assert lines[2] == (f"VRAM budget: 2GB = 1.86 GiB; card peak {card / 2**30:.2f} GiB = "
                        f"{100 * card / 2e9:.0f}% of it")
    assert lines[3].startswith(f"host RAM budget: 64GB = 59.60 GiB; host RAM ") and f"{100 * host / 64e9:.0f}% of it" in lines[3]
    assert lines[4].startswith("binding: ") and lines[5].startswith("lossy: ")
    marked = [line for line in lines if line.startswith("*[")]
    assert len(marked) == 1  # the chosen plan, among the alternatives


def test_estimate_says_whether_the_plan_fits_the_budget_and_the_card(planned):
    own = _ok(planned["text 2GB"]).splitlines()
    assert own[1].startswith("fits the plan's budget: card peak ") and own[1].endswith("of 1.86 GiB")
    assert own[2].startswith("fits the card (rtx-4090): card peak ")
    smaller = _ok(planned["text 2GB at 1GB"]).splitlines()
    assert smaller[1].startswith("does NOT fit the budget 1GB: card peak ") and smaller[1].endswith("of 953.7 MiB")


def test_every_option_of_every_command_states_its_default():
    def actions(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from actions(sub)
            elif action.option_strings and action.dest != "help":
                yield action

    missing = [a.option_strings[0] for a in actions(build_parser())
               if "default" not in (a.help or "") and "required" not in (a.help or "")]
    assert missing == []


# ---------------------------------------------------------------- the other commands, --help

COMMANDS = sorted(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)


@pytest.fixture(scope="module")
def listings(cwd) -> dict:
    runs = {"gpus": ["gpus"], "zoo": ["zoo"], "--help": ["--help"]}
    runs.update({f"{c} --help": [c, "--help"] for c in COMMANDS})
    return memplan_many(runs, cwd)


def test_gpus_lists_the_table(listings):
    rows = _ok(listings["gpus"]).splitlines()
    names = [r.split()[0] for r in rows]
    assert "rtx-4090" in names and "h100" in names
    assert all("GiB" in r and "TFLOP/s" in r for r in rows)


def test_zoo_lists_the_builtin_pipelines(listings):
    names = _ok(listings["zoo"]).split()
    assert {"sd15", "sdxl-base", "flux-dev"} <= set(names)


def test_the_top_level_help_names_every_command(listings):
    out = _ok(listings["--help"])
    assert all(c in out for c in COMMANDS)
    assert {"plan", "estimate", "show", "gpus", "zoo"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(listings, command):
    result = listings[f"{command} --help"]
    out = _ok(result)
    assert out.startswith(f"usage: memplan {command}")
    assert "example" in out  # every command's help ends with an example
    assert result.stderr == ""


# ---------------------------------------------------------------- bad input: exit 2, one line, no traceback

BAD = {  # case → (args, what the one stderr line must name)
    "bad budget": (["plan", "sd15", "--budget", "8XB", "--gpu", "rtx-4090"], "size '8XB' is not understood"),
    "bad ram": (["plan", "sd15", "--budget", "8GB", "--gpu", "rtx-4090", "--ram", "lots"],
                "size 'lots' is not understood"),
    "unknown model": (["plan", "no-such-model", "--budget", "8GB", "--gpu", "rtx-4090"],
                      "model 'no-such-model' is neither a zoo name"),
    "unknown gpu": (["plan", "sd15", "--budget", "8GB", "--gpu", "rtx-9999"], "unknown GPU 'rtx-9999'"),
    "missing plan (estimate)": (["estimate", "sd15", "--plan", "missing.json"], "cannot read plan missing.json"),
    "missing plan (show)": (["show", "missing.json"], "cannot read plan missing.json"),
    "impossible budget": (["plan", "sd15", "--budget", "1MB", "--gpu", "rtx-4090", "--ram", "64GB", "--trials", "20"],
                          "no plan fits"),
    "plan for another model": (["estimate", "sd15", "--plan", "flux.json", "--gpu", "rtx-4090"],
                               "plan is for FluxPipeline, the pipeline is StableDiffusionPipeline"),
    "plan without a gpu": (["estimate", "sd15", "--plan", "flux.json"], "the plan names no GPU: pass --gpu"),
    "not a plan": (["show", "not-a-plan.json"], "cannot read plan not-a-plan.json"),
    "estimate checks the plan's classes": (
        ["estimate", "sd15", "--plan", "flux-classes.json", "--gpu", "rtx-4090"], "plan is for FluxPipeline"),
    "negative height on estimate": (["estimate", "sd15", "--plan", "plan-4GB.json", "--height", "-8"], "height=-8"),
    "zero steps on estimate": (["estimate", "sd15", "--plan", "plan-4GB.json", "--steps", "0"],
                               "num_inference_steps=0"),
    "output is a directory": (["plan", "sd15", "--budget", "4GB", "--gpu", "rtx-4090", "--ram", "64GB",
                               "--trials", "5", "-o", "."], "output '.' is a directory"),
    "unknown device": (["plan", "sd15", "--budget", "4GB", "--gpu", "rtx-4090", "--device", "tpu"],
                       "device 'tpu' is not supported"),
    "bad storage": (["plan", "sd15", "--budget", "4GB", "--gpu", "rtx-4090", "--ram", "64GB",
                     "--storage", "nosuchdb://x"], "storage 'nosuchdb://x' cannot be opened"),
    "zero trials": (["plan", "sd15", "--budget", "4GB", "--gpu", "rtx-4090", "--ram", "64GB", "--trials", "0"],
                    "n_trials=0 is not valid"),
}


FLUX_PLAN = {"schema_version": 1, "pipeline_class": "FluxPipeline",
             "components": {n: {} for n in ("vae", "text_encoder", "text_encoder_2", "transformer")},
             "choice": {"components": {n: {} for n in ("vae", "text_encoder", "text_encoder_2", "transformer")}}}
FLUX_CLASSES_ON_SD15_NAMES = {  # sd15's component names, another pipeline's classes and config hash
    "schema_version": 1, "pipeline_class": "FluxPipeline",
    "components": {"vae": {"class": "AutoencoderTiny"}, "text_encoder": {"class": "T5EncoderModel"},
                   "unet": {"class": "FluxTransformer2DModel", "config_hash": "0123456789abcdef"}},
    "choice": {"components": {"vae": {}, "text_encoder": {}, "unet": {}}}}
@pytest.fixture(scope="module")
def bad_runs(cwd, planned) -> dict:  # after `planned`: sd15's profile is cached
    (cwd / "not-a-plan.json").write_text("{not json")
    (cwd / "flux.json").write_text(json.dumps(FLUX_PLAN))
    (cwd / "flux-classes.json").write_text(json.dumps(FLUX_CLASSES_ON_SD15_NAMES))
    runs = {case: args for case, (args, _) in BAD.items()}
    runs["debug"] = ["--debug", *BAD["bad budget"][0]]
    return memplan_many(runs, cwd)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_naming_it(bad_runs, case):
    result, named = bad_runs[case], BAD[case][1]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memplan: error: ") and named in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_impossible_budget_names_the_smallest_that_fits(bad_runs):
    line = bad_runs["impossible budget"].stderr
    assert "the smallest achievable card peak is" in line and "Raise the budget" in line


def test_debug_shows_the_traceback(bad_runs):
    result = bad_runs["debug"]
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "ArgumentError: size '8XB' is not understood" in result.stderr
