"""Which devices a plan may name, and whether this machine has them: checked before anything is touched.

A plan's device is "cpu", "cuda" or "cuda:N". `check_device_name` checks the spelling (plan files, arguments);
`check_device_available` checks this process can use it (apply, and optimize when it applies), so that a plan for
CUDA on a torch without CUDA is refused instead of "applying" hooks that fail on every call.
"""

from __future__ import annotations

import re

from planner.errors import DeviceError

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d{1,4})?)$")
_ACCEPTED = "'cuda' (or 'cuda:N') or 'cpu'"


def check_device_name(device, where: str = "device") -> str:
    """`device` if it is spelled as a plan device, else DeviceError naming `where`."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise DeviceError(f"{where} {device!r} is not supported: give {_ACCEPTED}")
    return device


def check_device_available(device: str) -> str:
    """`device` if this process can place tensors there, else DeviceError saying what is missing."""
    import torch

    check_device_name(device)
    if device == "cpu":
        return device
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU visible"
        raise DeviceError(f"device {device!r}: this torch ({torch.__version__}, {build}) has no CUDA device; run "
                          "on a machine with a GPU, or plan and apply with device='cpu'")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def check_not_meta(components: dict) -> None:
    """DeviceError naming the components whose weights are on `meta` (no data): those cannot be applied or run."""
    on_meta = [name for name, module in components.items()
               if any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])]
    if on_meta:
        raise DeviceError(f"{', '.join(on_meta)}: weights on the meta device (no data) cannot be applied or run; "
                          "load the pipeline with its weights (meta is for planning: optimize(..., apply=False))")
