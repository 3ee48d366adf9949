"""Shared fixtures: tiny real pipelines built in code (no downloads) and a GPU spec without fixed overheads."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from cost_models import get_gpu
from planner.tiny import tiny_call_kwargs, tiny_flux_pipeline, tiny_sdxl_pipeline

logging.getLogger("diffusers").setLevel(logging.ERROR)

TINY_BUILDERS = {"flux": tiny_flux_pipeline, "sdxl": tiny_sdxl_pipeline}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny_kind(request) -> str:
    return request.param


def build_tiny(kind: str, seed: int = 0):
    return TINY_BUILDERS[kind](seed=seed)


def run_tiny(pipe, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**tiny_call_kwargs(pipe, seed=seed)).images


@pytest.fixture
def bare_gpu():
    """rtx-4090 figures with no CUDA context and no allocator overhead, so tiny models can fill a budget."""
    return dataclasses.replace(get_gpu("rtx-4090"), context_bytes=0, reserved_over_allocated=1.0)


@pytest.fixture
def pretend_cuda(monkeypatch):
    """A machine with one CUDA device, as far as memplan's device checks can tell: for tests that check the calls
    into diffusers/accelerate on device "cuda" with those calls mocked (nothing here has a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


TINY_WORKLOAD = dict(height=32, width=32, num_inference_steps=2)
