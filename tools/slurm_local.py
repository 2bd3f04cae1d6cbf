#!/usr/bin/env python3
"""A real one-machine Slurm (Debian's slurm-wlm + munge) for the tests, CI and the demo.

    python tools/slurm_local.py install              # apt-get install slurm-wlm munge (root)
    python tools/slurm_local.py start /tmp/slurm     # prints `export SLURM_CONF=...; export PATH=...`
    python tools/slurm_local.py start /tmp/cluster --nodes 3   # n1..n3 in namespaces (tools/slurm_netns.py)
    eval "$(python tools/slurm_local.py env /tmp/slurm)"; sbatch ...; sinfo
    python tools/slurm_local.py stop /tmp/slurm

Everything lives under the state folder: slurm.conf, a private munge key and socket, the
controller's state, spool, logs and pid files, on free ports, so several of these clusters (two
test sessions) can run side by side without touching /etc. The node declares CPUs=2, which is what
the project's machines have; jobs of 2 tasks x 1 CPU fit. `sacct` does not exist without slurmdbd;
tools/slurm-bin/sacct (put first on PATH by `env`) answers from `scontrol show job` so that
submitit sees the end of a cancelled job.

What the cgroup plugins need is missing here (no freezer cgroup), so the config uses
proctrack/linuxproc and task/none, as ENVIRONMENT.md found. cred_expire is lowered from 120 s to
10 s: it is also how long a requeued job waits before it may start again.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))  # slurm_netns, its sibling
SACCT_DIR = TOOLS / "slurm-bin"
DAEMONS = ("munged", "slurmctld", "slurmd")
APT_PACKAGES = ["slurm-wlm", "munge", "iproute2", "util-linux"]  # ip, nsenter, unshare: the multi-node cluster


class SlurmSetupError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install() -> None:
    """Install the Debian packages when a daemon is missing (CI on a fresh machine)."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in (*DAEMONS, "ip", "nsenter", "unshare")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], check=True, env=env)


# What every cluster of this module shares: the plugins that work without cgroups here (see the
# module docstring), no accounting, jobs kept visible for an hour, quick scheduling.
COMMON_SETTINGS = """SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
MailProg=/bin/true
JobRequeue=1
SchedulerParameters=sched_interval=2,bf_interval=2
"""


def slurm_conf(state: Path, ctld_port: int, slurmd_port: int, cpus: int, memory_mb: int) -> str:
    munge_socket = state / "munge" / "munge.socket"
    return f"""# written by tools/slurm_local.py: a one-machine Slurm for tests
ClusterName=rdhpc-local
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd.log
SlurmdTimeout=60
{COMMON_SETTINGS}NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _is_cluster_wrappers(folder: Path) -> bool:
    """STATE/bin of a namespace cluster (its sbatch is our wrapper): on PATH it would send every
    client command to that cluster."""
    try:
        with open(folder / "sbatch", "rb") as f:
            return b"tools/slurm_netns.py" in f.read(512)  # the wrapper's second line names its maker
    except OSError:
        return False


def _multi_node(state: Path) -> bool:
    return (Path(state) / "cluster.json").exists()


def environment(state: Path) -> dict[str, str]:
    """What a client (sbatch, submitit, the tests) needs to talk to this cluster: SLURM_CONF, and
    first on PATH the sacct stand-in (one node) or the wrappers that enter the controller's
    namespaces (several nodes); another cluster's wrappers left on PATH are dropped."""
    state = Path(state).resolve()
    first = state / "bin" if _multi_node(state) else SACCT_DIR
    path = os.environ.get("PATH", "")
    parts = [p for p in path.split(os.pathsep)
             if p and p not in (str(SACCT_DIR), str(first)) and not _is_cluster_wrappers(Path(p))]
    return {"SLURM_CONF": str(state / "slurm.conf"), "PATH": os.pathsep.join([str(first), *parts])}


