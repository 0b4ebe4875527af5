"""cluster: many runs. Sweep files, run keys, submitit dispatch to Slurm or local, status,
the regime report and the ``normlab`` command."""
