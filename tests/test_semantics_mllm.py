"""The MLLM wrapper: answer-token hidden states cut at EOS, layer choice, loading errors, OOM detection."""
from __future__ import annotations

import pytest
import torch

from mugcp.semantics.mllm import (
    MLLMError,
    answer_hidden_states,
    is_out_of_memory,
    load_text_config,
    resolve_layer,
    resolve_model_name,
)

EOS, PAD = 2, 0


def fake_generate_hidden(batch: int, prompt_len: int, steps: int, layers: int, dim: int):
    """generate()'s layout: step 0 has the whole prompt, later steps one position; values encode (layer, b, step)."""
    out = []
    for step in range(steps):
        length = prompt_len if step == 0 else 1
        per_layer = []
        for layer in range(layers + 1):
            t = torch.zeros(batch, length, dim)
            for b in range(batch):
                t[b, :, 0] = layer
                t[b, :, 1] = b
                t[b, :, 2] = step
                t[b, :-1, 2] = -1  # earlier prompt positions must never be picked
            per_layer.append(t)
        out.append(tuple(per_layer))
    return tuple(out)


def test_answer_states_stop_at_first_eos_and_ignore_padding():
    generated = torch.tensor(
        [
            [5, 6, EOS, PAD, PAD],  # finished early: 3 rows (EOS included), padding dropped
            [7, 8, 9, 10, 11],  # ran to max_new_tokens: 5 rows
            [EOS, PAD, PAD, PAD, PAD],  # empty answer still keeps the EOS row
            [4, EOS, 3, EOS, PAD],  # only the first EOS counts
        ]
    )
    hidden = fake_generate_hidden(batch=4, prompt_len=6, steps=5, layers=3, dim=3)
    states, lengths = answer_hidden_states(hidden, generated, [EOS], layer=2)
    assert lengths == [3, 5, 1, 2]
    for b, rows in enumerate(states):
        assert rows.shape == (lengths[b], 3)
        assert torch.equal(rows[:, 0], torch.full((lengths[b],), 2.0))  # the chosen layer
        assert torch.equal(rows[:, 1], torch.full((lengths[b],), float(b)))  # its own row of the batch
        assert torch.equal(rows[:, 2], torch.arange(lengths[b], dtype=torch.float))  # last position of each step


def test_answer_states_accept_several_eos_ids():
    generated = torch.tensor([[5, 9, 6], [5, 6, 2]])
    hidden = fake_generate_hidden(batch=2, prompt_len=3, steps=3, layers=1, dim=3)
    _, lengths = answer_hidden_states(hidden, generated, [2, 9], layer=-1)
    assert lengths == [2, 3]


def test_answer_states_refuse_misaligned_steps():
    hidden = fake_generate_hidden(batch=1, prompt_len=3, steps=2, layers=1, dim=3)
    with pytest.raises(MLLMError, match="2 hidden-state steps for 3 new tokens"):
        answer_hidden_states(hidden, torch.tensor([[1, 1, 1]]), [EOS], layer=0)


class _TextConfig:
    num_hidden_layers = 4


def test_layer_resolution_and_range_error():
    assert resolve_layer(-1, _TextConfig, "m") == 4
    assert resolve_layer(0, _TextConfig, "m") == 0
    assert resolve_layer(-5, _TextConfig, "m") == 0
    with pytest.raises(MLLMError, match=r"--layer 5 is out of range for m: .*4 layers, so --layer takes -5\.\.4"):
        resolve_layer(5, _TextConfig, "m")


def test_model_name_resolution(tmp_path):
    assert resolve_model_name(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model_name("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    with pytest.raises(MLLMError, match="no such directory. Offline loading needs a local directory"):
        resolve_model_name(str(tmp_path / "missing_model"))
    with pytest.raises(MLLMError, match="no such directory"):
        resolve_model_name("./models/llava")


def test_loading_a_directory_without_a_model_names_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(MLLMError) as info:
        load_text_config(str(tmp_path))
    message = str(info.value)
    assert f"could not load the MLLM '{tmp_path}'" in message
    assert "Offline loading needs a local directory holding the model's config, weights and processor" in message
    assert "lacks config.json; weights (*.safetensors or *.bin); processor files" in message


def test_a_complete_folder_that_fails_to_load_says_why_without_the_folder_hint(tmp_path, monkeypatch):
    """The first line names the exception (what failed); the model-folder hint only when files are missing."""
    import transformers

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels' (/somewhere/kernels/__init__.py)\n"
                          "more detail")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", broken)
    with pytest.raises(MLLMError) as info:
        load_text_config(str(tmp_path))
    assert str(info.value) == (f"could not load the MLLM '{tmp_path}' (config): ImportError: cannot import name "
                               "'CUDAProperties' from 'kernels' (/somewhere/kernels/__init__.py)")


def test_a_failed_tasks_log_is_summarised_by_its_error_line_not_its_hint():
    from mugcp.launch.slurm import telling_line

    log = ["loading", "error: could not load the MLLM '/m' (config): ImportError: cannot import name 'X'",
           "--mllm takes a Hugging Face image-text-to-text model ...", "Offline loading needs a local directory ..."]
    assert telling_line(log) == log[1]
    traceback = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: bad shape",
                 "srun: error: task 0 exited"]
    assert telling_line(traceback) == "ValueError: bad shape"
    assert telling_line(["epoch 1/2", "epoch 2/2"]) == "epoch 2/2"


def test_out_of_memory_detection():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
