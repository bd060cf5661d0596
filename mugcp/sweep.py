"""``python -m mugcp.sweep SWEEP.yaml [--root DIR] [--dry-run] [--jobs N]``: a paper's protocol in one command.

A sweep file names a protocol and the grid to run; every run is ``python -m mugcp.train`` (and, for
the transfer protocols, ``python -m mugcp.evaluate`` on each target) in its own folder under one root::

    protocol: base2new            # base2new | fewshot | cross_dataset | domain_generalization | grid
    datasets: [caltech101, dtd]   # cross_dataset / domain_generalization: source + targets instead
    seeds: [1, 2, 3]
    methods: [coop, maple, mugcp] # each starts from configs/methods/<name>.yaml (or from `config:`)
    shots: [16]
    overrides:                    # key: value for every run; $VARS are expanded, {dataset} {method}
      data.root: $DATA            #   {seed} {shots} are filled in per run
    method_overrides:             # per method, e.g. its semantic cache
      mugcp: {semantic.cache: caches/{dataset}}
    eval_overrides: {}            # transfer protocols: for every `mugcp.evaluate` on a target ({dataset} = target)
    method_eval_overrides:        #   and per method
      mugcp: {semantic.cache: caches/{dataset}}

Finished runs (``metrics.json`` present) are skipped; interrupted ones continue with ``--resume``, so
rerunning the command after a crash or Ctrl-C picks up where it stopped. At the end the runs are
summarised by ``mugcp.report`` in the protocol's layout (``ROOT/report/``). Published protocols:
``configs/sweeps/{base2new,cross_dataset,domain_generalization,fewshot}.yaml``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from mugcp.cli import run_cli
from mugcp.config import CONFIG_DIR, ConfigError, parse_value, read_yaml, resolve_config_path

STANDARD_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft",
                     "sun397", "dtd", "eurosat", "ucf101")
IMAGENET_VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# What each protocol means when the sweep file leaves it out (the published setting).
PROTOCOLS: dict[str, dict] = {
    "base2new": {"datasets": list(STANDARD_DATASETS), "shots": [16], "train_protocol": "base2new"},
    "fewshot": {"datasets": list(STANDARD_DATASETS), "shots": [1, 2, 4, 8, 16], "train_protocol": "all"},
    "cross_dataset": {"source": "imagenet", "targets": list(STANDARD_DATASETS[1:]), "shots": [16], "train_protocol": "all"},
    "domain_generalization": {"source": "imagenet", "targets": list(IMAGENET_VARIANTS), "shots": [16], "train_protocol": "all"},
    "grid": {"shots": [16], "train_protocol": None},  # data.protocol from the config / overrides
}
TRANSFER_PROTOCOLS = ("cross_dataset", "domain_generalization")
SWEEP_KEYS = {"protocol", "datasets", "source", "targets", "seeds", "methods", "shots", "config", "overrides", "method_overrides",
              "eval_overrides", "method_eval_overrides"}
PLACEHOLDERS = ("dataset", "method", "seed", "shots")
METRICS_FILE = "metrics.json"


@dataclass
class Job:
    """One command of the sweep: a training run, or the evaluation of a trained run on a target."""

    name: str
    folder: Path
    module: str  # mugcp.train | mugcp.evaluate
    args: list[str]
    depends_on: Optional["Job"] = None
    mode: str = "new"  # new | resume | overwrite | done (training); new | done (evaluation)
    status: str = "pending"
    seconds: float = 0.0
    message: str = ""

    def command(self, python: str = "python") -> list[str]:
        flag = {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(self.mode, [])
        return [python, "-m", self.module, *self.args[:2], *flag, *self.args[2:]]


@dataclass
class Sweep:
    path: Path
    protocol: str
    datasets: list[str]
    targets: list[str]
    seeds: list[int]
    methods: list[str]
    shots: list[int]
    config: Optional[str]
    overrides: dict
    method_overrides: dict
    eval_overrides: dict
    method_eval_overrides: dict
    train_protocol: Optional[str] = None
    jobs: list[Job] = field(default_factory=list)


# ------------------------------------------------------------------------------------ the file
def _as_list(value, key: str, where: str, kind=str) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    try:
        return [kind(item) for item in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' must be a list of {kind.__name__}s, got {value!r}.") from None


def _as_overrides(value, key: str, where: str) -> dict:
    """``{"optim.lr": 0.01}`` or ``["optim.lr=0.01"]`` → ``{"optim.lr": 0.01}``."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(item, str) and "=" in item for item in value):
        return {item.split("=", 1)[0]: parse_value(item.split("=", 1)[1]) for item in value}
    raise ConfigError(f"{where}: '{key}' must map dotted keys to values (e.g. optim.lr: 0.01) or list key=value strings; got {value!r}.")


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file; every problem names the file, the key and what is allowed."""
    from mugcp.data import DATASET_NAMES
    from mugcp.methods import list_methods

    path = resolve_config_path(path)
    if not path.is_file() and (CONFIG_DIR / "sweeps" / f"{path}.yaml").is_file():
        path = CONFIG_DIR / "sweeps" / f"{path}.yaml"
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}. Give a YAML file, or a published protocol: "
                          f"{', '.join(sorted(p.stem for p in (CONFIG_DIR / 'sweeps').glob('*.yaml')))}.")
    data = read_yaml(path)
    where = str(path)
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown sweep key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SWEEP_KEYS))}.")
    protocol = data.get("protocol", "grid")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{where}: protocol '{protocol}' is not one of {', '.join(PROTOCOLS)}.")
    defaults = PROTOCOLS[protocol]
    transfer = protocol in TRANSFER_PROTOCOLS
    if transfer:
        if "datasets" in data:
            raise ConfigError(f"{where}: protocol {protocol} trains on 'source' and evaluates on 'targets'; drop 'datasets'.")
        datasets = _as_list(data.get("source", defaults["source"]), "source", where)
        if len(datasets) != 1:
            raise ConfigError(f"{where}: 'source' is one dataset, got {datasets}.")
        targets = _as_list(data.get("targets", defaults["targets"]), "targets", where)
    else:
        for key in ("source", "targets"):
            if key in data:
                raise ConfigError(f"{where}: '{key}' belongs to the cross_dataset / domain_generalization protocols; "
                                  f"protocol {protocol} uses 'datasets'.")
        datasets = _as_list(data.get("datasets", defaults.get("datasets")), "datasets", where)
        targets = []
    for name in [*datasets, *targets]:
        if name not in DATASET_NAMES:
            raise ConfigError(f"{where}: unknown dataset '{name}'; known: {', '.join(DATASET_NAMES)}.")
    if not datasets:
        raise ConfigError(f"{where}: 'datasets' is empty; list the datasets to run.")
    seeds = _as_list(data.get("seeds", [1, 2, 3]), "seeds", where, int)
    shots = _as_list(data.get("shots", defaults["shots"]), "shots", where, int)
    methods = _as_list(data.get("methods"), "methods", where)
    if not methods:
        raise ConfigError(f"{where}: 'methods' is missing; list the methods to run (e.g. methods: [coop, mugcp]).")
    known = list_methods()
    for name in methods:
        if name not in known:
            raise ConfigError(f"{where}: unknown method '{name}'; known: {', '.join(known)}.")
    for key, values in (("seeds", seeds), ("shots", shots), ("methods", methods)):
        if not values or len(set(values)) != len(values):
            raise ConfigError(f"{where}: '{key}' must be a non-empty list without repeats, got {values}.")
    per_method = {}
    for key in ("method_overrides", "method_eval_overrides"):
        given = data.get(key) or {}
        if not isinstance(given, dict) or set(given) - set(methods):
            raise ConfigError(f"{where}: '{key}' maps methods of this sweep ({', '.join(methods)}) to overrides; got {given!r}.")
        per_method[key] = {m: _as_overrides(v, f"{key}.{m}", where) for m, v in given.items()}
    if not transfer and (data.get("eval_overrides") or data.get("method_eval_overrides")):
        raise ConfigError(f"{where}: eval_overrides apply to the evaluations of the cross_dataset / domain_generalization "
                          f"protocols; protocol {protocol} has none.")
    config = data.get("config")
    if config is not None:
        beside = path.parent / str(config)
        config_path = beside if beside.is_file() else resolve_config_path(str(config))
        if not config_path.is_file():
            raise ConfigError(f"{where}: config '{config}' not found (a path relative to the sweep file, or a name under configs/).")
        config = str(config_path)
    sweep = Sweep(
        path=path, protocol=protocol, datasets=datasets, targets=targets, seeds=seeds, methods=methods, shots=shots,
        config=config, overrides=_as_overrides(data.get("overrides"), "overrides", where),
        method_overrides=per_method["method_overrides"],
        eval_overrides=_as_overrides(data.get("eval_overrides"), "eval_overrides", where),
        method_eval_overrides=per_method["method_eval_overrides"],
        train_protocol=defaults["train_protocol"],
    )
    return sweep


def _render(value) -> str:
    """A value as the command line's ``key=value`` text that parses back to it."""
    if isinstance(value, str) and parse_value(value) == value and value.strip() == value and value:
        return value
    return json.dumps(value)


