"""benchmarks.published: a calibration row expressed as a memplan plan, and the accounting rules."""

import pytest

from benchmarks.published import Comparison, Unexpressible, row_plan, summary
from planner.strategy import GROUP_OFFLOAD, LEAF_LEVEL, MODEL_OFFLOAD, RESIDENT

NAMES = ["text_encoder", "text_encoder_2", "transformer", "vae"]


def _row(pipeline, components):
    return {"id": "X", "model": "flux-dev", "gpu": "h100", "workload": {},
            "setting": {"summary": "s", "diffusers": {"pipeline": pipeline, "components": components}}}


def test_pipeline_call_applies_to_every_component_and_fp8_is_kept():
    row = _row([{"call": "to", "device": "cuda"}],
               {"transformer": [{"call": "enable_layerwise_casting", "storage_dtype": "float8_e4m3fn",
                                 "compute_dtype": "bfloat16"}]})
    plan = row_plan(row, NAMES)
    assert plan.components == tuple(NAMES)
    assert plan.choice.components["transformer"].storage_dtype == "float8_e4m3fn"
    assert plan.choice.components["vae"].strategy == RESIDENT
    assert plan.category == "fp8"


def test_components_set_one_by_one_leave_the_unnamed_ones_out():
    row = _row([], {"text_encoder": [{"call": "to", "device": "cuda"}],
                    "transformer": [{"call": "enable_group_offload", "offload_type": "leaf_level",
                                     "use_stream": True, "offload_to_disk_path": "/d"}]})
    plan = row_plan(row, NAMES)
    assert plan.components == ("text_encoder", "transformer")
    t = plan.choice.components["transformer"]
    assert (t.strategy, t.offload_type, t.use_stream, t.offload_to_disk) == (GROUP_OFFLOAD, LEAF_LEVEL, True, True)
    assert plan.category == "offload"


def test_not_loaded_and_model_offload_and_slicing():
    row = _row([{"call": "enable_model_cpu_offload"}],
               {"text_encoder": [{"call": "not loaded (passed as None)"}], "vae": [{"call": "vae.enable_slicing"}]})
    plan = row_plan(row, NAMES)
    assert "text_encoder" not in plan.components
    assert plan.choice.components["transformer"].strategy == MODEL_OFFLOAD
    assert plan.choice.vae_slicing and plan.category == "vae"


def test_unknown_calls_are_refused_with_the_reason():
    with pytest.raises(Unexpressible, match="torch.compile"):
        row_plan(_row([{"call": "torch.compile"}], {}), NAMES)
    with pytest.raises(Unexpressible, match="unet"):
        row_plan(_row([{"call": "to"}], {"unet": [{"call": "to"}]}), NAMES)


def test_error_is_relative_to_the_published_figure_and_summary_skips_non_fitting_rows():
    a = Comparison("a", "time", "s", "m", published=10.0, predicted=12.0, category="resident", fit=True)
    b = Comparison("b", "time", "s", "m", published=10.0, predicted=5.0, category="offload", fit=True)
    c = Comparison("c", "time", "s", "m", published=1.0, predicted=9.0, category="offload", fit=False)
    assert a.error == pytest.approx(0.2) and b.error == pytest.approx(-0.5)
    got = summary([a, b, c])
    assert got[("all", "time")] == (2, pytest.approx(0.35), pytest.approx(0.5))
    assert got[("offload", "time")] == (1, pytest.approx(0.5), pytest.approx(0.5))
