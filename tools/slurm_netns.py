"""A multi-node Slurm on one machine: compute nodes n1..nN, each a `slurmd -N nI` in its own network,
mount and UTS namespace (its own address, host name, /etc/hosts and node-local folder), slurmctld in
a namespace of its own, one munged for all. Used by `tools/slurm_local.py start DIR --nodes N`.

    python tools/slurm_local.py start /tmp/cluster --nodes 3    # prints the client environment
    eval "$(python tools/slurm_local.py env /tmp/cluster)"; sbatch -N 2 ...; sinfo -N
    python tools/slurm_local.py stop /tmp/cluster

The network: one bridge in a namespace of its own, one veth pair per member created inside the
bridge's namespace (nothing is ever added to the machine's own interfaces, routes or /etc), and
addresses from 127.100.0.0/24 only: the controller 127.100.0.1, node nI 127.100.0.(10 + I). Inside
each namespace 127.0.0.0/8 is narrowed to 127.0.0.1 with route_localnet on, so 127.100.0.x is
routable there, while from the machine's root namespace every 127.x address is its own loopback: a
packet sent to the cluster from the wrong namespace reaches this machine and nothing else.

Client commands (sbatch, srun, squeue, scontrol, scancel, sinfo, sacct, salloc) are wrappers in
DIR/bin, first on PATH in the client environment: they enter the controller's namespaces (network,
mount, UTS: host name `ctl`) and run the real command there. Inside a node's namespace (a job's
srun) the wrapper runs the real command directly. Jobs inherit their node's namespaces, so their
host name, `scontrol show hostnames` and name lookups (n1 -> 127.100.0.11) are the node's.

Each node's node-local folder is DIR/nodes/nI/local, bind-mounted over the same path DIR/local in
that node's private mount namespace: every node sees DIR/local, each its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

NETWORK = "127.100.0"
CONTROLLER_ADDRESS = f"{NETWORK}.1"
CTLD_PORT, SLURMD_PORT = 6817, 6818  # every member has its own address: the default ports never collide
CLIENT_COMMANDS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "salloc", "sattach", "sstat")


class NetnsError(RuntimeError):
    pass


def node_address(index: int) -> str:
    return f"{NETWORK}.{10 + index}"


def layout(state: Path, nodes: int) -> dict:
    """Namespace names (unique per state folder: two clusters can run side by side), addresses."""
    tag = hashlib.sha1(str(state).encode()).hexdigest()[:6]
    members = {"ctl": CONTROLLER_ADDRESS, **{f"n{i}": node_address(i) for i in range(1, nodes + 1)}}
    return {"bridge": f"rd{tag}-br", "namespaces": {name: f"rd{tag}-{name}" for name in members},
            "addresses": members, "nodes": nodes}


def _ip(*args, check=True):
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _in_net(ns: str, *command, check=True):
    done = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", *command], capture_output=True, text=True,
                          timeout=20)
    if check and done.returncode != 0:
        raise NetnsError(f"in {ns}: {' '.join(command)}: {done.stderr.strip()}")
    return done


def make_network(plan: dict) -> None:
    """The bridge namespace and one namespace per member, wired by veth pairs made inside the
    bridge's namespace, with the route_localnet recipe of ../shared/ENVIRONMENT.md."""
    bridge = plan["bridge"]
    _ip("netns", "add", bridge)
    _ip("-n", bridge, "link", "set", "lo", "up")
    _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
    _ip("-n", bridge, "link", "set", "br0", "up")
    for name, ns in plan["namespaces"].items():
        _ip("netns", "add", ns)
        _ip("-n", bridge, "link", "add", f"v-{name}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", bridge, "link", "set", f"v-{name}", "master", "br0")
        _ip("-n", bridge, "link", "set", f"v-{name}", "up")
        _in_net(ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1",
                "net.ipv4.conf.default.route_localnet=1")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local")
        _ip("-n", ns, "route", "replace", "local", "127.0.0.1/32", "dev", "lo", "table", "local")
        _ip("-n", ns, "addr", "add", f"{plan['addresses'][name]}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _in_net(ns, "sysctl", "-q", "-w", "net.ipv4.conf.eth0.route_localnet=1")


def hosts_file(plan: dict) -> str:
    lines = ["127.0.0.1 localhost"] + [f"{address} {name}" for name, address in plan["addresses"].items()]
    return "\n".join(lines) + "\n"


def start_in_namespace(state: Path, plan: dict, name: str, command: list[str], log: Path) -> int:
    """`command` as the member `name`: its network namespace, a private mount namespace with the
    cluster's /etc/hosts (and, on a compute node, its node-local folder) and a UTS namespace with
    its host name. nsenter and unshare exec without forking, and the shell execs the daemon, so the
    process started here IS the daemon: its PID is returned."""
    mounts = [f"mount --bind {state / 'hosts'} /etc/hosts"]
    if name != "ctl":
        own = state / "nodes" / name / "local"
        own.mkdir(parents=True, exist_ok=True)
        mounts.append(f"mount --bind {own} {state / 'local'}")
    script = " && ".join([*mounts, f"hostname {name}", "exec \"$@\""])
    with open(log, "ab") as out:
        process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{plan['namespaces'][name]}", "--", "unshare", "--mount", "--uts",
             "--propagation", "private", "--", "sh", "-c", script, name, *command],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process.pid


