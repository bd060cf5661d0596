"""Slurm options and the one-line reasons `--launcher slurm` gives; no cluster and no submitit needed."""
import argparse
import builtins

import pytest

from mugcp.errors import UserError
from mugcp.launch.slurm import SlurmError, SlurmOptions, add_slurm_arguments, parse_time_minutes, slurm_available


@pytest.mark.parametrize("text, minutes", [
    (90, 90), ("90", 90), ("1:30", 2), ("01:30:00", 90), ("2-00", 2880), ("1-02:03", 1563), ("0-00:00:30", 1),
])
def test_slurm_time_formats_become_whole_minutes(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("bad", ["1h", "", "0", "1:2:3:4", True, 1.5])
def test_a_bad_time_names_the_field_and_the_formats(bad):
    with pytest.raises(SlurmError, match=r"slurm\.time: .*(D-HH:MM:SS|positive)"):
        parse_time_minutes(bad)


def test_a_slurm_section_is_read_with_dashes_or_underscores():
    options = SlurmOptions.from_mapping({"partition": "gpu", "time": "04:00:00", "gpus-per-run": 1, "cpus_per_run": 8,
                                         "mem": "32G", "array_parallelism": 10, "setup": "module load cuda"})
    assert (options.partition, options.time, options.gpus_per_run, options.cpus_per_run, options.mem,
            options.array_parallelism, options.setup) == ("gpu", 240, 1, 8, "32G", 10, ["module load cuda"])


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(SlurmError) as err:
        SlurmOptions.from_mapping({"partitoin": "gpu", "gpus": 2}, where="base2new.yaml slurm")
    message = str(err.value)
    assert message.startswith("base2new.yaml slurm: unknown key(s) gpus, partitoin (did you mean partition?); "
                              "valid keys: partition, time,")
    assert isinstance(err.value, UserError)


@pytest.mark.parametrize("mapping, fragment", [
    ({"gpus_per_run": -1}, "sweep.yaml slurm.gpus_per_run: expected a whole number >= 0, got -1"),
    ({"nodes": 0}, "sweep.yaml slurm.nodes: expected a whole number >= 1, got 0"),
    ({"cpus_per_run": "8"}, "sweep.yaml slurm.cpus_per_run: expected a whole number >= 1, got '8'"),
    ({"mem": "lots"}, "sweep.yaml slurm.mem: 'lots' is not a memory size"),
    ({"partition": ""}, "sweep.yaml slurm.partition: expected a name"),
    (["gpu"], "sweep.yaml slurm: expected a mapping of Slurm options"),
])
def test_bad_values_say_which_field(mapping, fragment):
    with pytest.raises(SlurmError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        SlurmOptions.from_mapping(mapping, where="sweep.yaml slurm")


def test_flags_given_on_the_command_line_override_the_file():
    parser = argparse.ArgumentParser()
    add_slurm_arguments(parser)
    args = parser.parse_args(["--slurm-partition", "long", "--slurm-time", "2-00:00:00", "--slurm-gpus-per-node", "4",
                              "--slurm-setup", "module load cuda", "--slurm-setup", "source env/bin/activate"])
    base = SlurmOptions.from_mapping({"partition": "short", "mem": "16G", "time": 30})
    options = base.updated_from_args(args)
    assert ((options.partition, options.time, options.mem, options.gpus_per_node, options.nodes)
            == ("long", 2880, "16G", 4, 1))
    assert options.setup == ["module load cuda", "source env/bin/activate"]
    assert base.partition == "short"  # the file's options are left as they were


def test_only_the_flags_a_command_uses_are_added():
    parser = argparse.ArgumentParser()
    add_slurm_arguments(parser, only=["partition", "nodes"])
    assert parser.parse_args(["--slurm-nodes", "2"]).slurm_nodes == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--slurm-gpus-per-run", "1"])


def test_without_slurm_commands_the_reason_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = slurm_available()
    assert reason.startswith("sbatch not found: ") and "\n" not in reason


def test_without_submitit_the_reason_says_how_to_install_it(monkeypatch, tmp_path):
    for tool in ("sbatch", "srun", "squeue", "scancel"):
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    real_import = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit" or name.startswith("submitit."):
            raise ImportError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    assert slurm_available() == "submitit is not installed: pip install -e '.[slurm]'"


def test_the_last_log_line_prefers_stderr_and_reads_progress_bars(tmp_path):
    from mugcp.launch.slurm import last_log_line

    (tmp_path / "slurm-7_1.out").write_text("epoch 1\nepoch 2\n\n")
    assert last_log_line(tmp_path, "7_1") == "epoch 2"
    (tmp_path / "slurm-7_1.err").write_text("train:  10%|#  | 1/10\rtrain:  20%|## | 2/10\r")
    assert last_log_line(tmp_path, "7_1") == "train:  20%|## | 2/10"
    assert last_log_line(tmp_path, "8") == ""
