"""Slurm integration: the allocation the daemon runs in (env.py). No torch."""
