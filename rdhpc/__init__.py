"""rdhpc: distributed pretraining of recurrent-depth language models on HPC clusters."""

__version__ = "0.1.0"
