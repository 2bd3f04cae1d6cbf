"""The wheels tools/device_bench.sh installs on a GPU machine that has PyTorch but no DeepSpeed and
no network (Python 3.12, x86-64 Linux), at the versions of this machine's .venv, into .whl/.

    make device-wheels            # or: .venv/bin/python tools/device_wheels.py

DeepSpeed is published as a source package only: its wheel is built here, without compiled ops
(it compiles what it needs at first use; the trainer needs none). The others are downloaded as
binary wheels for the target. Only what the benchmark imports and the GPU image lacks is fetched:
DeepSpeed, hjson, pydantic with its core, annotated-types, typing-inspection, typing-extensions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOWNLOADED = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / ".whl"))
    p.add_argument("--python-version", default="3.12")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # one version of each, or the install there stops
        old.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    version = importlib.metadata.version
    subprocess.run(pip + ["wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                          f"deepspeed=={version('deepspeed')}"], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    platform_args = [a for plat in PLATFORMS for a in ("--platform", plat)]
    subprocess.run(pip + ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
                          args.python_version, "--implementation", "cp", *platform_args, "-d", str(out),
                          *(f"{name}=={version(name)}" for name in DOWNLOADED)], check=True)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2 ** 20:7.2f} MiB  {w.name}")
    print(f"{total / 2 ** 20:7.2f} MiB in {len(wheels)} wheels in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
