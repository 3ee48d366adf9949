"""The one GPU-name resolver: any common spelling of a card to its key in `hardware.GPUS`.

Accepted spellings, all case-, space-, dash- and underscore-insensitive:
    table keys                      "rtx-4090", "a100-pcie-80gb", "h100"
    datasheet names                 "GeForce RTX 4090", "RTX 6000 Ada Generation", "H100 PCIe"
    torch.cuda.get_device_name()    "NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"
    short forms                     "4090", "rtx4090", "a100", "h100-sxm", "4060ti"

A name is read as one model token ("4090", "a100", "l40s"), qualifiers ("ti", "super", "pcie", "sxm", "ada")
and at most a size ("80gb"). A card matches when its model token is the name's, every qualifier it requires is
there, the name carries no qualifier the card does not allow ("Laptop", "NVL", "D" make other cards), and the
size (from the name, or the card's memory when detected) is within 10% of the card's. Where two cards remain
(a100: 40 or 80 GB), the one marked `default` is taken and a warning names the others. Torch-free: the CUDA
detection that feeds `total_bytes` lives in the optimizer.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass

from planner.errors import HardwareError

logger = logging.getLogger(__name__)

__all__ = ["CARDS", "Card", "lookup", "match", "suggest"]

# Words of marketing names that say nothing about which card it is.
_NOISE = {"nvidia", "geforce", "tesla", "quadro", "gpu", "graphics", "card", "generation", "rtx", "gtx",
          "hbm2", "hbm2e", "hbm3", "hbm3e", "gddr6", "gddr6x", "gddr7"}
_FORM_ALIASES = {"sxm4": "sxm", "sxm5": "sxm", "sxm6": "sxm", "pci": "pcie"}
_SIZE_RE = re.compile(r"^(\d+)(?:gb|g|gib)$")
_SIZE_TOLERANCE = 0.1  # a "16gb" name or a card holding 16 GiB +-10% (drivers reserve some, ECC takes a share)


@dataclass(frozen=True)
class Card:
    """How a table entry is named: its datasheet `label`, the model token, the qualifiers a name must carry
    (`required`) and may carry (`optional`, e.g. the default form factor), and whether it is the one taken when
    a name fits it and a sibling equally (`default`)."""

    label: str
    model: str
    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    default: bool = False


def _card(label: str, model: str, required: str = "", optional: str = "", default: bool = False) -> Card:
    return Card(label, model, frozenset(required.split()), frozenset(optional.split()), default)


# One row per hardware.GPUS key (a test keeps the two in step).
CARDS: dict[str, Card] = {
    "rtx-2080-ti": _card("GeForce RTX 2080 Ti", "2080", "ti"),
    "rtx-3060-12gb": _card("GeForce RTX 3060 12GB", "3060"),
    "rtx-3080": _card("GeForce RTX 3080 10GB", "3080"),
    "rtx-3080-ti": _card("GeForce RTX 3080 Ti", "3080", "ti"),
    "rtx-3090": _card("GeForce RTX 3090", "3090"),
    "rtx-4060-8gb": _card("GeForce RTX 4060", "4060"),
    "rtx-4060-ti-8gb": _card("GeForce RTX 4060 Ti 8GB", "4060", "ti", default=True),
    "rtx-4060-ti-16gb": _card("GeForce RTX 4060 Ti 16GB", "4060", "ti"),
    "rtx-4070-12gb": _card("GeForce RTX 4070", "4070"),
    "rtx-4070-ti-super": _card("GeForce RTX 4070 Ti SUPER", "4070", "ti super"),
    "rtx-4080": _card("GeForce RTX 4080", "4080"),
    "rtx-4080-super": _card("GeForce RTX 4080 SUPER", "4080", "super"),
    "rtx-4090": _card("GeForce RTX 4090", "4090"),
    "rtx-5070-ti": _card("GeForce RTX 5070 Ti", "5070", "ti"),
    "rtx-5080": _card("GeForce RTX 5080", "5080"),
    "rtx-5090": _card("GeForce RTX 5090", "5090"),
    "rtx-a6000": _card("RTX A6000", "a6000"),
    "rtx-6000-ada": _card("RTX 6000 Ada Generation", "6000", "ada"),
    "t4": _card("Tesla T4", "t4"),
    "a10g": _card("A10G", "a10g"),
    "l4": _card("L4", "l4"),
    "l20": _card("L20", "l20"),
    "l40s": _card("L40S", "l40s"),
    "a100-40gb": _card("A100 40GB", "a100", optional="sxm pcie"),
    "a100-80gb": _card("A100 SXM4 80GB", "a100", optional="sxm", default=True),
    "a100-pcie-80gb": _card("A100 PCIe 80GB", "a100", "pcie"),
    "h100": _card("H100 SXM5 80GB", "h100", optional="sxm"),
    "h100-pcie": _card("H100 PCIe 80GB", "h100", "pcie"),
    "h200": _card("H200 SXM 141GB", "h200", optional="sxm"),
    "b200": _card("B200 180GB", "b200", optional="sxm"),
}


@dataclass(frozen=True)
class _Name:
    model: str | None
    qualifiers: frozenset[str]
    size_gib: int | None


def _split(token: str) -> list[str]:
    """"rtx4090" -> ["4090"], "4060ti" -> ["4060", "ti"], "6000ada" -> ["6000", "ada"]; "a100", "l40s" stay."""
    token = re.sub(r"^(?:rtx|gtx)(?=[a-z]?\d)", "", token)
    m = re.fullmatch(r"(\d+)([a-z]+)", token)
    if m and not _SIZE_RE.match(token):
        return [m.group(1), m.group(2)]
    return [token]


def _parse(text: str) -> _Name:
    tokens = [t for raw in re.split(r"[^a-z0-9]+", text.lower()) if raw for t in _split(raw)]
    tokens = [_FORM_ALIASES.get(t, t) for t in tokens if t not in _NOISE]
    sizes = [int(m.group(1)) for t in tokens if (m := _SIZE_RE.match(t))]
    words = [t for t in tokens if not _SIZE_RE.match(t)]
    model = next((t for t in words if any(c.isdigit() for c in t)), None)
    return _Name(model, frozenset(t for t in words if t != model), sizes[0] if len(sizes) == 1 else None)


def _size_fits(vram_bytes: int, gib: float) -> bool:
    card_gib = vram_bytes / 2**30
    return abs(card_gib - gib) <= _SIZE_TOLERANCE * card_gib


def _candidates(name: _Name, total_bytes: int | None) -> list[str]:
    from cost_models.hardware import GPUS

    out = []
    for key, card in CARDS.items():
        if card.model != name.model or not card.required <= name.qualifiers:
            continue
        if name.qualifiers - card.required - card.optional:
            continue
        vram = GPUS[key].vram_bytes
        if name.size_gib is not None and not _size_fits(vram, name.size_gib):
            continue
        if total_bytes is not None and not _size_fits(vram, total_bytes / 2**30):
            continue
        out.append(key)
    return out


def match(text: str, total_bytes: int | None = None) -> str | None:
    """The GPUS key of the card `text` names (any spelling in the module docstring), or None.

    `total_bytes` is the card's memory when it is known (detection): a card whose memory is more than 10% off is
    another card (an RTX 3080 12GB is not the 10GB entry). Of several cards that fit, the one requiring the most
    of the name's qualifiers wins ("a100 pcie" -> a100-pcie-80gb); a tie goes to the `default` card, with a
    warning naming the others."""
    from cost_models.hardware import GPUS

    key = text.strip().lower().replace(" ", "-").replace("_", "-")
    if key in GPUS and (total_bytes is None or _size_fits(GPUS[key].vram_bytes, total_bytes / 2**30)):
        return key
    name = _parse(text)
    found = _candidates(name, total_bytes)
    if not found:
        return None
    most = max(len(CARDS[k].required) for k in found)
    found = [k for k in found if len(CARDS[k].required) == most]
    if len(found) == 1:
        return found[0]
    chosen = next((k for k in found if CARDS[k].default), None)
    if chosen is None:
        return None
    others = ", ".join(k for k in found if k != chosen)
    logger.warning("GPU name %r fits several cards: taking %s (%s); name %s for another", text, chosen,
                   CARDS[chosen].label, others)
    return chosen


def suggest(text: str, n: int = 3) -> list[str]:
    """Table keys close to `text`: cards with the same model token first, then by spelling (difflib)."""
    name = _parse(text)
    same_model = [k for k, c in CARDS.items() if name.model and c.model == name.model]
    spellings = {k: k for k in CARDS} | {re.sub(r"[^a-z0-9]+", "-", c.label.lower()): k for k, c in CARDS.items()}
    typed = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    close = [spellings[s] for s in difflib.get_close_matches(typed, list(spellings), n=2 * n, cutoff=0.5)]
    return list(dict.fromkeys(same_model + close))[:n]


def lookup(text: str, total_bytes: int | None = None) -> str:
    """Like `match`, but an unknown name is a HardwareError that suggests the nearest names."""
    key = match(text, total_bytes)
    if key is not None:
        return key
    near = suggest(text)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise HardwareError(f"unknown GPU {text!r}: {hint}`memplan gpus` lists the table ({len(CARDS)} cards); "
                        "or pass the path of a .json spec from cost_models.calibrate.calibrate() (see save_spec)")
