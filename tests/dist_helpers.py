"""The end of a test's distributed worker process."""
from __future__ import annotations

import os
import sys
from typing import NoReturn


def leave_worker() -> NoReturn:
    """End a test's worker process once it has written what the test reads: destroy the process group (if any),
    flush, and exit 0 without the interpreter's finalization.

    Twice in CI a gloo rank aborted in its teardown ("terminate called without an active exception", SIGABRT) after
    it had done and saved its work, which failed the test: test_export's 2-rank ZeRO-3 worker (2026-11-27 05:36 UTC)
    and the contrastive loss's two mp.spawn ranks (10:51 UTC). Dozens of reruns of each passed, and the cause was not
    established; PyTorch tracks finalization-time aborts with gloo's threads (pytorch/pytorch#179291). The tests
    check what the workers wrote, not the interpreter's teardown. A worker that fails before this raises as usual.
    """
    import torch.distributed as dist

    if os.environ.get("PRETRAIN_PYTEST_PID") == str(os.getpid()):
        raise RuntimeError("leave_worker() called in the pytest process: it is for worker processes only")
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
