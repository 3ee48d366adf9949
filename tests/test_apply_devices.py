"""Applying a several-GPU placement (planner/apply_devices.py): on the CPU where it runs (two "cards" that are
both the CPU), and with the CUDA-only calls recorded (mocked) to assert the exact placement and hooks."""

from __future__ import annotations

import logging

import pytest
import torch

from planner.apply_devices import IO_HOOK, CrossDeviceIOHook, apply_placement, home_device
from planner.placement import Placement
from planner.strategy import BLOCK_LEVEL, GROUP_OFFLOAD, MODEL_OFFLOAD, Choice, ComponentPlan, PlanError
from planner.tiny import tiny_call_kwargs, tiny_flux_pipeline


def placement(pipe, devices: dict[str, int], **plans) -> Placement:
    comps = {n: plans.get(n, ComponentPlan()) for n in devices}
    return Placement(devices, Choice(comps), None)


def run(pipe):
    with torch.no_grad():
        return pipe(**tiny_call_kwargs(pipe, seed=0)).images


SPLIT = {"vae": 0, "text_encoder": 0, "text_encoder_2": 1, "transformer": 1}


def test_a_placement_on_two_cpu_devices_runs_and_matches_the_unplaced_pipeline():
    reference = run(tiny_flux_pipeline(seed=0))
    pipe = tiny_flux_pipeline(seed=0)
    block = ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1)
    apply_placement(pipe, placement(pipe, {**SPLIT, "text_encoder_2": 0}, transformer=block), ["cpu", "cpu"])
    assert torch.equal(run(pipe), reference)


def test_the_io_hook_moves_inputs_to_its_card_and_outputs_home():
    hook = CrossDeviceIOHook("meta", "cpu")
    args, kwargs = hook.pre_forward(None, torch.ones(2), x=torch.zeros(3))
    assert args[0].device.type == "meta" and kwargs["x"].device.type == "meta"
    back = CrossDeviceIOHook("cpu", "meta").post_forward(None, (torch.ones(2), {"y": torch.ones(1)}))
    assert back[0].device.type == "meta" and back[1]["y"].device.type == "meta"


def test_on_cuda_each_component_goes_to_its_card_with_the_io_hook_where_it_is_away(monkeypatch):
    """The CUDA calls are recorded, not made: `.to(device)` per component and group offloading's onload device."""
    pipe = tiny_flux_pipeline(seed=0)
    moves, groups = [], []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append((type(self).__name__, a)) or self)
    monkeypatch.setattr("planner.apply_devices._apply_group",
                        lambda module, name, plan, device, _dir: groups.append((name, device)))
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("cuda:0")))
    block = ComponentPlan(GROUP_OFFLOAD, BLOCK_LEVEL, 1)
    split = placement(pipe, SPLIT, transformer=block)
    assert home_device(pipe, split) == 1  # the first group-offloaded component's card, as diffusers decides
    with pytest.raises(PlanError, match="vae is called through decode"):
        apply_placement(pipe, split)
    split = placement(pipe, {**SPLIT, "vae": 1}, transformer=block)
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: torch.device("cuda:1")))
    apply_placement(pipe, split)
    assert groups == [("transformer", "cuda:1")]
    assert sorted(moves) == sorted([("AutoencoderKL", ("cuda:1",)), ("CLIPTextModel", ("cuda:0",)),
                                    ("T5EncoderModel", ("cuda:1",))])
    hooks = {n: getattr(m, "_diffusers_hook", None) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    io = {n: r.get_hook(IO_HOOK) for n, r in hooks.items() if r is not None and r.get_hook(IO_HOOK) is not None}
    assert list(io) == ["text_encoder"]
    assert (io["text_encoder"].device, io["text_encoder"].home) == (torch.device("cuda:0"), torch.device("cuda:1"))


def test_a_device_mapped_pipeline_is_reset_with_a_warning(caplog):
    pipe = tiny_flux_pipeline(seed=0)
    pipe.hf_device_map = {"transformer": "cpu"}
    with caplog.at_level(logging.WARNING, logger="planner.apply_devices"):
        apply_placement(pipe, placement(pipe, {n: 0 for n in SPLIT}), ["cpu"])
    assert pipe.hf_device_map is None and "reset_device_map()" in caplog.text


def test_pipeline_wide_offload_and_missing_devices_are_refused():
    pipe = tiny_flux_pipeline(seed=0)
    wide = {n: ComponentPlan(MODEL_OFFLOAD) for n in SPLIT}
    with pytest.raises(PlanError, match="pipeline-wide on one card"):
        apply_placement(pipe, placement(pipe, SPLIT, **wide), ["cpu", "cpu"])
    with pytest.raises(PlanError, match="only 1 devices were given"):
        apply_placement(pipe, placement(pipe, SPLIT), ["cpu"])
