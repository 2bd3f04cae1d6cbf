"""The shape of the code: imports flow one way (no module imports, even lazily inside a function,
a module that imports it back), no file of the trainer or the launcher grows past one job, and each
run-folder file name is spelled in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rdhpc", "data_prep")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (top level or inside a function)."""
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                # the longest project module the import names (a package's __init__ counts as the package)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    graph = import_graph()
    assert "rdhpc.launch.job" in graph and "data_prep.cli" in graph["rdhpc.launch.job"]
    # a package importing its own submodules is not a circle; anything else is
    package_edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    cycle = find_cycle(package_edges)
    assert cycle is None, " -> ".join(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker itself


def test_trainer_and_launcher_files_stay_small():
    for folder in ("rdhpc/train", "rdhpc/launch"):
        for path in sorted((REPO / folder).glob("*.py")):
            lines = len(path.read_text().splitlines())
            assert lines <= 500, f"{path.relative_to(REPO)}: {lines} lines (split it by job)"


def test_run_folder_files_are_named_once():
    """run_state.json, metrics.jsonl, the heartbeat folder and the stop-at variable are spelled in
    rdhpc/run_folder.py; everything else reaches them through RunFolder / STOP_AT_VARIABLE."""
    names = ["run_state.json", "metrics.jsonl", '"heartbeat"', "slurm_jobs.jsonl", "RDHPC_STOP_AT="]
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if path.name == "run_folder.py":
                continue
            code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
            code = re.sub(r'"""[\s\S]*?"""', "", code)  # docstrings may mention the files
            offenders += [f"{path.relative_to(REPO)}: {name}" for name in names if name in code]
    assert not offenders, offenders
