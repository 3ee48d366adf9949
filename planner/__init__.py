"""memplan: choose and apply the fastest memory plan for a diffusers pipeline that fits a VRAM budget.

Public names load lazily (PEP 562), so `cost_models` can import `planner.profiler` without a cycle.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "optimize": "planner.optimizer", "plan_for": "planner.optimizer", "Plan": "planner.plan",
    "Profile": "planner.profiler", "profile": "planner.profiler", "Choice": "planner.strategy",
    "ComponentPlan": "planner.strategy",
    "parse_size": "planner.units", "Workload": "planner.workload", "UntracedCallError": "planner.discovery",
    **{name: "planner.errors" for name in ("MemplanError", "ArgumentError", "PlanError", "WorkloadError",
                                           "HardwareError", "DeviceError", "UnsupportedError", "BudgetError")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'planner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
