"""Per-rank heartbeats: when a job fails or hangs, name the rank at fault.

A collective that fails or times out tells a rank only that *something* went wrong (gloo says
"connection reset", NCCL says "watchdog timeout"), not which of thousands of ranks is to blame. So
every rank keeps a small file `RUN_DIR/heartbeat/rank{r}.json`, rewritten by a daemon thread every
`interval_s`: host, pid, the step and phase the training loop last reported, and when. The thread
keeps beating while the main thread is blocked in a collective, so

- a rank whose file stopped changing is dead or frozen (killed -9, out of memory, SIGSTOP, node lost);
- a rank that beats but reports no progress is stuck in its own work (the others wait on it);
- a rank that failed says so in its file ("failed: <error>") before it exits.

`diagnose()` reads every rank's file and names the suspects; the trainer calls it when a collective
fails, and the watchdog calls it before ending a rank whose training loop made no progress for
`stall_timeout_s` (so a hang ends in bounded time even where no collective timeout fires).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Exit status of a rank ended by its watchdog (distinct from Python's 1 and the CLI's 2).
STALL_EXIT_STATUS = 3


class Heartbeat:
    def __init__(self, folder: str | Path, rank: int, world_size: int, interval_s: float = 5.0,
                 stall_timeout_s: float = 0.0, log=print):
        self.folder = Path(folder)
        self.rank, self.world_size = rank, world_size
        self.interval_s, self.stall_timeout_s = interval_s, stall_timeout_s
        self.log = log
        self.path = self.folder / f"rank{rank}.json"
        self._state = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "step": 0,
                       "phase": "start", "progress_time": time.time()}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    # ---- the training loop's side -------------------------------------------------------------
    def progress(self, step: int, phase: str):
        """Called by the training loop at each phase boundary; cheap (no I/O)."""
        with self._lock:
            self._state.update(step=step, phase=phase, progress_time=time.time())

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{self.rank}", daemon=True)
        self._thread.start()

    def stop(self, final_phase: str):
        """Stop beating and leave the final state ("done", "failed: ...") in the file; a heartbeat
        that never started writes nothing (the folder may be another run's)."""
        if self._thread is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)
        with self._lock:
            self._state.update(phase=final_phase, progress_time=time.time())
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()

    # ---- the thread ---------------------------------------------------------------------------
    def _write(self):
        with self._lock:
            state = dict(self._state, beat_time=time.time())
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)
        except OSError as exc:  # a full or flaky file system must not kill training
            print(f"[heartbeat] rank {self.rank}: cannot write {self.path}: {exc}", file=sys.stderr)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._write()
            with self._lock:
                idle = time.time() - self._state["progress_time"]
                step, phase = self._state["step"], self._state["phase"]
            if self.stall_timeout_s and idle > self.stall_timeout_s:
                report = diagnose(self.folder, self.world_size, self.interval_s, self_rank=self.rank)
                print(f"[heartbeat] rank {self.rank}: no progress for {idle:.0f} s at step {step} ({phase}); "
                      f"train.stall_timeout_s = {self.stall_timeout_s:g}. {report}", file=sys.stderr, flush=True)
                with self._lock:
                    self._state.update(phase=f"failed: stalled {idle:.0f} s in {phase}")
                self._write()
                os._exit(STALL_EXIT_STATUS)  # the main thread is blocked: only a hard exit ends the rank


def read_beats(folder: str | Path, world_size: int) -> dict[int, dict | None]:
    beats = {}
    for rank in range(world_size):
        try:
            beats[rank] = json.loads((Path(folder) / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            beats[rank] = None
    return beats


def _process_gone(beat: dict) -> bool:
    """Only answerable for a process on this host."""
    if beat.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(beat["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, ValueError):
        return False
    return False


@dataclass
class Suspects:
    """What the heartbeats say of the other ranks after a failure: `silent` ranks (no file, a
    stale beat, a vanished process: killed, frozen or on a dead node) and ranks that `failed` on
    their own (they recorded their error), each as {rank, host, text}."""

    silent: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    @property
    def silent_hosts(self) -> list[str]:
        return sorted({s["host"] for s in self.silent if s.get("host")})


def find_suspects(folder: str | Path, world_size: int, interval_s: float, self_rank: int | None = None,
                  now: float | None = None) -> Suspects:
    now = time.time() if now is None else now
    beats = read_beats(folder, world_size)
    stale_after = 2.5 * interval_s
    found = Suspects()
    for rank, beat in beats.items():
        if rank == self_rank:
            continue
        if beat is None:
            found.silent.append({"rank": rank, "host": None,
                                 "text": f"rank {rank} (never wrote {Path(folder) / f'rank{rank}.json'})"})
            continue
        where = f"rank {rank} (host {beat.get('host')}, pid {beat.get('pid')}, step {beat.get('step')}, {beat.get('phase')})"
        entry = {"rank": rank, "host": beat.get("host")}
        if beat.get("phase", "").startswith("failed"):
            found.failed.append({**entry, "text": where})
        elif beat.get("phase") == "done":
            continue
        elif _process_gone(beat):
            found.silent.append({**entry, "text": f"{where}: its process is gone"})
        elif now - beat.get("beat_time", 0) > stale_after:
            found.silent.append({**entry, "text": f"{where}: silent for {now - beat['beat_time']:.0f} s"})
    return found


def diagnose(folder: str | Path, world_size: int, interval_s: float, self_rank: int | None = None,
             now: float | None = None) -> str:
    """One sentence naming the ranks that look at fault, from every rank's heartbeat file.

    Silent ranks (no file, a stale beat, a vanished process) are named first; then ranks that
    failed on their own; then, if every rank is alive, the ranks furthest behind in steps."""
    found = find_suspects(folder, world_size, interval_s, self_rank, now)
    if found.silent:
        return "Suspect " + "; ".join(s["text"] for s in found.silent) + "."
    if found.failed:
        return "Failed: " + "; ".join(s["text"] for s in found.failed) + "."
    beats = read_beats(folder, world_size)
    live = {r: b for r, b in beats.items() if b is not None}
    if live:
        lowest = min(b.get("step", 0) for b in live.values())
        behind = sorted(r for r, b in live.items() if b.get("step", 0) == lowest)
        if len(behind) < len(live):
            named = ", ".join(f"rank {r} ({live[r].get('phase')})" for r in behind[:8])
            return f"Behind at step {lowest}: {named}{' ...' if len(behind) > 8 else ''}."
    return "Every rank's heartbeat is recent and at the same step."
