"""ZeRO-3 fetches a block's parameters once per block call, not once per submodule (``deepspeed.stage3_leaf_blocks``).

ZeRO-3 puts a fetch hook before and a release hook after *every* submodule's forward and backward, and keeps a trace
of those calls (which it replays to prefetch). Each hook is Python on the host (~50 us on this project's CPU
machine), whatever the batch. InternImage's blocks hold ~25 small modules each (DCNv3's projections, norms,
MLP, drop path...), so with per-block activation checkpointing (a recompute), the M3I teacher's forward and the
contrastive text tower, one InternImage-T step calls ~3,100 fetch and ~3,000 release hooks at one rank; and the first
step that replays the trace computes, per release, what to keep by walking the rest of the trace
(``stage3_max_reuse_distance``, 1e9 elements by default): quadratic in the trace length, tens of seconds once.

Marked as DeepSpeed "leaf" modules (:func:`deepspeed.utils.set_z3_leaf_module`), the blocks get those hooks
themselves and their submodules none: one gather of the block's parameters before it runs (also before its
recompute), one release after. The blocks are the children of every ``blocks`` container (InternImage's
``levels[i].blocks``, timm stage models, the M3I decoders) and of every ``resblocks`` container (open_clip's text
tower), the same units per-block checkpointing wraps. The arithmetic is the same (only when parameters are gathered
changes); a gathered block costs its own parameters in memory, which ZeRO-3 already held for it during its call.
Measured in docs/PERFORMANCE.md ("ZeRO-3 hooks").
"""
from __future__ import annotations

from torch import nn

__all__ = ['mark_leaf_blocks']

CONTAINERS = ('blocks', 'resblocks')


def mark_leaf_blocks(model: nn.Module) -> int:
    """Mark the children of every ``blocks`` / ``resblocks`` container in ``model`` as ZeRO-3 leaf modules (before
    ``deepspeed.initialize``); returns how many. A block inside another marked block is left as it is (the outer
    one's hooks already cover it)."""
    from deepspeed.utils.z3_leaf_module import set_z3_leaf_module, z3_leaf_module

    marked = 0
    for module in model.modules():
        if z3_leaf_module(module):
            continue
        for attr in CONTAINERS:
            container = getattr(module, attr, None)
            if isinstance(container, (nn.ModuleList, nn.Sequential)):
                for block in container:
                    if not any(z3_leaf_module(m) for m in block.modules()):
                        set_z3_leaf_module(block, True)
                        marked += 1
    return marked
