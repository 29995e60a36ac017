"""Entry points of the per-pod agent: argument parsing and start-up, nothing else."""