def _run(cmd, env=None, timeout=30, check=True):
    return subprocess.run(cmd, env=env, timeout=timeout, check=check, capture_output=True, text=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def node_state(state: Path, timeout: float = 10) -> str | None:
    env = dict(os.environ, **environment(state))
    try:
        out = _run(["sinfo", "-h", "-N", "-o", "%T"], env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def is_running(state: Path) -> bool:
    state = Path(state).resolve()
    if _multi_node(state):
        pids = json.loads((state / "cluster.json").read_text()).get("pids", {})
        return bool(pids) and all(_alive(p) for p in pids.values()) and node_state(state) is not None
    pids = json.loads((state / "pids.json").read_text()) if (state / "pids.json").exists() else {}
    return bool(pids) and all(_alive(pids.get(d)) for d in DAEMONS) and node_state(state) is not None


def start(state: Path, cpus: int = 2, memory_mb: int = 20000, timeout: float = 60, nodes: int = 1) -> dict[str, str]:
    """Start munged, slurmctld and slurmd under `state` (with `nodes` > 1: a slurmd per node, each
    in namespaces of its own, tools/slurm_netns.py); return the client environment. Raises
    SlurmSetupError with the daemons' own log lines when something does not come up."""
    state = Path(state).resolve()
    for daemon in DAEMONS:
        if not (shutil.which(daemon) or Path("/usr/sbin", daemon).exists()):
            raise SlurmSetupError(f"{daemon} is not installed: run `python tools/slurm_local.py install` "
                                  f"(apt-get install -y --no-install-recommends {' '.join(APT_PACKAGES)})")
    if is_running(state):
        return environment(state)
    if nodes > 1:
        return _start_multi_node(state, nodes, cpus, memory_mb, timeout)
    for sub in ("munge", "ctld", "spool", "log"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)
    conf = slurm_conf(state, _free_port(), _free_port(), cpus, memory_mb)
    (state / "slurm.conf").write_text(conf)
    env = dict(os.environ, **environment(state))
    pids: dict[str, int] = {"munged": _start_munged(state)}

    _run(["/usr/sbin/slurmctld"], env=env)
    pids["slurmctld"] = _wait_for_pid(state / "slurmctld.pid", "slurmctld", state / "log" / "slurmctld.log")
    _run(["/usr/sbin/slurmd", "-N", "localhost"], env=env)
    pids["slurmd"] = _wait_for_pid(state / "slurmd.pid", "slurmd", state / "log" / "slurmd.log")
    (state / "pids.json").write_text(json.dumps(pids))
    try:
        _wait_idle(state, timeout, ["localhost"])
    except SlurmSetupError:
        stop(state)  # nothing left running
        raise
    return environment(state)


def _start_multi_node(state: Path, nodes: int, cpus: int, memory_mb: int, timeout: float) -> dict[str, str]:
    import slurm_netns

    started = time.monotonic()
    (state / "munge").mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)
    plan = slurm_netns.layout(state, nodes)
    (state / "slurm.conf").write_text(slurm_netns.slurm_conf(state, plan, cpus, memory_mb))
    slurm_netns.write_client_wrappers(state, plan, SACCT_DIR / "sacct")
    (state / "cluster.json").write_text(json.dumps({**plan, "pids": {}}))  # stop() finds the namespaces
    try:
        plan["pids"] = {"munged": _start_munged(state)}
        (state / "cluster.json").write_text(json.dumps(plan))
        slurm_netns.make_network(plan)
        plan["pids"].update(slurm_netns.start_daemons(state, plan))
        (state / "cluster.json").write_text(json.dumps(plan))
        _wait_idle(state, timeout, [f"n{i}" for i in range(1, nodes + 1)])
    except Exception as exc:
        logs = "".join(_tail(state / "log" / name) for name in (
            "slurmctld.log", "slurmctld.out", *[f"slurmd.n{i}.{ext}" for i in range(1, nodes + 1) for ext in ("log", "out")]))
        stop(state)
        raise SlurmSetupError(f"the {nodes}-node cluster did not start: {type(exc).__name__}: {exc}\n{logs}") from exc
    plan["startup_s"] = time.monotonic() - started
    (state / "cluster.json").write_text(json.dumps(plan))
    return environment(state)


def _wait_idle(state: Path, timeout: float, names: list[str]) -> None:
    env = dict(os.environ, **environment(state))
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = node_state(state)
        states = (seen or "").split()
        if len(states) == len(names) and all(s.startswith("idle") for s in states):
            return
        if any(word in (seen or "") for word in ("down", "drain", "fail")):
            _run(["scontrol", "update", f"NodeName={','.join(names)}", "State=RESUME"], env=env, check=False)
        time.sleep(0.2)
    logs = _tail(state / "log" / "slurmctld.log")
    raise SlurmSetupError(f"the Slurm nodes did not become idle within {timeout:.0f} s (state {seen!r});\n{logs}")


def _start_munged(state: Path) -> int:
    """munge: a private key and socket; munged refuses to run as root and checks that its folder
    belongs to it and is not writable by others."""
    munge = pwd.getpwnam("munge")
    munge_dir = state / "munge"
    key = munge_dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(128))
    for p in (munge_dir, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    os.chmod(munge_dir, 0o755)
    os.chmod(key, 0o400)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force",
                    f"--socket={munge_dir / 'munge.socket'}", f"--key-file={key}",
                    f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                    f"--seed-file={munge_dir / 'munged.seed'}"], check=True, timeout=30, capture_output=True)
    return _wait_for_pid(munge_dir / "munged.pid", "munged", munge_dir / "munged.log")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return f"--- {path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
    except OSError:
        return f"--- {path}: (missing)\n"


