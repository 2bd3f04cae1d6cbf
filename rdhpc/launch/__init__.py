"""Starting the trainer: N local ranks (local.py); Slurm through submitit comes with issue 4."""
