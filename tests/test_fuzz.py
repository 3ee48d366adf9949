"""Fuzzing the three loaders of user input: the size parser, the GPU-spec file loader and the plan file loader.

Property: whatever goes in, only memplan's own exceptions come out (MemplanError; HardwareError for specs,
PlanError for plans); what is accepted is well-formed. Inputs: arbitrary Python values and text for sizes; arbitrary
bytes, arbitrary JSON, and a valid file with one value replaced by arbitrary JSON or one key deleted, for the files.

CI runs FUZZ_EXAMPLES examples per test (default 150: well under 60 s here); a longer run:
    MEMPLAN_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import tempfile
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_WORKLOAD, build_tiny
from cost_models import HardwareSpec, get_gpu
from cost_models.hardware import save_spec
from planner.errors import HardwareError, MemplanError, PlanError
from planner.plan import Plan
from planner.units import parse_size

FUZZ_EXAMPLES = int(os.environ.get("MEMPLAN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_DIR = Path(tempfile.mkdtemp(prefix="memplan-fuzz-"))

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


# ---------------------------------------------------------------- sizes

SIZE_INPUTS = (st.text(max_size=30) | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
               | st.none() | st.lists(st.integers(), max_size=2) | st.decimals(allow_nan=True)
               | st.fractions() | st.integers(-2**62, 2**62).map(np.int64)
               | st.from_regex(r"\s*\d{1,30}(\.\d{1,30})?\s*([kKmMgGtT]i?[bB]|[bB])?\s*", fullmatch=True))


@FUZZ
@given(SIZE_INPUTS)
def test_parse_size_raises_only_memplan_errors(value):
    try:
        n_bytes = parse_size(value)
    except MemplanError:
        return
    assert type(n_bytes) is int and n_bytes >= 0
    assert not isinstance(value, (bool, list, type(None)))
    if isinstance(value, (float, Decimal, Fraction)):
        assert n_bytes == value  # a whole number of bytes, taken as it is


@FUZZ
@given(st.integers(0, 10**6), st.sampled_from(["kB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_parse_size_units(number, unit):
    scale = {"kB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    assert parse_size(f"{number}{unit}") == parse_size(f" {number} {unit.lower()} ") == number * scale


# ---------------------------------------------------------------- files: arbitrary bytes, JSON, one-value mutations

def _write(name: str, content: bytes) -> Path:
    path = _DIR / name
    path.write_bytes(content)
    return path


def _paths(value, prefix=()):
    """Every (path, value) inside a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, prefix + (i,))


@st.composite
def mutations(draw, valid: dict):
    """`valid` with one value (anywhere) replaced by arbitrary JSON, or one key deleted."""
    data = json.loads(json.dumps(valid))
    path = draw(st.sampled_from([p for p in _paths(data) if p]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return data


def _file_contents(valid: dict):
    as_bytes = lambda value: json.dumps(value, allow_nan=True).encode()  # noqa: E731
    return (st.binary(max_size=200) | JSON.map(as_bytes) | mutations(valid).map(as_bytes)
            | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")))


VALID_SPEC = get_gpu("rtx-4090").to_dict()


@FUZZ
@given(_file_contents(VALID_SPEC))
def test_gpu_spec_loader_raises_only_hardware_errors(content):
    path = _write("spec.json", content)
    try:
        spec = get_gpu(str(path))
    except HardwareError as err:
        assert str(path) in str(err)
        return
    assert isinstance(spec, HardwareSpec) and spec.vram_bytes > 0


def test_a_saved_spec_loads_back():
    save_spec(get_gpu("rtx-4090"), _DIR / "ok.json")
    assert get_gpu(str(_DIR / "ok.json")) == get_gpu("rtx-4090")


@pytest.fixture(scope="module")
def valid_plan() -> dict:
    from planner.optimizer import plan_for

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMPLAN_CACHE", str(_DIR / "cache"))
        return plan_for(build_tiny("flux"), "8GB", gpu="rtx-4090", device="cpu", n_trials=4,
                        **TINY_WORKLOAD).to_dict()


def test_plan_loader_raises_only_plan_errors(valid_plan):
    @FUZZ
    @given(_file_contents(valid_plan))
    def check(content):
        path = _write("plan.json", content)
        try:
            plan = Plan.load(path)
        except PlanError as err:
            assert str(path) in str(err)
            return
        assert isinstance(plan, Plan)
        plan.summary()  # an accepted plan can be used
        Plan.from_dict(json.loads(json.dumps(plan.to_dict())))

    check()
