"""GPU names: every spelling people use resolves to one table key; near misses get suggestions; with CUDA present
and no gpu given, the card in use is detected (CUDA mocked here)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from cost_models.gpu_names import CARDS, lookup, match, suggest
from cost_models.hardware import GPUS, get_gpu
from planner import optimizer

GIB = 2**30


def test_every_table_entry_has_a_name_and_back():
    assert set(CARDS) == set(GPUS)
    for key, card in CARDS.items():
        assert match(key) == key
        assert match(card.label) == key, card.label
        assert match(card.label, GPUS[key].vram_bytes) == key, card.label  # as detection sees it


@pytest.mark.parametrize("device_name,gib,key", [  # exactly as torch.cuda.get_device_name() / total_memory give them
    ("NVIDIA GeForce RTX 4090", 23.6, "rtx-4090"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", 39.4, "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", 79.2, "a100-pcie-80gb"),
    ("NVIDIA H100 80GB HBM3", 79.2, "h100"),
    ("NVIDIA H100 PCIe", 79.2, "h100-pcie"),
    ("NVIDIA H200", 140.4, "h200"),
    ("NVIDIA B200", 179.1, "b200"),
    ("NVIDIA L4", 22.0, "l4"),
    ("NVIDIA L40S", 44.4, "l40s"),
    ("NVIDIA L20", 44.4, "l20"),
    ("NVIDIA RTX 6000 Ada Generation", 47.5, "rtx-6000-ada"),
    ("NVIDIA RTX A6000", 47.5, "rtx-a6000"),
    ("NVIDIA GeForce RTX 2080 Ti", 10.7, "rtx-2080-ti"),
    ("NVIDIA GeForce RTX 3080", 9.8, "rtx-3080"),
    ("NVIDIA GeForce RTX 3080 Ti", 11.8, "rtx-3080-ti"),
    ("NVIDIA GeForce RTX 4060 Ti", 7.6, "rtx-4060-ti-8gb"),
    ("NVIDIA GeForce RTX 4060 Ti", 15.6, "rtx-4060-ti-16gb"),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", 15.6, "rtx-4070-ti-super"),
    ("NVIDIA GeForce RTX 4080 SUPER", 15.6, "rtx-4080-super"),
    ("NVIDIA GeForce RTX 5070 Ti", 15.5, "rtx-5070-ti"),
    ("NVIDIA GeForce RTX 5080", 15.5, "rtx-5080"),
    ("NVIDIA GeForce RTX 5090", 31.4, "rtx-5090"),
    ("Tesla T4", 14.6, "t4"),
    ("NVIDIA A10G", 22.1, "a10g"),
])
def test_torch_device_names_resolve(device_name, gib, key):
    assert match(device_name, int(gib * GIB)) == key
    if key != "rtx-4060-ti-16gb":  # without its memory, a 4060 Ti is taken as the 8 GB one (with a warning)
        assert match(device_name) == key


@pytest.mark.parametrize("device_name,gib", [  # other cards: never filed as a table card they resemble
    ("NVIDIA GeForce RTX 4090 Laptop GPU", 15.6),
    ("NVIDIA GeForce RTX 4090 D", 23.6),
    ("NVIDIA GeForce RTX 4070 SUPER", 11.6),
    ("NVIDIA GeForce RTX 4070 Ti", 11.6),
    ("NVIDIA H100 NVL", 93.0),
    ("NVIDIA GeForce RTX 3080", 11.7),  # the 12 GB 3080: the table holds the 10 GB one
    ("Quadro RTX 6000", 23.6),
    ("NVIDIA GeForce RTX 4090", 47.5),  # a modded card: its memory is not a 4090's
])
def test_cards_not_in_the_table_are_not_matched(device_name, gib):
    assert match(device_name, int(gib * GIB)) is None


@pytest.mark.parametrize("text,key", [
    ("4090", "rtx-4090"), ("rtx4090", "rtx-4090"), ("RTX 4090", "rtx-4090"), ("rtx_4090", "rtx-4090"),
    ("GeForce RTX 4090", "rtx-4090"), ("h100-sxm", "h100"), ("H100 SXM5", "h100"), ("h100 pcie", "h100-pcie"),
    ("rtx-4060", "rtx-4060-8gb"), ("4060ti 16gb", "rtx-4060-ti-16gb"), ("4060-ti-16GB", "rtx-4060-ti-16gb"),
    ("a100 pcie", "a100-pcie-80gb"), ("a100-40gb", "a100-40gb"), ("A100 80GB", "a100-80gb"),
    ("6000ada", "rtx-6000-ada"), ("rtx-6000-ada", "rtx-6000-ada"), ("a6000", "rtx-a6000"),
    ("4080 super", "rtx-4080-super"), ("4080super", "rtx-4080-super"), ("l40s", "l40s"), ("L4", "l4"),
])
def test_short_and_datasheet_forms_resolve(text, key):
    assert match(text) == key
    assert get_gpu(text) is GPUS[key]


def test_an_ambiguous_short_form_takes_the_default_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="cost_models.gpu_names"):
        assert match("a100") == "a100-80gb"
    assert "a100-40gb" in caplog.text and "taking a100-80gb" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cost_models.gpu_names"):
        assert match("rtx-4090") == "rtx-4090"  # an exact key is never ambiguous
    assert caplog.text == ""


@pytest.mark.parametrize("text,expected", [
    ("rtx-4900", "rtx-4090"), ("rtx-4070-super", "rtx-4070-ti-super"), ("h10", "h100"), ("l40", "l40s"),
])
def test_did_you_mean(text, expected):
    assert match(text) is None
    assert expected in suggest(text)
    with pytest.raises(ValueError, match=rf"unknown GPU '{text}': did you mean [^?]*{expected}"):
        lookup(text)


def _mock_cuda(monkeypatch, name: str, total_bytes: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=total_bytes))


def test_detects_the_cuda_card_by_name_and_memory(monkeypatch, caplog):
    _mock_cuda(monkeypatch, "NVIDIA GeForce RTX 4060 Ti", int(15.6 * GIB))
    with caplog.at_level(logging.INFO, logger="planner.optimizer"):
        assert optimizer._detect_gpu() is GPUS["rtx-4060-ti-16gb"]
    assert "detected NVIDIA GeForce RTX 4060 Ti (15.60 GiB) -> table entry rtx-4060-ti-16gb" in caplog.text


def test_an_undetectable_card_is_named_not_guessed(monkeypatch):
    _mock_cuda(monkeypatch, "NVIDIA H100 NVL", int(93 * GIB))
    with pytest.raises(ValueError, match=r"'NVIDIA H100 NVL' \(93.00 GiB\) is not in the GPU table \(nearest: h100"):
        optimizer._detect_gpu()


def test_without_cuda_and_without_a_gpu_the_user_is_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no target GPU given and no CUDA GPU on this machine"):
        optimizer._detect_gpu()


def test_the_gpu_check_files_a_card_under_its_own_name(monkeypatch):
    from benchmarks import gpu_check

    _mock_cuda(monkeypatch, "NVIDIA H100 NVL", int(93 * GIB))  # not in the table: never filed as an h100
    card = gpu_check.detect_gpu()
    assert (card.device_name, card.slug, card.table_key) == ("NVIDIA H100 NVL", "nvidia-h100-nvl", None)
    _mock_cuda(monkeypatch, "NVIDIA H100 80GB HBM3", int(79.2 * GIB))
    assert gpu_check.detect_gpu() == gpu_check.Card("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3", "h100")
