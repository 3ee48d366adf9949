"""The groups diffusers' block_level group offloading forms in a module, worked out without applying it.

`layout(module)` mirrors diffusers 0.42's `_apply_group_offloading_block_level` walk: at each level, a child
named in `block_modules` is walked the same way (recursively, with the same names), a ModuleList/Sequential child
gives one block per entry (chunked by num_blocks_per_group at apply time), and what is left at that level (other
children, the level's own tensors) is that level's "unmatched" group, held for the level's whole forward.

Which `block_modules` to pass: for diffusers models memplan passes nothing and diffusers' default stands (their
top-level ModuleLists, or the modules they name in `_group_offload_block_modules`, e.g. the VAE's encoder/decoder).
transformers text encoders (T5, UMT5, CLIP) keep their layers deeper (`encoder.block`, `text_model.encoder.layers`),
so block_level would make one group of the whole encoder; memplan points `block_modules` at the path to the
largest nested list, so each layer is a block and can be streamed or kept resident like a denoiser's.

Which levels hold an unmatched group matters with streams. A level with one gets a
`LazyPrefetchGroupOffloadingHook`: on the first forward it records the order of the group-hooked modules below it
(through `layer_execution_tracker` hooks it registers at apply time) and chains them for prefetch, each group's
pre-forward issuing the next one's copy and waiting for its own. So each block list needs exactly one such level
among its parent and the parent's ancestors: with none, its groups are never chained and each copies itself on
the side stream and is never waited for (a race on CUDA, as we read diffusers 0.42); with two, both register a tracker on the same blocks and diffusers
raises ("Hook with name layer_execution_tracker already exists"; seen here with T5 and block_modules=["encoder"]).
memplan picks the level that keeps that group, deepest first (the smallest group held for the whole forward), and
makes every other child of the other levels on the path a block module of its own (T5's `shared`, CLIP's
`text_projection`): walked as a level, a leaf module becomes its own small synchronous group, and a level all of
whose children are block modules has no unmatched group. A layout that still breaks the rule, or that reaches more
than that one list, is not used (the component keeps diffusers' default: one group).

What this cannot see: a level whose forward reads a child's weights outside the child's own forward (it would
find them offloaded). The encoders laid out here call their children (checked on CPU for T5 and CLIP by the
residency tests' WeightPlacement); on a GPU such a read fails loudly with a device mismatch, never silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_LISTS = (torch.nn.ModuleList, torch.nn.Sequential)


@dataclass(frozen=True)
class GroupLayout:
    """Where block_level group offloading puts a module's tensors."""

    block_modules: tuple[str, ...] | None  # passed to apply_group_offloading (None: diffusers' default)
    lists: dict[str, tuple[str, ...]]  # FQN of each block list -> FQNs of its blocks, in module order
    unmatched_owners: tuple[str, ...]  # FQNs of the modules that hold an unmatched group ("" = the module itself)

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(name for blocks in self.lists.values() for name in blocks)


def _walk(module: torch.nn.Module, names: frozenset[str], prefix: str, lists: dict, owners: list) -> None:
    """diffusers' block_level walk; records the block lists and the levels that get an unmatched group."""
    grouped: set[str] = set()
    unmatched = False
    for name, child in module.named_children():
        if name in names:
            _walk(child, names, f"{prefix}{name}.", lists, owners)
            grouped.add(name)
        elif isinstance(child, _LISTS):
            lists[f"{prefix}{name}"] = tuple(f"{prefix}{name}.{i}" for i in range(len(child)))
            grouped.add(name)
        else:
            unmatched = True  # diffusers makes the group even for a child without tensors
    loose = [n for n, _ in [*module.named_parameters(), *module.named_buffers()] if n.split(".")[0] not in grouped]
    if unmatched or loose:
        owners.append(prefix.removesuffix("."))


def _layout_with(module: torch.nn.Module, block_modules: tuple[str, ...] | None) -> GroupLayout:
    names = block_modules if block_modules is not None else getattr(module, "_group_offload_block_modules", None)
    lists: dict[str, tuple[str, ...]] = {}
    owners: list[str] = []
    _walk(module, frozenset(names or ()), "", lists, owners)
    return GroupLayout(block_modules, lists, tuple(owners))


def _below(name: str, ancestor: str) -> bool:
    return name != ancestor and (ancestor == "" or name.startswith(ancestor + "."))


def _streams_safe(groups: GroupLayout) -> bool:
    """Each block list is chained for prefetch by exactly one level, and no level with an unmatched group is above
    another one that has group-hooked modules below it (see the module docstring)."""
    owners = groups.unmatched_owners
    hooked = [*owners, *groups.block_names]
    nested = any(_below(inner, outer) and any(_below(h, inner) for h in hooked) for outer in owners for inner in owners)
    return not nested and all(sum(_below(fqn, o) for o in owners) == 1 for fqn in groups.lists)


def _largest_nested_list(module: torch.nn.Module) -> str | None:
    candidates = [(sum(p.numel() * p.element_size() for p in sub.parameters()), name)
                  for name, sub in module.named_modules() if name and isinstance(sub, _LISTS) and len(sub)]
    return max(candidates)[1] if candidates else None


def _pointing_inside(module: torch.nn.Module, list_fqn: str, owner_level: int) -> tuple[str, ...]:
    """block_modules that reach `list_fqn` (the path to its parent) and leave an unmatched group at most at path
    level `owner_level` (0: the module itself): every other child of the other levels is a block module too."""
    steps = list_fqn.split(".")
    names = list(steps[:-1])
    level = module
    for depth, step in enumerate(steps):
        if depth != owner_level:
            names += [n for n, _ in level.named_children() if n not in names and n != step]
        level = getattr(level, step)
    return tuple(names)


def layout(module: torch.nn.Module) -> GroupLayout:
    """The block_level layout memplan applies to `module` (see the module docstring for the choice)."""
    own = _layout_with(module, None)
    if own.lists or hasattr(module, "enable_group_offload"):  # a diffusers model: diffusers' own grouping stands
        return own
    nested = _largest_nested_list(module)
    if nested is None or "." not in nested:
        return own
    for owner_level in reversed(range(nested.count(".") + 1)):
        inside = _layout_with(module, _pointing_inside(module, nested, owner_level))
        # exactly that list: a model of several towers (Qwen2.5-VL: vision + language) keeps one group, as its
        # outer forwards may use an inner tower's modules outside that tower's forward
        if set(inside.lists) == {nested} and _streams_safe(inside):
            return inside
    logger.debug("%s: no block_modules reach %s with one prefetch level; one group", type(module).__name__, nested)
    return own


def block_names(module: torch.nn.Module) -> list[str]:
    """FQNs of the blocks block_level group offloading forms in `module` (memplan's layout), in module order."""
    return list(layout(module).block_names)


def group_of(groups: GroupLayout, tensor_fqn: str) -> str:
    """The group a parameter or buffer lands in: its block, else the innermost level holding an unmatched group."""
    for block in groups.block_names:
        if tensor_fqn.startswith(block + "."):
            return block
    owners = [o for o in groups.unmatched_owners if o == "" or tensor_fqn.startswith(o + ".")]
    return "unmatched:" + max(owners, key=len, default="")