def _fill(value, fields: dict, where: str):
    """Expand $VARS and {dataset}-style placeholders in strings (recursively in lists)."""
    if isinstance(value, list):
        return [_fill(v, fields, where) for v in value]
    if not isinstance(value, str):
        return value
    expanded = os.path.expandvars(value)
    leftover = [part for part in expanded.split("$")[1:] if part[:1] == "{" or part[:1].isalpha() or part[:1] == "_"]
    if leftover:
        name = leftover[0].lstrip("{").split("}")[0].split("/")[0]
        raise ConfigError(f"{where}: '{value}' uses ${name}, which is not set; export {name}=... before the sweep.")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(expanded) if name}
    except ValueError as err:
        raise ConfigError(f"{where}: '{value}': {err}.") from None
    unknown = names - set(fields)
    if unknown:
        raise ConfigError(f"{where}: '{value}' uses {{{sorted(unknown)[0]}}}; placeholders are {', '.join('{%s}' % p for p in PLACEHOLDERS)}.")
    return expanded.format(**fields) if names else expanded


def _override_args(overrides: dict, fields: dict, where: str) -> list[str]:
    return [f"{key}={_render(_fill(value, fields, f'{where}: {key}'))}" for key, value in overrides.items()]


def run_name(method: str, dataset: str, shots: int, seed: int) -> str:
    return f"{method}_{dataset}_k{shots}_s{seed}"


