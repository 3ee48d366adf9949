"""Several GPUs (cost_models/devices.py, planner/placement.py, planner/crossing.py): each card priced by the
single-card model, the cross-card copies priced in one place, placements searched within every card's budget."""

from __future__ import annotations

import dataclasses

import pytest

from cost_models import estimate, get_gpu
from cost_models.devices import (DeviceSet, estimate_placement, execution_device, staged_bytes_per_s, sub_choice,
                                 sub_profile, transfer_s)
from planner.crossing import io_bytes, module_order
from planner.placement import assignments, place
from planner.profiler import profile
from planner.search import BudgetError, Budgets, search
from planner.sources import from_pipeline
from planner.space import SearchSpace
from planner.strategy import Choice, ComponentPlan
from planner.tiny import tiny_flux_pipeline

EXACT = SearchSpace(allow_lossy=False)  # no fp8, no tiling: without host RAM only residency remains
WORK = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16)


@pytest.fixture(scope="module")
def tiny():
    source = from_pipeline(tiny_flux_pipeline(seed=0))
    prof = profile(source, **WORK)
    return prof, source.components, io_bytes(prof)


def bare(name: str = "rtx-4060-ti-16gb"):
    return dataclasses.replace(get_gpu(name), context_bytes=0, reserved_over_allocated=1.0)


def resident(prof) -> Choice:
    return Choice({n: ComponentPlan() for n in prof.components})


def test_a_text_encoders_io_bytes_are_its_ids_in_and_states_out(tiny):
    prof, modules, io = tiny
    te = modules["text_encoder"]  # CLIP: ids [1, 77] int64 in; last_hidden_state [1, 77, h] + pooled [1, h] out
    length, hidden = te.config.max_position_embeddings, te.config.hidden_size  # the pipeline pads to 77
    assert io["text_encoder"] == 8 * length + 4 * length * hidden + 4 * hidden


def test_staged_copy_and_the_transfer_term_by_hand(tiny):
    prof, _, io = tiny
    a, b = bare("rtx-4060-ti-16gb"), bare("rtx-4090")
    assert staged_bytes_per_s(a, b) == pytest.approx(1 / (1 / a.d2h_bytes_per_s + 1 / b.h2d_pinned_bytes_per_s))
    devices = DeviceSet((a, b), (10**9, 10**9))
    placement = {n: 0 for n in prof.components} | {"transformer": 1}
    order = list(prof.components)
    assert execution_device(order, placement, resident(prof)) == placement[order[0]] == 0
    calls = prof.components["transformer"].calls_per_run
    expected = calls * io["transformer"] / staged_bytes_per_s(a, b)
    assert transfer_s(prof, placement, resident(prof), devices, io) == pytest.approx(expected) and expected > 0
    assert transfer_s(prof, {n: 0 for n in prof.components}, resident(prof), devices, io) == 0.0
    with pytest.raises(ValueError, match="transformer runs on cuda:1.*unknown"):
        transfer_s(prof, placement, resident(prof), devices, {})


def test_the_execution_device_follows_the_pipelines_component_order():
    """diffusers' `_execution_device`: the first group-offloaded component's card, else the first component's,
    in the order the built pipeline lists them (a zoo folder's model_index.json is alphabetical)."""
    from planner.strategy import GROUP_OFFLOAD, LEAF_LEVEL

    names = ["text_encoder", "text_encoder_2", "unet", "vae"]
    order = module_order("StableDiffusionXLPipeline", names)
    assert order == ["vae", "text_encoder", "text_encoder_2", "unet"]
    assert list(tiny_flux_pipeline(seed=0).components)[0] == module_order("FluxPipeline", ["transformer", "vae"])[0]
    placement = {"vae": 1, "text_encoder": 0, "text_encoder_2": 0, "unet": 0}
    plain = Choice({n: ComponentPlan() for n in names})
    assert execution_device(order, placement, plain) == 1
    grouped = Choice({**plain.components, "unet": ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL)})
    assert execution_device(order, placement, grouped) == 0


def test_each_card_is_priced_as_the_single_card_model_prices_its_components(tiny):
    prof, _, io = tiny
    devices = DeviceSet((bare(), bare()), (10**9, 10**9))
    placement = {"text_encoder": 0, "text_encoder_2": 0, "vae": 0, "transformer": 1}
    est = estimate_placement(prof, resident(prof), placement, devices, io)
    for index, names in ((0, ["text_encoder", "text_encoder_2", "vae"]), (1, ["transformer"])):
        alone = estimate(sub_profile(prof, names), sub_choice(resident(prof), names), devices.specs[index])
        assert est.per_device[index] == alone
    assert est.total_s == pytest.approx(sum(e.total_s for e in est.per_device) + est.transfer_s)


