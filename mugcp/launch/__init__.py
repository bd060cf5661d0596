"""Everything Slurm, through submitit: sweeps as one array, data-parallel training, sharded extraction, and
what runs inside a job (slurm_task.py, standard library only). Imports no torch: commands import these
modules before they know whether they train at all."""