def plan(sweep: Sweep, root: Path) -> list[Job]:
    """Every job of the sweep in a stable order, each marked new / resume / overwrite / done from what ``root`` holds."""
    jobs: list[Job] = []
    for dataset in sweep.datasets:
        for method in sweep.methods:
            for shots in sweep.shots:
                for seed in sweep.seeds:
                    fields = {"dataset": dataset, "method": method, "seed": seed, "shots": shots}
                    name = run_name(method, dataset, shots, seed)
                    folder = root / name
                    config = sweep.config or f"methods/{method}"
                    # --config comes first: command() puts --resume / --overwrite right after it.
                    args = ["--config", config, "--output", str(folder)]
                    if sweep.config:
                        args.append(f"method={method}")
                    args += [f"data.dataset={dataset}", f"data.shots={shots}", f"train.seed={seed}"]
                    if sweep.train_protocol:
                        args.append(f"data.protocol={sweep.train_protocol}")
                    args += _override_args(sweep.overrides, fields, f"{sweep.path}: overrides")
                    args += _override_args(sweep.method_overrides.get(method, {}), fields, f"{sweep.path}: method_overrides.{method}")
                    train_job = Job(name, folder, "mugcp.train", args, mode=_train_mode(folder))
                    jobs.append(train_job)
                    for target in sweep.targets:
                        eval_folder = folder / f"eval_{target}"
                        eval_fields = dict(fields, dataset=target)
                        eval_args = ["--checkpoint", str(folder), "--output", str(eval_folder), f"data.dataset={target}", "data.protocol=all"]
                        eval_args += _override_args(sweep.eval_overrides, eval_fields, f"{sweep.path}: eval_overrides")
                        eval_args += _override_args(sweep.method_eval_overrides.get(method, {}), eval_fields,
                                                    f"{sweep.path}: method_eval_overrides.{method}")
                        done = (eval_folder / METRICS_FILE).is_file()
                        jobs.append(Job(f"{name}/eval_{target}", eval_folder, "mugcp.evaluate", eval_args, depends_on=train_job,
                                        mode="done" if done else "new"))
    return jobs


