"""The trainer: optimizers and schedules (optim.py), the DeepSpeed config (deepspeed_config.py)."""
