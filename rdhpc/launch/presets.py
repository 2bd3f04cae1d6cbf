"""Cluster presets: how a job is laid out and set up on one cluster, as YAML in slurm/clusters/.

    --cluster frontier              -> slurm/clusters/frontier.yaml of this repository
    --cluster mysite                -> $RDHPC_CLUSTERS_DIR/mysite.yaml, ~/.config/rdhpc/clusters/mysite.yaml,
                                       or slurm/clusters/mysite.yaml (first found)
    --cluster path/to/mysite.yaml   -> that file

A user adds a cluster by writing one of these files; no code changes. Every key is checked when
the preset loads, and every value that ends up in a generated script is checked by
rdhpc.launch.quoting (names of modules and variables, sbatch option values).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rdhpc.errors import UserError
from rdhpc.launch.quoting import check_env_name, check_sbatch_value, check_shell_word

REPO_CLUSTERS = Path(__file__).resolve().parents[2] / "slurm" / "clusters"
GPU_VENDORS = ("amd", "nvidia", "none")


class PresetError(UserError):
    pass


@dataclass
class StagingPreset:
    """Node-local staging: the environment archive is broadcast with sbcast to every node and
    unpacked there before the ranks start (the paper's launch on Frontier)."""

    enabled: bool = False
    archive: str | None = None
    """A tar (optionally compressed) of the environment and code, on a shared filesystem."""
    dest: str = "/tmp/${USER}"
    """Node-local folder it is unpacked into; ${NAME} is expanded in the job."""
    python: str = "venv/bin/python"
    """The Python inside `dest` after unpacking."""
    sbatch: dict[str, bool | int | str] = field(default_factory=dict)
    """Extra sbatch options staging needs (e.g. Frontier's constraint: nvme)."""


@dataclass
class ClusterPreset:
    name: str = ""  # the file's stem, set by load_preset
    path: str = ""  # the file, set by load_preset
    description: str = ""
    gpu_vendor: str = "none"
    """amd (ROCm/RCCL), nvidia (CUDA/NCCL) or none (CPU ranks, gloo)."""
    account_required: bool = False
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    tasks_per_node: int = 1
    """Ranks per node: one per GPU, or CPU ranks."""
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    modules: list[str] = field(default_factory=list)
    """`module load` each, in order, before anything else in the job."""
    setup: list[str] = field(default_factory=list)
    """Shell lines of the preset's author run after the modules (e.g. activating an environment)."""
    env: dict[str, str | int | float] = field(default_factory=dict)
    """Exported in the job; a ${NAME} in a value is expanded there, everything else is literal."""
    python: str | None = None
    """The Python that runs the ranks; None: the one running `rdhpc submit` (shared filesystem)."""
    sbatch: dict[str, bool | int | str] = field(default_factory=dict)
    """Extra sbatch options, e.g. {constraint: nvme, exclusive: true}."""
    srun_args: list[str] = field(default_factory=list)
    gpu_bind: str | None = None
    """Bind each task to GPUs: 'closest' (OLCF's advice on Frontier: `--gpus-per-task=1
    --gpu-bind=closest`, so each rank drives the die of its own NUMA domain and sees one device),
    or None (every rank sees the node's GPUs and takes the LOCAL_RANK-th)."""
    min_busbw_gbps: float = 0.0
    """The bus bandwidth (GB/s) the pre-flight's largest all-reduce must reach in a job of several
    nodes; below it the job stops at start, naming the likely cause (the network plugin not loaded:
    TCP sockets instead of the fabric). 0: no check. Overridable per job: --env RDHPC_MIN_BUSBW_GBPS=0."""
    forbidden_run_paths: list[str] = field(default_factory=list)
    """Folders where no run may keep its checkpoints (Frontier: /ccs/home, 50 GB and read-only from
    the compute nodes); `rdhpc submit` refuses them with forbidden_run_paths_advice."""
    forbidden_run_paths_advice: str | None = None
    max_time_by_nodes: dict[int, str] = field(default_factory=dict)
    """The site's time limit by job size, {up to N nodes: limit} (Frontier: 2 h up to 91 nodes,
    6 h up to 183, 12 h beyond): `rdhpc submit` refuses a longer --time, naming the limit."""
    container_image: str | None = None
    """pyxis/enroot: the image every task runs in (srun --container-image), e.g. an NGC PyTorch image."""
    container_mounts: list[str] = field(default_factory=list)
    """pyxis: SRC:DST mounts into the container (srun --container-mounts), e.g. the project's file system."""
    mpi: str | None = None
    """srun --mpi (pmix for pyxis/enroot users, pmi2 where the site defaults to it); ranks still come
    from Slurm's variables (rdhpc.distributed.ranks)."""
    wckey: str | None = None
    """sbatch --wckey; None writes none (submitit's default `--wckey=submitit` is refused by sites
    that enforce wckeys)."""
    reduce_bucket_mb: int | None = None
    """Fixed-size gradient reduction (the paper's RCCL workaround): DeepSpeed's reduce and
    allgather bucket sizes in MB of float32; None leaves the run config's."""
    stop_margin_s: int = 300
    """The run checkpoints and stops this long before the time limit (RDHPC_STOP_AT)."""
    signal_margin_s: int | None = None
    """Slurm's warning signal (USR2) this long before the limit; None: stop_margin_s. Slurm sends it up
    to a minute early, so on very short jobs (tests) keep it below stop_margin_s."""
    staging: StagingPreset = field(default_factory=StagingPreset)

    @property
    def backend(self) -> str:
        """torch.distributed backend: nccl on GPUs (ROCm's RCCL answers to nccl), gloo on the CPU."""
        return "gloo" if self.gpu_vendor == "none" else "nccl"

    def job_env(self) -> dict:
        """The environment of every rank: the preset's env, and the pre-flight's bandwidth floor
        (RDHPC_MIN_BUSBW_GBPS) when the preset names one."""
        env = dict(self.env)
        if self.min_busbw_gbps:
            from rdhpc.distributed.preflight import MIN_BUSBW_VARIABLE

            env[MIN_BUSBW_VARIABLE] = f"{self.min_busbw_gbps:g}"
        return env

    def gpu_binding_args(self, gpus_per_node: int) -> list[str]:
        """srun's per-task GPU binding: gpu_bind 'closest' gives each task its closest GPU."""
        return ["--gpus-per-task=1", "--gpu-bind=closest"] if self.gpu_bind == "closest" and gpus_per_node else []

    def config_overrides(self) -> list[str]:
        """`--set` overrides of the run config this preset implies, applied before the user's."""
        if not self.reduce_bucket_mb:
            return []
        elements = self.reduce_bucket_mb * (1 << 20) // 4  # float32 elements
        return [f"zero.reduce_bucket_size={elements}", f"zero.allgather_bucket_size={elements}",
                "zero.overlap_comm=false"]


def cluster_search_path() -> list[Path]:
    dirs = []
    if os.environ.get("RDHPC_CLUSTERS_DIR"):
        dirs.append(Path(os.environ["RDHPC_CLUSTERS_DIR"]))
    dirs += [Path.home() / ".config" / "rdhpc" / "clusters", REPO_CLUSTERS]
    return dirs


def available_presets() -> list[str]:
    names = set()
    for d in cluster_search_path():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_preset(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise PresetError(f"slurm.cluster: preset file {path} does not exist")
        return path
    for d in cluster_search_path():
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    names = available_presets()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PresetError(f"slurm.cluster: no preset {name!r}{hint}; known: {', '.join(names)} "
                      f"(searched {', '.join(str(d) for d in cluster_search_path())})")


def load_preset(name: str) -> ClusterPreset:
    """Read and check a preset through the run config's own machinery (rdhpc.config.loader): every
    problem is reported at once, naming the file and key."""
    from rdhpc.config.loader import build_section

    path = find_preset(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PresetError(f"{path}: the top level must be a mapping of keys")
    problems = [f"{key}: set by rdhpc (the file's stem and path), not by the preset" for key in ("name", "path")
                if key in raw]
    raw = {k: v for k, v in raw.items() if k not in ("name", "path")}
    if raw.get("staging") is None:
        raw.pop("staging", None)
    preset = build_section(ClusterPreset, raw, "", problems)
    preset.name, preset.path = path.stem, str(path)
    # fields with a type error kept their defaults: the value checks see the rest (as the run config's)
    already_reported = {p.split(":")[0].split("[")[0] for p in problems}
    problems += [p for p in _problems(preset) if p.split(":")[0] not in already_reported]
    if problems:
        raise PresetError(f"{len(problems)} problem(s) in cluster preset {path}:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    preset.env = {str(k): str(v) for k, v in preset.env.items()}
    return preset


def _problems(p: ClusterPreset) -> list[str]:
    """What the types alone do not say: values that cannot reach a script safely, ranges, choices."""
    out = []
    if p.gpu_vendor not in GPU_VENDORS:
        out.append(f"gpu_vendor: unknown value {p.gpu_vendor!r}; choose one of {list(GPU_VENDORS)}")
    if p.signal_margin_s is not None and p.signal_margin_s < 1:
        out.append(f"signal_margin_s: must be >= 1, got {p.signal_margin_s}")
    for name in ("tasks_per_node", "cpus_per_task", "stop_margin_s"):
        if getattr(p, name) < 1:
            out.append(f"{name}: must be >= 1, got {getattr(p, name)}")
    if p.gpus_per_node < 0:
        out.append(f"gpus_per_node: must be >= 0, got {p.gpus_per_node}")
    if p.gpu_vendor == "none" and p.gpus_per_node:
        out.append("gpus_per_node: a preset with gpu_vendor none cannot ask for GPUs")
    if p.reduce_bucket_mb is not None and p.reduce_bucket_mb < 1:
        out.append(f"reduce_bucket_mb: must be >= 1, got {p.reduce_bucket_mb}")
    from rdhpc.config.schema import slurm_time_seconds

    for nodes, limit in p.max_time_by_nodes.items():
        try:
            if nodes < 1 or slurm_time_seconds(limit) <= 0:
                raise ValueError
        except ValueError:
            out.append(f"max_time_by_nodes.{nodes}: expected nodes >= 1 and a Slurm time, got {limit!r}")
    if p.gpu_bind not in (None, "closest"):
        out.append(f"gpu_bind: unknown value {p.gpu_bind!r}; choose 'closest' or null")
    if p.gpu_bind and p.gpu_vendor == "none":
        out.append("gpu_bind: a preset with gpu_vendor none has no GPUs to bind")
    if p.container_mounts and not p.container_image:
        out.append("container_mounts: mounts without a container_image")
    # shell-quoted on srun's line ('#' is pyxis's registry separator): only what no quoting carries
    for name, value in [("container_image", p.container_image),
                        *[(f"container_mounts[{i}]", m) for i, m in enumerate(p.container_mounts)]]:
        if value is not None and ("\n" in value or "\0" in value):
            out.append(f"{name}: {value!r} contains a newline or NUL byte")
    for name in ("account", "partition", "qos", "wckey", "mpi"):
        value = getattr(p, name)
        if value is not None:
            out += [f"{name}: {m}" for m in check_sbatch_value(value)]
    for i, module in enumerate(p.modules):
        out += [f"modules[{i}]: {m}" for m in check_shell_word(module, "a module name")]
    for key, value in p.env.items():
        out += [f"env.{key}: {m}" for m in check_env_name(key)]
        if "\0" in str(value):
            out.append(f"env.{key}: contains a NUL byte")
    for key, value in {**p.sbatch, **p.staging.sbatch}.items():
        out += [f"sbatch.{key}: {m}" for m in check_shell_word(key, "an option name")]
        if value is not True:
            out += [f"sbatch.{key}: {m}" for m in check_sbatch_value(str(value))]
    if p.staging.enabled and not p.staging.archive:
        out.append("staging.archive: staging is enabled but no archive is named")
    return out
