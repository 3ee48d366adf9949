"""benchmarks/coverage.py's machinery on a few classes (the sweep itself is a benchmark, not a test): which classes
are in scope, the model folder written for a class, failures and time limits kept to their row, the share."""

import inspect
import json

import diffusers
import pytest

from benchmarks import coverage
from benchmarks.coverage import Case, Row


@pytest.mark.parametrize("name, output, inputs, kind", [
    ("FluxPipeline", "image", (), "text-to-image"),
    ("WanPipeline", "video", (), "text-to-video"),
    ("FluxImg2ImgPipeline", "image", ("image",), "image-to-image"),
    ("WanVideoToVideoPipeline", "video", ("video",), "video-to-video"),
    ("StableDiffusionInpaintPipeline", "image", ("image", "mask_image"), "image-to-image"),
    ("DDPMPipeline", "image", (), "noise-to-image"),
])
def test_scope_reads_the_output_and_the_inputs_from_the_call(name, output, inputs, kind):
    cls = getattr(diffusers, name)
    prompted = "prompt" in inspect.signature(cls.__call__).parameters
    case = Case(name, coverage._output_kind(cls), coverage._needed_inputs(cls), prompted)
    assert (case.output, case.inputs, case.kind) == (output, inputs, kind)


@pytest.mark.parametrize("name", ["StableAudioPipeline", "KandinskyV22PriorPipeline", "MarigoldDepthPipeline"])
def test_pipelines_that_make_no_image_are_out_of_scope(name):
    assert coverage._output_kind(getattr(diffusers, name)) is None  # audio, image embeddings, depth maps


def _index(folder):
    return json.loads((folder / "model_index.json").read_text())


def test_a_variant_borrows_its_family_from_the_zoo(tmp_path):
    where = coverage.write_folder(Case("FluxImg2ImgPipeline", "image", ("image",)), tmp_path)
    assert where == "flux-dev + zoo x4, defaults x0"
    index = _index(tmp_path)
    assert index["_class_name"] == "FluxImg2ImgPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["image_encoder"] == [None, None]  # flux-dev's repo has none
    t5 = json.loads((tmp_path / "text_encoder_2" / "config.json").read_text())
    assert t5["d_model"] == 4096  # the zoo's full-size T5-XXL, not transformers' default t5-small
    assert not (tmp_path / "tokenizer").exists()  # tokenizers: named, no files


def test_without_a_family_encoders_come_from_the_zoo_and_models_from_their_defaults(tmp_path):
    where = coverage.write_folder(Case("PixArtSigmaPipeline", "image"), tmp_path)
    assert where == "zoo x1, defaults x2"
    index = _index(tmp_path)
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]  # optional, but built: no entry leaves it out
    assert index["scheduler"] == ["diffusers", coverage.KARRAS_DEFAULT]  # hinted as KarrasDiffusionSchedulers
    assert json.loads((tmp_path / "transformer" / "config.json").read_text()) == {
        "_class_name": "PixArtTransformer2DModel"}  # from_config fills the class defaults


def test_a_failing_class_is_a_row_with_its_reason(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    row = coverage.run_case(Case("FluxPipeline", "image"), tmp_path, n_trials=1)
    assert not row.plan_ok and row.all_traced is None
    assert row.error.split(":")[0].endswith("Error") and "config.json is missing" in row.error  # type, then why


def test_the_time_limit_stops_one_class_not_the_sweep(tmp_path):
    cases = [Case("FluxPipeline", "image"), Case("NoSuchPipeline", "image")]
    rows = list(coverage.sweep(cases, jobs=1, timeout_s=0.5, n_trials=1, work=tmp_path))
    assert [r.pipeline for r in rows] == ["FluxPipeline", "NoSuchPipeline"]
    assert rows[0].error == "time limit: over 0 s" and not rows[0].plan_ok  # killed, and the sweep went on
    assert rows[1].error.startswith("folder not written: AttributeError")


def test_the_share_counts_planned_and_fully_traced_over_all_classes():
    rows = [Row("A", "text-to-image", components={"unet": 30}, all_traced=True, plan_ok=True, offloaded=["unet"]),
            Row("B", "text-to-video", components={"transformer": 50}, untraced=["transformer"], all_traced=False,
                plan_ok=True),
            Row("C", "image-to-image", error="TypeError: boom"),
            Row("D", "image-to-image", components={"vae": 1}, all_traced=True, plan_ok=True, budget_raised=True)]
    text = coverage.table(rows, {"E": "its call returns ['audios']"})
    assert "**Planned with every called component traced: 2/4 (50%)**" in text
    assert "- text/noise-to-x: 1/2; plan ok 2/2" in text and "- conditioned: 1/2; plan ok 1/2" in text
    assert "| B | text-to-video |  | transformer (50) | no (not: transformer) | yes | none |" in text
    assert "| D | image-to-image |  | vae (1) | yes | yes | none (budget raised) |" in text
    assert "- E: its call returns ['audios']" in text