def _wait_for_pid(pid_file: Path, name: str, log: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _read_pid(pid_file)
        if _alive(pid):
            return pid
        time.sleep(0.1)
    raise SlurmSetupError(f"{name} did not start (no live pid in {pid_file} after {timeout:.0f} s);\n{_tail(log)}")


def stop(state: Path, timeout: float = 30) -> None:
    """Stop the daemons started by `start` by their PIDs (waiting on them: the pid files vanish
    before the processes exit)."""
    state = Path(state).resolve()
    if _multi_node(state):
        import slurm_netns

        munged = json.loads((state / "cluster.json").read_text()).get("pids", {}).get("munged")
        slurm_netns.teardown(state, _alive, timeout)
        _stop_pid(munged or _read_pid(state / "munge" / "munged.pid"), timeout / 3)
        return
    pids = json.loads((state / "pids.json").read_text()) if (state / "pids.json").exists() else {}
    for name, pid_file in (("slurmctld", state / "slurmctld.pid"), ("slurmd", state / "slurmd.pid"),
                           ("munged", state / "munge" / "munged.pid")):
        pids.setdefault(name, _read_pid(pid_file))
    env = dict(os.environ, **environment(state))
    if _alive(pids.get("slurmctld")):
        try:  # stops slurmctld and every slurmd; their running jobs are ended
            _run(["scontrol", "shutdown"], env=env, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            pass
    for name in ("slurmd", "slurmctld", "munged"):
        pid = pids.get(name)
        if name == "munged":
            _stop_pid(pid, timeout / 3)
            continue
        deadline = time.monotonic() + timeout / 3
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    (state / "pids.json").unlink(missing_ok=True)


def _stop_pid(pid: int | None, timeout: float) -> None:
    """SIGTERM, a wait, then SIGKILL."""
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install slurm-wlm munge when missing")
    for name in ("start", "stop", "env", "status"):
        p = sub.add_parser(name)
        p.add_argument("state", help="state folder of this cluster")
        if name == "start":
            p.add_argument("--nodes", type=int, default=1,
                           help="compute nodes n1..nN, each in namespaces of its own (default 1: localhost)")
    args = parser.parse_args(argv)
    if args.command == "install":
        install()
        return 0
    state = Path(args.state)
    if args.command == "start":
        try:
            env = start(state, nodes=args.nodes)
        except SlurmSetupError as exc:
            print(f"slurm_local: {exc}", file=sys.stderr)
            return 1
        print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()), end="")
        return 0
    if args.command == "env":
        print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in environment(state).items()), end="")
        return 0
    if args.command == "status":
        running = is_running(state)
        print("running" if running else "stopped", node_state(state) or "")
        return 0 if running else 1
    stop(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
