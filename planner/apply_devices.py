"""Apply a several-GPU placement (planner/placement.py) to a loaded pipeline.

Each component goes to its card: fp8 storage first (as the single-card apply does), then group offloading with
that card as onload device, or `.to(card)` when resident. The pipeline creates latents and embeddings on
`_execution_device`, which diffusers takes from the first group-offloaded component's onload device, else from
the first component; a component on another card gets a hook (diffusers' HookRegistry, name `IO_HOOK`) that
moves its inputs to its card and its outputs back to the execution device, the copies `cost_models/devices.py`
prices. After applying, `_execution_device` is checked to be the card the pricing assumed.

Not expressible: accelerate's model/sequential CPU offload is pipeline-wide on one card (refused); a VAE is
called through `decode`, not `forward`, so it must run on the execution device (refused otherwise; the
placement search never proposes it).
"""

from __future__ import annotations

import logging

import torch
from diffusers.hooks import HookRegistry, ModelHook

from cost_models.devices import execution_device
from planner.apply import _apply_group, _apply_storage, _apply_vae, _components, _Snapshot, remove_hooks
from planner.strategy import GROUP_OFFLOAD, PlanError

logger = logging.getLogger(__name__)

IO_HOOK = "memplan_cross_device_io"
DIRECT_METHOD_COMPONENTS = ("vae",)  # called through decode/encode: a forward hook would never see the inputs


class CrossDeviceIOHook(ModelHook):
    """Inputs to the component's card, outputs back to the pipeline's execution device."""

    def __init__(self, device: str, home: str):
        super().__init__()
        self.device, self.home = torch.device(device), torch.device(home)

    def pre_forward(self, module, *args, **kwargs):
        from accelerate.utils import send_to_device

        return send_to_device(args, self.device), send_to_device(kwargs, self.device)

    def post_forward(self, module, output):
        from accelerate.utils import send_to_device

        return send_to_device(output, self.home)


def home_device(pipe, placement) -> int:
    """The device index `_execution_device` will report once the placement is applied."""
    return execution_device(list(_components(pipe)), placement.devices, placement.choice)


def check_placement(pipe, placement, devices: list[str]) -> None:
    comps = _components(pipe)
    if set(comps) != set(placement.devices):
        raise PlanError(f"placement components {sorted(placement.devices)} do not match the pipeline's {sorted(comps)}")
    if placement.choice.pipeline_strategy is not None:
        raise PlanError(f"{placement.choice.pipeline_strategy} is pipeline-wide on one card in diffusers; a placement "
                        "on several cards uses group offloading within each card")
    missing = {n: d for n, d in placement.devices.items() if d >= len(devices)}
    if missing:
        raise PlanError(f"placement uses device indices {missing} but only {len(devices)} devices were given")
    home = home_device(pipe, placement)
    for name in DIRECT_METHOD_COMPONENTS:
        if name in placement.devices and torch.device(devices[placement.devices[name]]) != torch.device(devices[home]):
            raise PlanError(f"{name} is called through decode(), not forward(): it must run on the execution device "
                            f"{devices[home]}, not {devices[placement.devices[name]]}")


def apply_placement(pipe, placement, devices: list[str] | None = None) -> None:
    """Move each component of `pipe` to its card and offload within it as `placement` says.

    `devices` names the cards (default "cuda:0", "cuda:1", ...). A device-mapped pipeline (`hf_device_map`, from
    `from_pretrained(device_map=...)`) is reset first with `reset_device_map()`, with a warning. On failure the
    pipeline is put back as it was."""
    n = max(placement.devices.values()) + 1
    devices = devices or [f"cuda:{i}" for i in range(n)]
    check_placement(pipe, placement, devices)
    if getattr(pipe, "hf_device_map", None):
        logger.warning("the pipeline is device-mapped (%s): reset_device_map() moves it to the CPU before the placement "
                       "is applied", pipe.hf_device_map)
        pipe.reset_device_map()
    remove_hooks(pipe)
    snapshot = _Snapshot(pipe)
    try:
        _place(pipe, placement, devices)
    except Exception:
        snapshot.restore(pipe)
        raise
    _check_execution_device(pipe, devices[home_device(pipe, placement)])


def _place(pipe, placement, devices: list[str]) -> None:
    home = devices[home_device(pipe, placement)]
    for name, module in _components(pipe).items():
        plan, device = placement.choice.components[name], devices[placement.devices[name]]
        _apply_storage(module, plan)
        if plan.strategy == GROUP_OFFLOAD:
            _apply_group(module, name, plan, device, None)
        else:
            module.to(device)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(IO_HOOK) is not None:
            registry.remove_hook(IO_HOOK, recurse=False)
        if torch.device(device) != torch.device(home):
            registry.register_hook(CrossDeviceIOHook(device, home), IO_HOOK)
    _apply_vae(pipe, placement.choice)


def _check_execution_device(pipe, home: str) -> None:
    if torch.device(pipe._execution_device) != torch.device(home):
        raise PlanError(f"after the placement diffusers' _execution_device is {pipe._execution_device}, not {home}: "
                        "the pipeline's components order differs from the one priced")
