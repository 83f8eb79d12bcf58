"""tests.dist_helpers.leave_worker: it ends a worker process with status 0 and refuses to end pytest's own."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_leave_worker_refuses_the_pytest_process():
    from tests.dist_helpers import leave_worker

    with pytest.raises(RuntimeError, match="pytest process"):
        leave_worker()


def test_leave_worker_ends_a_worker_that_imports_conftest():
    """Worker scripts import tests.conftest (REAL_DATA, REPO_ROOT); importing it must not make the worker look like
    the pytest process (CI 2026-11-27: every test_export worker failed so)."""
    code = ("import tests.conftest; from tests.dist_helpers import leave_worker; print('before', flush=True); "
            "leave_worker(); print('after')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["before"]
