"""A real one-machine Slurm for the tests: slurmctld, slurmd and munged started by
tools/slurm_local.py under a temporary folder (SLURM_CONF points there), stopped by PID at the end;
and a multi-node one (`multi_node_cluster`: nodes n1-n3, each in namespaces of its own, on
127.100.0.0/24; tools/slurm_netns.py).

If the daemons cannot be installed or started, the fixture FAILS (it never skips): a Slurm test
that does not run proves nothing. Set RDHPC_TEST_SLURM_DIR to the state folder of a cluster
already started with `python tools/slurm_local.py start DIR` to reuse it (it is then left running).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import slurm_local  # noqa: E402


@contextlib.contextmanager
def _client_environment(env: dict):
    """os.environ with the cluster's client environment, so that submitit's sbatch/sacct calls
    reach it; the previous values come back afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MULTI_NODES = 3


@pytest.fixture(scope="module")
def multi_node_cluster():
    """Nodes n1..n3 (4 CPUs each declared: a node may run 4 ranks) in network, mount and UTS
    namespaces of their own, the controller in its own, clients through the wrappers of
    STATE/bin. Fails (never skips) when the cluster cannot start; always torn down."""
    try:
        slurm_local.install()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"cannot install slurm-wlm and munge: {exc}", pytrace=False)
    state = Path(tempfile.mkdtemp(prefix="rdhpc-netns-", dir="/tmp"))
    os.chmod(state, 0o755)
    try:
        env = slurm_local.start(state, cpus=4, memory_mb=4000, nodes=MULTI_NODES)
    except Exception as exc:  # noqa: BLE001
        slurm_local.stop(state)
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(f"cannot start the {MULTI_NODES}-node namespace Slurm: {exc}", pytrace=False)
    try:
        with _client_environment(env):
            yield {"state": state, "env": env, "local": state / "local"}
    finally:
        slurm_local.stop(state)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields the cluster's client environment (SLURM_CONF, PATH with the sacct stand-in first),
    also applied to os.environ so that submitit's sbatch/sacct calls reach this cluster."""
    reuse = os.environ.get("RDHPC_TEST_SLURM_DIR")
    if reuse and slurm_local.is_running(Path(reuse)):
        state, owned = Path(reuse), False
    else:
        try:
            slurm_local.install()
        except Exception as exc:  # noqa: BLE001 - reported as a failure with its cause
            pytest.fail(f"cannot install slurm-wlm and munge: {exc}", pytrace=False)
        # munged (user munge) must traverse the folder: not under the 0700 pytest temp folders
        state = Path(tempfile.mkdtemp(prefix="rdhpc-slurm-", dir="/tmp"))
        os.chmod(state, 0o755)
        owned = True
        try:
            slurm_local.start(state)
        except Exception as exc:  # noqa: BLE001
            slurm_local.stop(state)
            pytest.fail(f"cannot start the one-machine Slurm: {exc}", pytrace=False)
    env = slurm_local.environment(state)
    try:
        with _client_environment(env):
            yield {"state": state, "env": env}
    finally:
        if owned:
            slurm_local.stop(state)
            shutil.rmtree(state, ignore_errors=True)
