"""Cluster launchers: the SLURM batch script (train.sbatch), the sweep launcher (sweep.py), a test SLURM setup."""
