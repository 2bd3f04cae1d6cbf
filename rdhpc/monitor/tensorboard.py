"""`rdhpc tensorboard RUN_DIR`: TensorBoard on 127.0.0.1 and a free port, in the foreground until Ctrl-C.

    rdhpc tensorboard runs/huginn-3.5b                       # prints the URL and the ssh tunnel command
    rdhpc tensorboard runs/x --port 6007 --login-host frontier.olcf.ornl.gov

It binds to loopback only: on a shared cluster node anyone could reach a server on the node's public
address. A user reaches it through an ssh tunnel, which the command prints (through the login host
with -J when the server runs on a compute node). SIGTERM and Ctrl-C stop it cleanly (exit 0).
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from rdhpc.distributed.ranks import free_port
from rdhpc.errors import UserError

HOST = "127.0.0.1"


class MonitorError(UserError, ValueError):
    pass


def tunnel_command(port: int, login_host: str | None = None, user: str | None = None,
                   node: str | None = None) -> str:
    user = user or getpass.getuser()
    node = node or socket.gethostname()
    if login_host and login_host != node:
        return f"ssh -N -J {user}@{login_host} -L {port}:{HOST}:{port} {user}@{node}"
    return f"ssh -N -L {port}:{HOST}:{port} {user}@{node}"


def serve(run_dir: str | Path, port: int = 0, login_host: str | None = None, log=print) -> int:
    from tensorboard import program

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MonitorError(f"{run_dir}: no such run folder")
    if not any(run_dir.rglob("events.out.tfevents.*")):
        log(f"[tensorboard] {run_dir}: no event files yet; TensorBoard shows them as they appear", file=sys.stderr)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for attempt in range(5):  # a free port can be taken between the probe and the bind
            chosen = port or free_port(HOST)
            board = program.TensorBoard()
            board.configure(argv=[None, "--logdir", str(run_dir), "--host", HOST, "--port", str(chosen),
                                  "--reload_interval", "5", "--load_fast", "false"])
            try:
                board.launch()
                break
            except program.TensorBoardServerException as exc:
                if port or attempt == 4:
                    raise MonitorError(f"--port {chosen}: cannot serve TensorBoard there ({exc})") from None
        url = f"http://{HOST}:{chosen}/"
        login_host = login_host or os.environ.get("RDHPC_LOGIN_HOST")
        log(f"[tensorboard] {run_dir} at {url}", flush=True)
        log(f"[tensorboard] from your machine: {tunnel_command(chosen, login_host)}", flush=True)
        log(f"[tensorboard] then open http://localhost:{chosen}/ ; Ctrl-C stops the server", flush=True)
        stop.wait()
        log("[tensorboard] stopped", flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
