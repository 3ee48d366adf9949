"""Benchmarks on CPU: a smoke sweep with tiny pipelines, failures as rows, the GPU check's dry run, reports."""

import dataclasses
import json

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.report import load_rows, write_report
from benchmarks.runner import _phase_times, read_rows, reference_choice, run_scenario, run_scenarios
from benchmarks.scenarios import (BARE, REFERENCE_PLANS, Scenario, load_scenarios, resolve, save_scenarios, smoke)
from conftest import TINY_WORKLOAD, build_tiny
from planner.cli import main as cli_main
from planner.optimizer import plan_for
from planner.profiler import profile
from planner.sources import from_pipeline
from planner.strategy import BLOCK_LEVEL, GROUP_OFFLOAD, LEAF_LEVEL, RESIDENT

PNG = "data:image/png;base64,"


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    """One optimized plan (tiny Flux under a binding budget) and one reference (tiny SDXL all resident)."""
    folder = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core CI box: threads only add contention
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MEMPLAN_CACHE", str(folder / "cache"))
            scenarios = [s for s in smoke() if s.name in ("tiny-flux-opt-400kB", "tiny-sdxl-resident")]
            rows = run_scenarios(scenarios, folder / "rows.jsonl")
    finally:
        torch.set_num_threads(threads)
    return folder, rows


def test_smoke_rows_hold_predicted_and_measured(smoke_rows):
    folder, rows = smoke_rows
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["message"] for r in rows]
    assert read_rows(folder / "rows.jsonl") == json.loads(json.dumps(rows, default=str))
    assert (folder / "rows.csv").is_file()
    opt, ref = rows
    assert opt["plan_kind"] == "optimize" and opt["alternatives"]
    assert opt["budget_met_pred"] and opt["pred_card_peak_bytes"] <= 400_000
    assert ref["plan_desc"].count("resident") == 4 and not ref["budget_met_pred"]
    for r in rows:
        assert r["meas_allocated_peak_bytes"] is None and r["meas_card_peak_bytes"] is None  # CPU: no VRAM
        assert r["meas_total_s"] > 0 and r["extrap_total_s"] > r["meas_total_s"]  # 2 of 4 steps measured
        assert r["measured_on"].startswith("cpu") and r["pred_for"] == "rtx-4090"
        assert not r["time_compared"] and r["err_time_pct"] is None  # CPU seconds vs a GPU prediction: no error
        assert {e[1] for e in r["meas_timeline"]} == {"encode", "denoise", "decode"}
        assert r["steps_measured"] == 2 and r["steps_full"] == 4
        assert set(r["meas_phase_s"]) == {"encode", "denoise", "decode"}


def test_failures_become_rows(tmp_path):
    rows = {s.name: run_scenario(s) for s in (
        Scenario("no-plan-file", "tiny-sdxl", plan=str(tmp_path / "missing.json")),
        Scenario("needs-cuda", "tiny-flux", plan="model_offload"),
        Scenario("too-small", "tiny-sdxl", budget=1000, gpu_overrides=BARE, n_trials=10, workload=TINY_WORKLOAD),
        Scenario("unknown-pipeline", "no-such-model"),
    )}
    assert rows["no-plan-file"]["status"] == "plan_error"
    assert rows["needs-cuda"]["status"] == "skipped" and "CUDA" in rows["needs-cuda"]["message"]
    assert rows["too-small"]["status"] == "budget_error" and "smallest achievable" in rows["too-small"]["message"]
    assert rows["unknown-pipeline"]["status"] == "error" and "no-such-model" in rows["unknown-pipeline"]["message"]


def test_scenarios_json_and_builtins(tmp_path):
    path = tmp_path / "s.json"
    save_scenarios(smoke(), path)
    assert load_scenarios(path) == smoke()
    path.write_text(json.dumps({"defaults": {"device": "cpu"}, "scenarios": [{"name": "a", "pipeline": "tiny-flux"}]}))
    assert resolve(str(path))[0].device == "cpu"
    with pytest.raises(ValueError, match="unknown keys"):
        Scenario.from_dict({"name": "a", "pipeline": "tiny-flux", "budjet": "8GB"})
    with pytest.raises(ValueError, match="not 'optimize'"):
        Scenario("a", "tiny-flux", plan="fastest")
    with pytest.raises(ValueError, match="built-in set"):
        resolve("no-such-set")
    gpu = resolve("gpu")
    assert {s.device for s in gpu} == {"cuda"} and {s.plan for s in gpu} >= set(REFERENCE_PLANS)


