"""Cost models: peak VRAM and host RAM (memory.py), seconds (time.py), GPUs (hardware.py), all priced by estimate()."""

from cost_models.estimate import Estimate, card_bytes, estimate
from cost_models.hardware import GPUS, HardwareSpec, get_gpu

__all__ = ["Estimate", "GPUS", "HardwareSpec", "card_bytes", "estimate", "get_gpu"]
