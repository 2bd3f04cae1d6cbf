"""Evaluation of recurrent-depth models: loss against depth (depth_eval) and lm-evaluation-harness
benchmarks at any depth (lm_eval_adapter, model name `rdhpc`)."""