def test_reference_choices_fall_back_and_clamp():
    source = from_pipeline(build_tiny("flux"))
    prof = profile(source, **TINY_WORKLOAD)
    block4 = reference_choice("group_block_4", prof).components
    assert block4["transformer"].offload_type == BLOCK_LEVEL
    assert block4["transformer"].num_blocks_per_group == prof.components["transformer"].max_blocks == 2
    # CLIP: its 2 nested layers are blocks (planner.grouping), so n is clamped to 2 there too
    assert (block4["text_encoder"].offload_type, block4["text_encoder"].num_blocks_per_group) == (BLOCK_LEVEL, 2)
    no_blocks = dataclasses.replace(prof.components["text_encoder"], blocks=(), block_lists={})
    bare = dataclasses.replace(prof, components={**prof.components, "text_encoder": no_blocks})
    assert reference_choice("group_block_4", bare).components["text_encoder"].offload_type == LEAF_LEVEL
    assert {p.strategy for p in reference_choice("all_resident", prof).components.values()} == {RESIDENT}
    assert reference_choice("group_leaf_stream", prof).components["vae"].strategy == GROUP_OFFLOAD


def test_denoise_is_scaled_from_the_measured_steps():
    # 2 measured steps of a 10-step call: the first (1.0 s, one-off onloads) counts once, the later mean 9 times.
    events = [["text_encoder", "encode", 0.0, 0.2, None], ["transformer", "denoise", 0.2, 1.2, None],
              ["transformer", "denoise", 1.2, 1.7, None], ["vae", "decode", 1.7, 2.0, None]]
    out = _phase_times(events, steps=2, full_steps=10)
    assert out["meas_phase_s"] == pytest.approx({"encode": 0.2, "denoise": 1.5, "decode": 0.3})  # measured only
    assert out["meas_step_s"] == pytest.approx(0.5)
    assert out["meas_total_s"] == pytest.approx(0.2 + 1.5 + 0.3)
    assert out["extrap_phase_s"]["denoise"] == pytest.approx(1.0 + 9 * 0.5)  # its own column
    assert out["extrap_total_s"] == pytest.approx(0.2 + 5.5 + 0.3)


