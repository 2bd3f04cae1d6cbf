"""Shared test set-up: every test session gets its own TMPDIR (torchrun, FileStore and compilers
leave files there), and tests run on the CPU with DeepSpeed's CPU accelerator."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_session_tmp = tempfile.mkdtemp(prefix="rdhpc-tests-")
os.environ["TMPDIR"] = _session_tmp
tempfile.tempdir = _session_tmp
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# rdhpc's own cache (the encoder checks of tokenizers) stays inside the session folder too.
os.environ["RDHPC_CACHE_DIR"] = os.path.join(_session_tmp, "rdhpc-cache")
# Compiled kernels of torch.compile tests stay inside the session folder too.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_session_tmp, "inductor"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_session_tmp, ignore_errors=True)


@pytest.fixture
def python():
    return sys.executable


@pytest.fixture
def repo_root():
    return REPO_ROOT
