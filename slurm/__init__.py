"""Launching stages on Slurm through submitit, and a local Slurm cluster for tests and rehearsals."""
