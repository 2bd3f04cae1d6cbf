"""rdhpc: distributed pretraining of recurrent-depth language models on HPC clusters.

Cluster users bring their own torch build (ROCm or CUDA), so torch is a range here; the project's
own set-up (Makefile, .ci/run) installs torch==2.13.0 in the same pip command as the rest.
"""

from setuptools import find_packages, setup

setup(
    name="rdhpc",
    version="0.1.0",
    description="Distributed pretraining of recurrent-depth (Huginn-style) language models with DeepSpeed and Slurm",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rdhpc", "rdhpc.*", "data_prep", "data_prep.*"]),
    install_requires=[
        "torch>=2.4,<2.14",
        "deepspeed>=0.16",
        "numpy",
        "pyarrow>=15",
        "zstandard",
        "orjson",
        "tokenizers>=0.21",
        "gigatoken>=0.10",  # the fast encoder; HF tokenizers stays the reference it is checked against
        "submitit>=1.5",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "PyYAML>=6",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # MPI rank discovery; the PyPI MPICH brings its own mpirun.
        "mpi": ["mpi4py>=3.1", "mpich"],
        "test": ["pytest>=7", "pytest-timeout"],
        # lm-evaluation-harness for `python -m rdhpc.eval.lm_eval_adapter` (brings datasets, pandas, scikit-learn)
        "eval": ["lm_eval>=0.4.13,<0.5"],
    },
    entry_points={"console_scripts": ["rdhpc=rdhpc.cli:main"]},
)
