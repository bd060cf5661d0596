"""Every name in a run folder and a sweep root, spelled here once.

A reader looking for where a file is written or read greps its constant. This module imports nothing,
so every layer may read it (``tests/test_layers.py`` puts it beside ``mugcp.errors``), the launch
layer without torch, and ``mugcp.launch.slurm_task``, which travels to a Slurm job by value: the
constants it uses go with it as plain strings. ``tests/test_layers.py`` also fails when one of these
names is spelled as a string literal in another module of ``mugcp``.
"""
from __future__ import annotations

# -- a run folder (``mugcp.train --output RUN``) ----------------------------------------------------
CONFIG_FILE = "config.yaml"  # the resolved config the run used; its presence means the run has started
LOG_FILE = "log.txt"  # the run's log, with the traceback of a failure
FINAL_METRICS_FILE = "metrics.json"  # the run's (or an evaluation's) final numbers; a finished run has one
STEP_METRICS_FILE = "metrics.jsonl"  # one JSON line per optimiser step and per evaluation, for the curves
CURVES_FILE = "curves.png"  # drawn from STEP_METRICS_FILE
SPLITS_FILE = "splits.json"  # the few-shot sample and class splits the run trained and evaluated on
TENSORBOARD_DIR = "tensorboard"  # the scalars, when train.tensorboard is on
PREDICTIONS_DIR = "predictions"  # <subset>.csv: every evaluated image's prediction
PER_CLASS_DIR = "per_class"  # <subset>.csv: accuracy per class (also a folder of the report's per-class plots)
CONFUSION_DIR = "confusion"  # <subset>.png and <subset>_pairs.csv
LOCK_FILE = ".lock"  # mugcp.runs.run_lock: the process working in the folder holds it
SUPERSEDED_FILE = "superseded.json"  # a finished run rerun with a changed config names its successor here
EVALUATION_DIR_PREFIX = "eval_"  # RUN/eval_<dataset>[_<time>]: an evaluation of the run's checkpoint

# -- RUN/checkpoint/ --------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"
PREVIOUS_SUFFIX = ".previous"  # checkpoint.previous: the last checkpoint while a new one is swapped in
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"  # optimiser, scheduler, scaler and position, for --resume

# -- a folder a Slurm job runs in (a run folder, or an extraction's shard folder) -------------------
SLURM_STATE_FILE = "slurm_state.json"  # the task's own record of its job: state, return code, restarts
SLURM_LOG_STEM = "slurm-{job_id}"  # + ".out" / ".err": the command's stdout and stderr (rank 0)
SLURM_RANK_LOG_STEM = "slurm-{job_id}.rank{rank}"  # the same for rank r > 0 of a data-parallel job
SUBMITIT_DIR = ".submitit"  # submitit's pickles and wrapper logs

# -- a sweep root (``mugcp.sweep --root ROOT``) -----------------------------------------------------
SWEEP_LOGS_DIR = "logs"  # the local runner's console output per job
SWEEP_CLAIMS_DIR = ".claims"  # the local runner's per-job claims (a lock each)
SWEEP_SLURM_JOBS_FILE = "slurm_jobs.json"  # {run: Slurm job id, folder} of the sweep's submissions
SWEEP_SUBMIT_LOCK_FILE = ".slurm_submit.lock"  # held across one submission of the sweep
REPORT_DIR = "report"  # ROOT/report: the sweep's report once every run finished
RESULTS_TABLE_FILE = "results.md"  # in a report folder, with the two below
RESULTS_CSV_FILE = "results.csv"
RESULTS_FIGURE_FILE = "results.png"
COST_CSV_FILE = "cost.csv"  # the cost of each method and dataset (mugcp/reports/cost.py), beside the results
COST_FIGURE_FILE = "cost.png"


def job_file_stem(job_name: str) -> str:
    """A sweep job's name as one file name (an evaluation's name holds a ``/``)."""
    return job_name.replace("/", "__")


def sweep_claim_file(job_name: str) -> str:
    """The claim a local sweep holds on a job, in ``ROOT/SWEEP_CLAIMS_DIR``."""
    return job_file_stem(job_name) + LOCK_FILE


def sweep_log_file(job_name: str) -> str:
    """A job's console output, in ``ROOT/SWEEP_LOGS_DIR``."""
    return job_file_stem(job_name) + ".txt"
