"""Pre-flight on every start: each rank's device, a timed all-reduce at a few sizes (bandwidth per
size) and a timed GEMM per device; a rank far below the median is named in the log.

    from rdhpc.distributed.preflight import run_preflight
    report = run_preflight(device, ranks, log)      # after the process group exists, on every rank

At scale one slow or misconfigured GPU (thermal throttling, a wrong NUMA binding, a die running at
half clock) drags the whole synchronous job down to its speed, and a broken interconnect shows as an
all-reduce far below the expected bus bandwidth. Both are cheap to measure before the first step
(about a second on GPUs) and expensive to discover after a day. The report names the host and
device of each slow rank, so the node can be excluded (`--exclude` / `slurm.exclude`) at the next
segment.

Bandwidth follows nccl-tests' convention: algorithm bandwidth = bytes / time; bus bandwidth =
algbw * 2 (n - 1) / n for an all-reduce, comparable with the link speed whatever the rank count.
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch

from rdhpc.errors import UserError

# Message sizes of the all-reduce test, in bytes: latency-bound, mid, bandwidth-bound. The largest
# on GPUs is the paper's 64 MB reduction chunk; on the CPU (gloo, tests) smaller sizes keep it short.
GPU_SIZES = (256 << 10, 8 << 20, 64 << 20)
CPU_SIZES = (64 << 10, 1 << 20, 4 << 20)
SLOW_FRACTION = 0.5
"""A rank whose GEMM throughput is below this fraction of the median is named as slow."""
# Drills and tests: "RANK:FACTOR" makes that rank's GEMM do FACTOR times the work it counts, as a
# device running at 1/FACTOR of its speed would.
FAULT_SLOW_RANK = "RDHPC_FAULT_SLOW_RANK"
# The bus bandwidth (GB/s) a cluster preset expects of the largest all-reduce between nodes (its
# min_busbw_gbps, exported by the job script); 0 or unset: no check.
MIN_BUSBW_VARIABLE = "RDHPC_MIN_BUSBW_GBPS"


class PreflightError(UserError):
    """The pre-flight found the job unfit to train (a network far slower than the preset expects)."""


def network_problem(report: dict, expected_gbps: float) -> str | None:
    """Why the all-reduce between nodes is too slow to train on, or None. Only a job across
    several hosts is checked: one node's all-reduce never touches the network."""
    hosts = {r["host"] for r in report["ranks"]}
    if not expected_gbps or len(hosts) < 2 or not report["allreduce"]:
        return None
    largest = max(report["allreduce"], key=lambda a: a["bytes"])
    if largest["busbw_gbps"] >= expected_gbps:
        return None
    return (f"the all-reduce of {_size(largest['bytes'])} between {len(hosts)} nodes ran at "
            f"{largest['busbw_gbps']:.2f} GB/s bus bandwidth, below the {expected_gbps:g} GB/s the cluster preset "
            f"expects (its min_busbw_gbps): the collectives are probably on TCP sockets, not the fabric (RCCL's or "
            f"NCCL's network plugin not loaded: on Frontier the rccl-net-plugin module; NCCL_NET=OFI makes RCCL "
            f"fail at once instead). Set {MIN_BUSBW_VARIABLE}=0 (--env) to train anyway")


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_allreduce(num_bytes: int, device: torch.device, repeats: int) -> float:
    import torch.distributed as dist

    buf = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dist.all_reduce(buf)  # warm-up: the first call sets up connections
    _synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(buf)
    _synchronize(device)
    return (time.perf_counter() - start) / repeats