def write_client_wrappers(state: Path, plan: dict, sacct_stand_in: Path) -> Path:
    """DIR/bin/<command>: inside one of the cluster's own network namespaces (a node: srun in a
    job) run the real command; anywhere else enter the controller's namespaces (through its PID,
    recorded at start) and run it there."""
    members = " ".join(plan["namespaces"].values())
    bin_dir = state / "bin"
    bin_dir.mkdir(exist_ok=True)
    commands = {name: f"/usr/bin/{name}" for name in CLIENT_COMMANDS}
    commands["sacct"] = str(sacct_stand_in)
    for name, real in commands.items():
        wrapper = bin_dir / name
        wrapper.write_text(f"""#!/bin/sh
# written by tools/slurm_netns.py: `{name}` against the namespace cluster in {state}
self=$(stat -L -c %i /proc/self/ns/net)
for ns in {members}; do
    [ "$self" = "$(stat -L -c %i /run/netns/$ns 2>/dev/null)" ] && exec {real} "$@"
done
pid=$(cat {state / 'slurmctld.pid'} 2>/dev/null)
[ -n "$pid" ] && [ -d /proc/$pid ] || {{ echo "{name}: the cluster in {state} is not running" >&2; exit 1; }}
exec nsenter --target "$pid" --net --mount --uts -- {real} "$@"
""")
        wrapper.chmod(0o755)
    return bin_dir


def slurm_conf(state: Path, plan: dict, cpus: int, memory_mb: int) -> str:
    from slurm_local import COMMON_SETTINGS

    nodes = "\n".join(f"NodeName=n{i} NodeAddr={node_address(i)} NodeHostname=n{i} CPUs={cpus} "
                      f"RealMemory={memory_mb} State=UNKNOWN" for i in range(1, plan["nodes"] + 1))
    return f"""# written by tools/slurm_netns.py: a {plan['nodes']}-node Slurm in network namespaces
ClusterName=rdhpc-netns
SlurmctldHost=ctl({CONTROLLER_ADDRESS})
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
AuthInfo=socket={state / 'munge' / 'munge.socket'},cred_expire=10
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.%n.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd.%n.log
# the nodes declare what a test needs (4 CPUs each), whatever the machine's cores
SlurmdParameters=config_overrides
# a node that vanishes is declared down within 10 s
SlurmdTimeout=10
{COMMON_SETTINGS}{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_daemons(state: Path, plan: dict) -> dict[str, int]:
    env_conf = str(state / "slurm.conf")
    pids = {}
    for sub in ("ctld", "log", "local", *[f"spool/n{i}" for i in range(1, plan["nodes"] + 1)]):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "hosts").write_text(hosts_file(plan))
    daemon_env = ["env", f"SLURM_CONF={env_conf}"]
    pids["slurmctld"] = start_in_namespace(state, plan, "ctl", [*daemon_env, "/usr/sbin/slurmctld", "-D"],
                                           state / "log" / "slurmctld.out")
    (state / "slurmctld.pid").write_text(f"{pids['slurmctld']}\n")  # the wrappers' way in, from the start
    for i in range(1, plan["nodes"] + 1):
        pids[f"slurmd-n{i}"] = start_in_namespace(state, plan, f"n{i}",
                                                  [*daemon_env, "/usr/sbin/slurmd", "-D", "-N", f"n{i}"],
                                                  state / "log" / f"slurmd.n{i}.out")
    return pids


def namespace_pids(ns: str) -> list[int]:
    done = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def kill_node(state: Path, node: str) -> list[int]:
    """The machine `node` vanishes: every process in its network namespace (its slurmd, the job
    steps and ranks on it) is killed with SIGKILL. Returns the PIDs killed."""
    plan = json.loads((state / "cluster.json").read_text())
    pids = namespace_pids(plan["namespaces"][node])
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return pids


def teardown(state: Path, alive, timeout: float = 15) -> None:
    """Every daemon by PID, every process left in the cluster's namespaces, the namespaces, and
    /run/netns when nothing else is in it (ip netns add mounted it)."""
    info = state / "cluster.json"
    if not info.exists():
        return
    plan = json.loads(info.read_text())
    pids = {name: pid for name, pid in plan.get("pids", {}).items() if name != "munged"}  # the caller's
    if alive(pids.get("slurmctld")):
        subprocess.run([str(state / "bin" / "scontrol"), "shutdown"], capture_output=True, timeout=10,
                       env=dict(os.environ, SLURM_CONF=str(state / "slurm.conf")))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids.values()):
        time.sleep(0.1)
    for ns in [*plan["namespaces"].values(), plan["bridge"]]:
        for pid in namespace_pids(ns):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    for pid in pids.values():
        if alive(pid):
            os.kill(pid, 9)
    for ns in [*plan["namespaces"].values(), plan["bridge"]]:
        if Path("/run/netns", ns).exists():
            _ip("netns", "del", ns, check=False)
    netns = Path("/run/netns")
    if netns.is_dir() and not any(netns.iterdir()):
        subprocess.run(["umount", str(netns)], capture_output=True)
    info.unlink()


def restart_node(state: Path, node: str, timeout: float = 30) -> int:
    """Bring a node killed by kill_node back: a new slurmd in the same namespaces, resumed in
    Slurm. Returns its PID."""
    plan = json.loads((state / "cluster.json").read_text())
    pid = start_in_namespace(state, plan, node, ["env", f"SLURM_CONF={state / 'slurm.conf'}", "/usr/sbin/slurmd",
                                                 "-D", "-N", node], state / "log" / f"slurmd.{node}.out")
    plan["pids"][f"slurmd-{node}"] = pid
    (state / "cluster.json").write_text(json.dumps(plan))
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        subprocess.run([str(state / "bin" / "scontrol"), "update", f"NodeName={node}", "State=RESUME"],
                       capture_output=True, env=env, timeout=10)
        out = subprocess.run([str(state / "bin" / "sinfo"), "-h", "-n", node, "-o", "%T"], capture_output=True,
                             text=True, env=env, timeout=10).stdout.strip()
        if out.startswith("idle"):
            return pid
        time.sleep(0.5)
    raise NetnsError(f"{node} did not come back idle within {timeout:.0f} s")
