"""The checkpoint folders on disk, without torch: ``<root>/step_<8 digits>/``, committed by a ``COMPLETE`` marker
that rank 0 writes last, by rename (:mod:`pretrain.engine.checkpoint` owns the writing). ``launch status`` reads
runs through this module alone, so it does not import torch."""
from __future__ import annotations

import os
import re

__all__ = ['MARKER', 'STEP_DIR', 'find_complete_checkpoints']

MARKER = 'COMPLETE'
STEP_DIR = re.compile(r'^step_(\d{8})$')


def find_complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """``[(step, folder)]`` of committed checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, MARKER)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)
