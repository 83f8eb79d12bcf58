"""Shared fixtures: the real data beside the repo, markers that skip without the hardware they need."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` relative to the repository root (CI has it there too)."""
    if not REAL_DATA.is_dir():
        pytest.fail(f"real test data not found at {REAL_DATA} (expected ../shared/data/real beside the repo)")
    return REAL_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is faster than two competing with other processes on a shared machine.
    Use per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """tests.dist_helpers.leave_worker refuses to exit the pytest process itself (it would end the run with status 0).
    Set here, not at import: worker scripts import this module (REAL_DATA, REPO_ROOT) and would record their own pid."""
    os.environ["PRETRAIN_PYTEST_PID"] = str(os.getpid())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