def test_gpu_check_dry_run(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    for name in ("rows.jsonl", "rows.csv", "report.html", "env.json", "log.txt"):
        assert (tmp_path / name).is_file(), name
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["dry_run"] and env["calibration"].startswith("skipped") and env["torch"] == torch.__version__
    rows = read_rows(tmp_path / "rows.jsonl")
    assert len(rows) >= 10
    assert all(r["status"] == "ok" for r in rows), [(r["scenario"], r["message"]) for r in rows if r["status"] != "ok"]
    assert any(r["pipeline"].endswith("tiny-flux-bf16") for r in rows)  # the full-size build path, on a folder


def test_report_renders_tables_and_figures(smoke_rows, tmp_path):
    folder, _ = smoke_rows
    out = write_report(folder / "rows.jsonl", tmp_path / "report.html")
    text = out.read_text()
    assert "<table" in text and "Summary" in text and "budget met" in text
    assert "<th>pred for</th>" in text and "<th>measured on</th>" in text
    assert "<th>err time %</th>" not in text  # measured on this CPU, predicted for an rtx-4090: never compared
    assert "<th>extrap s (full steps)</th>" in text and " MB" not in text and " GB" not in text
    assert text.count(PNG) >= 2
    md = write_report(folder / "rows.jsonl", tmp_path / "report.md", markdown=True)
    assert "| scenario |" in md.read_text() and len(list(tmp_path.glob("report-*.png"))) >= 2


def test_report_of_a_plan_alone(tmp_path, bare_gpu):
    plan = plan_for(build_tiny("sdxl"), "2MB", gpu=bare_gpu, device="cpu", n_trials=30, **TINY_WORKLOAD)
    plan.save(tmp_path / "plan.json")
    assert load_rows(tmp_path / "plan.json")[0]["status"] == "planned"
    assert cli_main(["report", str(tmp_path / "plan.json"), "-o", str(tmp_path / "plan.html")]) == 0
    text = (tmp_path / "plan.html").read_text()
    assert "Alternatives" in text and "Pareto" in text and text.count(PNG) >= 1


def test_cli_bench_then_report(tmp_path, capsys):
    scenarios = tmp_path / "s.json"
    scenarios.write_text(json.dumps([{"name": "sdxl-block1", "pipeline": "tiny-sdxl", "plan": "group_block_1",
                                      "budget": "1MB", "workload": TINY_WORKLOAD, "measured_steps": 1}]))
    assert cli_main(["bench", str(scenarios), "-o", str(tmp_path / "rows.jsonl")]) == 0
    assert read_rows(tmp_path / "rows.jsonl")[0]["status"] == "ok"
    assert cli_main(["report", str(tmp_path / "rows.jsonl"), "-o", str(tmp_path / "r.md"), "--md"]) == 0
    assert (tmp_path / "r.md").is_file()
    assert cli_main(["bench", "no-such-set"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_smoke_measures_vram(tmp_path):
    scenarios = [Scenario(f"cuda-{ref}", "tiny-flux", budget="1GB", plan=ref, device="cuda",
                          workload={**TINY_WORKLOAD, "max_sequence_length": 16}, gpu_overrides=BARE)
                 for ref in ("all_resident", "model_offload", "group_leaf_stream")]
    rows = run_scenarios(scenarios, tmp_path / "rows.jsonl")
    assert [r["status"] for r in rows] == ["ok"] * 3, [r["message"] for r in rows]
    assert all(r["meas_allocated_peak_bytes"] > 0 and r["err_peak_pct"] is not None for r in rows)


def test_materialize_fills_weights_and_keeps_real_buffers(tmp_path):
    from benchmarks.runner import materialize, write_model_folder
    from planner.sources import load_source

    folder = write_model_folder(build_tiny("sdxl"), tmp_path / "tiny-sdxl", dtype="float16")
    source = load_source(folder)
    enc = materialize(source.components["text_encoder"], "cpu", seed=0)
    ids = next(b for n, b in enc.named_buffers() if n.endswith("position_ids"))
    assert torch.equal(ids, torch.arange(ids.shape[-1]).expand_as(ids))  # a real buffer, not empty memory
    weights = [p for p in enc.parameters()]
    assert all(p.device.type == "cpu" and p.dtype == torch.float16 for p in weights)
    assert 0.01 < torch.cat([p.float().flatten() for p in weights]).std() < 0.03  # N(0, 0.02)


def test_report_draws_cuda_measurements(smoke_rows, tmp_path):
    """The GPU rows' branches (measured VRAM, per-call peaks, measured points on the Pareto plot), from smoke rows
    given hand-made CUDA measurements: the report must render them without a GPU."""
    _, rows = smoke_rows
    fake = []
    for r in rows:
        peaks = r["pred_phase_peak_bytes"]
        fake.append({**r, "device": "cuda", "memory_fraction": 0.5,
                     "meas_allocated_peak_bytes": int(r["pred_allocated_peak_bytes"] * 0.9),
                     "meas_card_peak_bytes": int(r["pred_card_peak_bytes"] * 1.1),
                     "meas_phase_peak_bytes": {p: int(v * 0.9) for p, v in peaks.items()},
                     "meas_timeline": [[n, p, s, e, int(peaks[p] * 0.8)] for n, p, s, e, _ in r["meas_timeline"]],
                     "err_peak_pct": 11.1, "budget_met": True, "measured_on": "NVIDIA GeForce RTX 4090",
                     "measured_total_bytes": 25_393_692_672, "time_compared": True, "err_time_pct": 5.0})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fake))
    text = write_report(path, tmp_path / "report.html").read_text()
    assert text.count(PNG) == 3 and "meas card" in text and "err peak %" in text


def test_seconds_are_compared_only_on_the_card_they_were_predicted_for():
    from benchmarks.runner import same_device
    from cost_models import get_gpu

    table, total = get_gpu("rtx-4090"), 25_393_692_672
    on = {"measured_on": "NVIDIA GeForce RTX 4090", "measured_total_bytes": total}
    assert same_device(table, on)
    assert not same_device(get_gpu("h100"), on)
    assert not same_device(table, {"measured_on": "cpu (x86_64)", "measured_total_bytes": None})
    calibrated = dataclasses.replace(table, name="my-card", source="calibrate() on NVIDIA RTX PRO 4500 Blackwell")
    assert same_device(calibrated, {"measured_on": "NVIDIA RTX PRO 4500 Blackwell", "measured_total_bytes": 3 * 10**10})
    assert not same_device(calibrated, on)


def test_measured_run_is_recorded_in_the_study_it_was_planned_in(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'runs.db'}"
    scenario = Scenario("tiny-flux-stored", "tiny-flux", budget="400kB", workload=dict(TINY_WORKLOAD,
                        max_sequence_length=16), gpu_overrides=BARE, n_trials=20, storage=storage)
    row = run_scenario(scenario)
    assert row["status"] == "ok" and row["recorded_in"] == storage
    # planning searched a lossless and a lossy study; the run is recorded once, in the one its plan came from
    measured = [t for summary in optuna.get_all_study_summaries(storage)
                for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials
                if t.user_attrs.get("measured")]
    assert len(measured) == 1 and measured[0].value == pytest.approx(row["extrap_total_s"])