def timed_gemm_tflops(device: torch.device, n: int, dtype: torch.dtype, repeats: int, slowdown: int = 1,
                      trials: int = 3) -> float:
    """TFLOP/s of an n x n x n matrix product on this rank's device: the best of `trials` timings
    of `repeats` products each. A truly slow device is slow in every trial; the best of several
    keeps a moment of noise (another process on a shared CPU, a clock ramping up) from naming a
    healthy rank. Also the trainer's MFU peak where no datasheet figure applies. The operands come
    from a generator of their own: the training RNG streams are never touched."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    torch.matmul(a, b)  # warm-up (kernel selection, clocks)
    _synchronize(device)
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats * slowdown):
            torch.matmul(a, b)
        _synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n ** 3 / best / 1e12


def gemm_size(device: torch.device) -> int:
    """n of the timed n^3 GEMM: 8192 on GPUs, 256 on the CPU (where ranks share cores)."""
    return 8192 if device.type == "cuda" else 256


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def run_preflight(device, ranks, log=print, sizes=None, repeats: int | None = None, gemm_n: int | None = None,
                  slow_fraction: float = SLOW_FRACTION, dtype: torch.dtype | None = None) -> dict:
    """Run on every rank of an initialised process group; every rank returns the same report:

    {"ranks": [{"rank", "host", "device", "gemm_tflops"}, ...],
     "allreduce": [{"bytes", "seconds", "algbw_gbps", "busbw_gbps"}, ...],
     "gemm": {"n", "dtype", "median_tflops"}, "slow_ranks": [rank, ...], "seconds": total}

    `log` is called on rank 0 only. The GEMM runs in `dtype` (default bf16 on GPUs, float32 on the
    CPU; the trainer passes its matrix-product dtype, so the figure doubles as its MFU peak) at
    n=8192 on GPUs and n=256 on the CPU (CPU ranks share cores: only gross outliers show)."""
    import torch.distributed as dist

    device = torch.device(device)
    started = time.perf_counter()
    world = dist.get_world_size() if dist.is_initialized() else 1
    on_gpu = device.type == "cuda"
    sizes = tuple(sizes or (GPU_SIZES if on_gpu else CPU_SIZES))
    repeats = repeats or 10
    n = gemm_n or gemm_size(device)
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)

    allreduce = []
    if world > 1:
        for num_bytes in sizes:
            seconds = _timed_allreduce(num_bytes, device, repeats)
            # every rank times the same collective; the slowest rank's time is the collective's
            t = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = t.item()
            algbw = num_bytes / seconds / 1e9
            allreduce.append({"bytes": num_bytes, "seconds": seconds, "algbw_gbps": algbw,
                              "busbw_gbps": algbw * 2 * (world - 1) / world})
    fault = os.environ.get(FAULT_SLOW_RANK, "")
    slowdown = int(fault.split(":")[1]) if fault and int(fault.split(":")[0]) == ranks.rank else 1
    tflops = timed_gemm_tflops(device, n, dtype, repeats, slowdown)

    # Gather (GEMM rate, host, device) of every rank. Tensors only, so nccl works as well as gloo.
    mine = torch.tensor([tflops], dtype=torch.float64, device=device)
    name = f"{socket.gethostname()}|{_device_name(device)}".encode()[:255]
    name_t = torch.zeros(256, dtype=torch.uint8, device=device)
    name_t[:len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    if world > 1:
        rates = [torch.zeros_like(mine) for _ in range(world)]
        names = [torch.zeros_like(name_t) for _ in range(world)]
        dist.all_gather(rates, mine)
        dist.all_gather(names, name_t)
    else:
        rates, names = [mine], [name_t]
    per_rank = []
    for rank, (rate, raw) in enumerate(zip(rates, names)):
        host, _, dev_name = bytes(raw.cpu().tolist()).rstrip(b"\0").decode(errors="replace").partition("|")
        per_rank.append({"rank": rank, "host": host, "device": dev_name, "gemm_tflops": rate.item()})
    median = statistics.median(r["gemm_tflops"] for r in per_rank)
    slow = [r["rank"] for r in per_rank if r["gemm_tflops"] < slow_fraction * median]
    report = {"ranks": per_rank, "allreduce": allreduce,
              "gemm": {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_tflops": median},
              "slow_ranks": slow, "seconds": time.perf_counter() - started}

    if ranks.rank == 0:
        if os.environ.get("RDHPC_PREFLIGHT_VERBOSE", "1") != "0" or slow:
            for r in per_rank:
                log(f"[preflight] rank {r['rank']}: {r['host']} {r['device']}  GEMM {r['gemm_tflops']:.3f} TFLOP/s")
        for a in allreduce:
            log(f"[preflight] all-reduce {_size(a['bytes'])}: {a['seconds'] * 1e3:.2f} ms, "
                f"algbw {a['algbw_gbps']:.2f} GB/s, busbw {a['busbw_gbps']:.2f} GB/s ({world} ranks)")
        log(f"[preflight] GEMM {n}x{n} {report['gemm']['dtype']}: median {median:.3f} TFLOP/s per device")
        for rank in slow:
            r = per_rank[rank]
            log(f"[preflight] SLOW: rank {rank} ({r['host']}, {r['device']}) runs GEMM at {r['gemm_tflops']:.3f} "
                f"TFLOP/s, {r['gemm_tflops'] / median:.2f}x the median: check or exclude that node")
        log(f"[preflight] done in {report['seconds']:.2f} s")
    problem = network_problem(report, float(os.environ.get(MIN_BUSBW_VARIABLE) or 0))
    if problem:  # every rank has the same report: every rank stops, with the same message
        raise PreflightError(f"rank {ranks.rank}: pre-flight: {problem}")
    return report


def _size(num_bytes: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes} B"
