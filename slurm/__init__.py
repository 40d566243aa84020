"""The sbatch templates (``train.sbatch``, ``prepare.sbatch``, read by ``launcher.slurm.fill_template``) and
the local real-Slurm harness (``local-cluster.sh``), shipped as package data."""