def test_mirror_images_on_identical_cards_are_priced_once(tiny):
    prof, _, _ = tiny
    names = list(prof.components)
    same = list(assignments(names, DeviceSet((bare(), bare()), (10**9, 10**9))))
    assert len(same) == (2 ** len(names)) // 2  # every split once, its mirror not again
    assert len(list(assignments(names, DeviceSet((bare(), bare()), (10**9, 10**8))))) == 2 ** len(names)


def test_a_pipeline_that_fits_two_cards_but_no_single_one_is_placed(tiny):
    """No host RAM to offload into and no lossy knobs: one card must hold everything resident; the budget is one
    byte short of that, so no single card fits, and the placement must split the pipeline across both."""
    prof, _, io = tiny
    spec = bare()
    whole = estimate(prof, resident(prof), spec).card_peak_bytes
    budget = whole - 1
    with pytest.raises(BudgetError):
        search(prof, spec, Budgets(budget, 0), space=EXACT, n_trials=8)
    devices = DeviceSet((spec, spec), (budget, budget))
    best = place(prof, devices, 0, io, space=EXACT)
    assert set(best.devices.values()) == {0, 1}
    for index, est in enumerate(best.estimate.per_device):
        assert est is not None and est.card_peak_bytes <= devices.vram_bytes[index]
    assert best.estimate.host_ram_bytes == 0 and best.estimate.transfer_s > 0


def test_every_card_keeps_its_own_budget(tiny):
    """A big card and a small one: whatever the placement puts on each fits that card's own budget."""
    prof, _, io = tiny
    spec = bare()
    whole = estimate(prof, resident(prof), spec).card_peak_bytes
    small = max(estimate(sub_profile(prof, [n]), sub_choice(resident(prof), [n]), spec).card_peak_bytes
                for n in prof.components)  # the largest single component just fits the small card
    devices = DeviceSet((spec, spec), (whole - 1, small))
    best = place(prof, devices, 0, io, space=EXACT)
    for est, budget in zip(best.estimate.per_device, devices.vram_bytes):
        assert est is None or est.card_peak_bytes <= budget
    assert best.estimate.per_device[1] is not None  # the small card had to take something
    with pytest.raises(BudgetError, match="no placement"):
        place(prof, DeviceSet((spec, spec), (small - 1, small - 1)), 0, io, space=EXACT)


@pytest.mark.slow
def test_sdxl_at_1024_fits_two_8gb_cards_and_no_single_one():
    """Full-size SDXL-base (fp16, 6.9 GB of weights) at 1024², no host RAM to offload into, no lossy knobs."""
    from planner.sources import load_source

    source = load_source("sdxl-base")
    prof = profile(source)
    spec, budget = get_gpu("rtx-4060-8gb"), 8 * 10**9
    with pytest.raises(BudgetError):
        search(prof, spec, Budgets(budget, 0), space=EXACT, n_trials=8)
    best = place(prof, DeviceSet((spec, spec), (budget, budget)), 0, io_bytes(prof), space=EXACT)
    assert best.devices["unet"] != best.devices["text_encoder_2"]
    assert all(e is not None and e.card_peak_bytes <= budget for e in best.estimate.per_device)


def test_loader_arguments_put_resident_components_on_their_card_and_offloaded_ones_on_the_cpu(tiny):
    from planner.placement import Placement, loader_arguments
    from planner.strategy import GROUP_OFFLOAD, LEAF_LEVEL

    prof, _, _ = tiny
    choice = Choice({**resident(prof).components, "text_encoder_2": ComponentPlan(GROUP_OFFLOAD, LEAF_LEVEL)})
    devices = {"text_encoder": 0, "text_encoder_2": 0, "vae": 1, "transformer": 1}
    args = loader_arguments(Placement(devices, choice, None))
    assert args == {"text_encoder": {"subfolder": "text_encoder", "device_map": {"": "cuda:0"}},
                    "text_encoder_2": {"subfolder": "text_encoder_2"},
                    "vae": {"subfolder": "vae", "device_map": {"": "cuda:1"}},
                    "transformer": {"subfolder": "transformer", "device_map": {"": "cuda:1"}}}
