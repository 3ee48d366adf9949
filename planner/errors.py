"""memplan's exceptions: one base, one subclass per kind of bad input. Torch-free, imported from anywhere.

Every error memplan raises on purpose is a `MemplanError` and names the offender and the fix. They are
`ValueError`s so that code written against the older `except ValueError` keeps working; a caller that wants
only memplan's own refusals catches `MemplanError`.
"""

from __future__ import annotations


class MemplanError(ValueError):
    """Base of every error memplan raises on purpose (bad input, nothing fits, unsupported target)."""


class ArgumentError(MemplanError):
    """A bad argument to a public function or the CLI: wrong type, out of range, unknown name."""


class PlanError(MemplanError):
    """A plan that diffusers would reject or rewrite, that does not fit the pipeline, or a malformed plan file."""


class WorkloadError(MemplanError):
    """A workload the pipeline cannot run: sizes not a multiple of its factor, frames for an image pipeline,
    zero or absurd steps or batch."""


class HardwareError(MemplanError):
    """A GPU spec that cannot be used: unknown name, unreadable or malformed spec file."""


class DeviceError(MemplanError):
    """A device that is not there (cuda on a torch without CUDA, cuda:7 on a one-GPU machine, meta weights)."""


class UnsupportedError(MemplanError):
    """Something memplan does not do (yet), said so instead of guessed."""


class BudgetError(MemplanError):
    """No plan in the space fits the budgets; carries the smallest achievable peak and its plan."""

    def __init__(self, message: str, min_card_bytes: int, min_host_bytes: int, min_choice):
        super().__init__(message)
        self.min_card_bytes, self.min_host_bytes, self.min_choice = min_card_bytes, min_host_bytes, min_choice

    def __reduce__(self):  # picklable (Optuna workers, multiprocessing) although __init__ takes four arguments
        return type(self), (str(self), self.min_card_bytes, self.min_host_bytes, self.min_choice)


__all__ = ["ArgumentError", "BudgetError", "DeviceError", "HardwareError", "MemplanError", "PlanError",
           "UnsupportedError", "WorkloadError"]
