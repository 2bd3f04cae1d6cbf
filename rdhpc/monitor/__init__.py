"""Watching runs: TensorBoard served for a cluster user (tensorboard.py), scalars exported to CSV and
PNG for papers and reports (tb_export.py, `tools/tb_export.py`)."""