def _train_mode(folder: Path) -> str:
    if (folder / METRICS_FILE).is_file():
        return "done"
    if (folder / "checkpoint" / "trainer_state.pt").is_file():
        return "resume"
    if (folder / "checkpoint").exists() or (folder / "checkpoint.previous").exists():
        return "overwrite"  # a checkpoint with nothing to resume from (e.g. zero-shot CLIP): start again
    return "new"


# ------------------------------------------------------------------------------------ running
def subprocess_launcher(python: str = sys.executable) -> Callable:
    """Runs a job as ``python -m MODULE ...``, its console output in ``log_path``; returns the exit status."""

    def launch(job: Job, env: dict, log_path: Path) -> int:
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(job.command(python), stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                return process.wait()
            except KeyboardInterrupt:
                process.wait()  # the child got the same Ctrl-C and stops at its own pace (checkpoint kept)
                raise

    return launch


def device_slots(jobs: int) -> list[dict]:
    """Environment changes per parallel slot: one GPU each with CUDA, else an even split of the CPU threads."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is a dependency
        gpus = 0
    if gpus:
        ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(gpus)]
        ids = ids[:gpus]
        if jobs > len(ids):
            raise ConfigError(f"--jobs {jobs}: this machine has {len(ids)} GPU(s) and each run takes one; use --jobs {len(ids)} or fewer.")
        return [{"CUDA_VISIBLE_DEVICES": ids[slot]} for slot in range(jobs)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} for _ in range(jobs)]


def _interrupted_message(job: Job) -> str:
    """What a rerun will do with an interrupted job, from what is on disk (not what we hope is there)."""
    if job.module != "mugcp.train":
        return "a rerun evaluates it again"
    state = job.folder / "checkpoint" / "trainer_state.pt"
    if state.is_file():
        return f"its last epoch checkpoint is in {state.parent}; a rerun resumes from it"
    return "nothing to resume from yet; a rerun starts it again"


def _last_error(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1][:300]


def run_jobs(jobs: Sequence[Job], root: Path, jobs_in_parallel: int = 1, launcher: Optional[Callable] = None,
             progress: bool = True, slots: Optional[list[dict]] = None) -> dict:
    """Run every pending job, at most ``jobs_in_parallel`` at once; a failed one does not stop the others.

    Returns counts per status. Ctrl-C stops starting new jobs, lets the running ones end (they keep
    their checkpoint), and re-raises KeyboardInterrupt.
    """
    from tqdm.auto import tqdm

    launcher = launcher or subprocess_launcher()
    slots = slots or device_slots(jobs_in_parallel)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    total = len(jobs)
    for job in jobs:
        if job.mode == "done":
            job.status = "skipped"
    pending = [job for job in jobs if job.status == "pending"]
    bar = tqdm(total=total, initial=total - len(pending), unit="run", desc="sweep", disable=not progress, dynamic_ncols=True)
    lock = threading.Condition()
    free_slots = list(range(len(slots)))
    running: list[threading.Thread] = []
    interrupted = threading.Event()

    def say(text: str) -> None:
        with lock:
            tqdm.write(f"{time.strftime('%H:%M:%S')} {text}")

    def work(job: Job, slot: int) -> None:
        index = jobs.index(job) + 1
        action = {"resume": "resume", "overwrite": "restart"}.get(job.mode, "start")
        say(f"[{index}/{total}] {action} {job.name}")
        env = dict(os.environ, **slots[slot])
        log_path = logs / (job.name.replace("/", "__") + ".txt")
        started = time.time()
        try:
            code = launcher(job, env, log_path)
        except KeyboardInterrupt:
            code = 130
            interrupted.set()
        except Exception as err:  # an in-process launcher's crash is this job's failure, not the sweep's
            code = 1
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"error: {type(err).__name__}: {err}\n")
        job.seconds = time.time() - started
        finished = (job.folder / METRICS_FILE).is_file()
        if code == 0 or (code in (130, -2) and finished):  # Ctrl-C while it was exiting: its results are complete
            job.status = "ok"
        elif code in (130, -2):
            job.status, job.message = "interrupted", _interrupted_message(job)
            interrupted.set()
        else:
            job.status, job.message = "failed", f"exit {code}: {_last_error(log_path)} (log: {log_path})"
        say(f"[{index}/{total}] {job.status} {job.name} in {_duration(job.seconds)}" + (f" — {job.message}" if job.message else ""))
        with lock:
            free_slots.append(slot)
            bar.update(1)
            lock.notify_all()

    try:
        queue = list(pending)
        while queue and not interrupted.is_set():
            with lock:
                while not free_slots:
                    lock.wait(0.2)
                ready = next((j for j in queue if j.depends_on is None or j.depends_on.status in ("ok", "skipped")), None)
                blocked = next((j for j in queue if j.depends_on is not None and j.depends_on.status in ("failed", "interrupted", "blocked")), None)
                if ready is None and blocked is None:
                    lock.wait(0.2)
                    continue
            if blocked is not None and ready is None:
                queue.remove(blocked)
                blocked.status, blocked.message = "blocked", f"{blocked.depends_on.name} did not finish"
                say(f"[{jobs.index(blocked) + 1}/{total}] blocked {blocked.name} — {blocked.message}")
                bar.update(1)
                continue
            queue.remove(ready)
            with lock:
                slot = free_slots.pop(0)
            if jobs_in_parallel == 1:
                work(ready, slot)  # in this thread: Ctrl-C reaches the job directly
            else:
                thread = threading.Thread(target=work, args=(ready, slot), daemon=True)
                running.append(thread)
                thread.start()
        for thread in running:
            thread.join()
    except KeyboardInterrupt:
        interrupted.set()
        for thread in running:
            thread.join()
    finally:
        bar.close()
    counts: dict[str, int] = {}
    for job in jobs:
        status = job.status if job.status != "pending" else "not started"
        counts[status] = counts.get(status, 0) + 1
    if interrupted.is_set():
        raise KeyboardInterrupt(counts)
    return counts


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def describe_counts(counts: dict) -> str:
    order = ("ok", "skipped", "failed", "interrupted", "blocked", "not started")
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))


# ------------------------------------------------------------------------------------ command line
def main(argv=None, launcher: Optional[Callable] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugcp.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML file, or a published protocol: base2new, cross_dataset, domain_generalization, fewshot")
    parser.add_argument("--root", help="folder of the sweep's runs (default: runs/sweeps/<sweep file name>)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once: one GPU each with CUDA, else the CPU threads split [1]")
    parser.add_argument("--no-progress", action="store_true", help="no overall progress bar")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}.")

    sweep = load_sweep(args.sweep)
    root = Path(args.root) if args.root else Path("runs") / "sweeps" / sweep.path.stem
    jobs = plan(sweep, root)
    runs = sum(job.module == "mugcp.train" for job in jobs)
    print(f"sweep {sweep.path} ({sweep.protocol}): {runs} training runs"
          + (f" + {len(jobs) - runs} evaluations" if len(jobs) > runs else "") + f" under {root}")
    if args.dry_run:
        for index, job in enumerate(jobs, 1):
            print(f"[{index}/{len(jobs)}] {job.mode:9s} {job.name}\n    {shlex.join(job.command())}")
        return 0
    try:
        counts = run_jobs(jobs, root, args.jobs, launcher=launcher, progress=not args.no_progress)
    except KeyboardInterrupt as stop:
        counts = stop.args[0] if stop.args and isinstance(stop.args[0], dict) else {}
        print(f"interrupted ({describe_counts(counts)}); rerun the same command to continue: finished runs are skipped, "
              "interrupted ones resume from their last checkpoint.", file=sys.stderr)
        return 130
    print(f"sweep done: {describe_counts(counts)}")
    finished = any((job.folder / METRICS_FILE).is_file() for job in jobs)
    if finished:
        from mugcp.report import write_report

        try:
            write_report([root], root / "report", layout=sweep.protocol if sweep.protocol != "grid" else "groups")
        except FileNotFoundError as err:  # e.g. every evaluation of a transfer sweep failed: the runs stay, say why
            print(f"no report: {err}", file=sys.stderr)
    failed = counts.get("failed", 0) + counts.get("blocked", 0)
    if failed:
        print(f"{failed} job(s) did not finish; their logs are under {root / 'logs'}. Fix the cause and rerun the same command.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
