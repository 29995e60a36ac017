"""Entry points of the operator process: argument parsing and start-up, nothing else."""
