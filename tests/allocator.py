"""The CPU allocator's own live-bytes curve of one call, rebuilt from torch.profiler's memory events (shared by the
accuracy tests).

Every c10 CPU allocation and free inside the call is recorded by Kineto with its size and pointer; the curve is
rebuilt from that event stream alone, so it shares nothing with memplan's tracer but the module code.

Kernel scratch: an allocation freed inside the same top-level aten op that made it is a workspace of this CPU
backend (oneDNN's weight/activation reorders in `mkldnn_convolution`, `slow_conv3d`'s im2col columns, the flash
kernel's per-thread buffers). A GPU has other workspaces (cuDNN's), which memplan does not model, so the peak
without that scratch is the one compared; the peak with it is returned beside it.
"""

from __future__ import annotations

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile


def _allocations(node, found: list) -> list:
    if node.tag == _EventType.Allocation:
        found.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
    for child in node.children:
        _allocations(child, found)
    return found


def measured_peaks(fn) -> tuple[int, int]:
    """(peak without kernel scratch, peak with it) of the bytes allocated while `fn()` runs and its result lives.
    Tensors that exist before the call (weights, inputs) are not counted."""
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []
    for root in prof.profiler.kineto_results.experimental_event_tree():  # roots: top-level ops
        allocs = sorted(_allocations(root, []))
        opened, scratch = {}, set()
        for i, (_, size, ptr) in enumerate(allocs):
            if size > 0:
                opened[ptr] = i
            elif ptr in opened:  # freed before the op that allocated it returned
                scratch |= {opened.pop(ptr), i}
        events += [(t, size, i in scratch) for i, (t, size, _) in enumerate(allocs)]
    live = peak = live_all = peak_all = 0
    for _, size, is_scratch in sorted(events):
        live_all += size
        peak_all = max(peak_all, live_all)
        if not is_scratch:
            live += size
            peak = max(peak, live)
    return peak, peak_all
