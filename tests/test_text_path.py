"""The bucketed text path (issue 9) computes what the single-pass path computes.

Length buckets == one pass cut at the last EOT; the EOT-only last block == the full block at the EOT
rows; a shared prefix run once per copy == running it in every sequence; chunks recomputed in
backward give the same gradients, for plain, deep-list and hook prompts
and for the B×C methods (CoCoOp, MuGCP). Tolerances: 1e-5 on features (fp32), gradients to 1e-5 of
their scale.
"""
import contextlib

import pytest
import torch

from mugcp.backbones.text_buckets import eot_block, plan_chunks, text_groups
from mugcp.config import ConfigError
from mugcp.methods import create_model
from mugcp.runs.run_setup import configure_text_path

# EOT positions from 3 to 17: several buckets, one name alone at its length.
NAMES = ["cat", "red fox", "a rather long class name with quite a few words in it", "dog", "snow owl of the far north",
         "x", "sand cat", "blue whale"]


@contextlib.contextmanager
def text_path(clip, bucketing=True, memory_mb=None):
    saved = clip.text_bucketing, clip.text_memory_mb
    clip.text_bucketing, clip.text_memory_mb = bucketing, memory_mb
    try:
        yield
    finally:
        clip.text_bucketing, clip.text_memory_mb = saved


def assert_close(actual, expected, tolerance=1e-5):
    assert actual.shape == expected.shape
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance * max(1.0, expected.abs().max().item()), difference


# ----------------------------------------------------------------- grouping and planning
def test_groups_cover_every_row_once_and_fit_its_eot():
    eot = torch.tensor([4, 9, 4, 5, 19, 5, 4, 9])
    for overhead in (0, 8, 10**6):
        groups = text_groups(eot, copies=2, overhead_tokens=overhead)
        rows = torch.cat([rows for rows, _ in groups])
        assert sorted(rows.tolist()) == list(range(len(eot)))
        for rows, length in groups:
            assert int(eot[rows].max()) + 1 == length
    # No overhead: one group per EOT position. Prohibitive overhead: one group cut at the longest.
    assert [length for _, length in text_groups(eot, overhead_tokens=0)] == [5, 6, 10, 20]
    assert [length for _, length in text_groups(eot, overhead_tokens=10**6)] == [20]


def test_groups_merge_exactly_when_a_pass_costs_more_than_the_padding():
    # Lengths 5 (3 rows) and 6 (2 rows), one copy. Merged: 5 rows × 6 = 30 tokens + one pass;
    # apart: 15 + 12 = 27 tokens + two passes. Merging pays when a pass costs more than 3 tokens.
    eot = torch.tensor([4, 4, 4, 5, 5])
    assert len(text_groups(eot, overhead_tokens=2.9)) == 2
    assert len(text_groups(eot, overhead_tokens=3.1)) == 1
    # With 4 copies per row the padding is 4 × 3 = 12 tokens.
    assert len(text_groups(eot, copies=4, overhead_tokens=11.9)) == 2
    assert len(text_groups(eot, copies=4, overhead_tokens=12.1)) == 1


def test_chunk_plan_follows_the_budget():
    groups = [(torch.arange(0, 6), 10), (torch.arange(6, 10), 20)]  # 2 copies: 120 + 160 tokens
    # Everything fits: one chunk per group, no recomputation.
    assert [(len(r), n, re) for r, n, re in plan_chunks(groups, 2, 100, 10, budget=28_000, with_graph=True)] == [
        (6, 10, False), (4, 20, False)]
    # The graphs need 28,000 bytes, the budget is 16,000: chunks of at most budget/4 (40 tokens),
    # graphs kept up to budget/2 (80 tokens: two chunks), the rest recomputed.
    plan = plan_chunks(groups, 2, 100, 10, budget=16_000, with_graph=True)
    assert [(len(rows), length, recompute) for rows, length, recompute in plan] == (
        [(2, 10, False), (2, 10, False), (2, 10, True)] + [(1, 20, True)] * 4)
    assert sorted(torch.cat([rows for rows, _, _ in plan]).tolist()) == list(range(10))
    # Without a graph: chunks by the forward working set, never recomputed.
    plan = plan_chunks(groups, 2, 100, 10, budget=400, with_graph=False)
    assert not any(recompute for _, _, recompute in plan)
    assert all(2 * len(rows) * length * 10 <= 400 for rows, length, _ in plan)
    # A budget below one row still makes progress, one row per chunk.
    assert all(len(rows) == 1 for rows, _, _ in plan_chunks(groups, 2, 100, 10, budget=1, with_graph=False))


# ----------------------------------------------------------------- exactness of the backbone
def test_bucketed_equals_single_pass_with_and_without_chunks(vit_b32):
    tokens = vit_b32.tokenize(NAMES)
    with torch.no_grad():
        with text_path(vit_b32, bucketing=False):
            plain = vit_b32.encode_text(tokens)
        with text_path(vit_b32):
            bucketed = vit_b32.encode_text(tokens)
        with text_path(vit_b32, memory_mb=0.05):  # a few sequences per chunk
            chunked = vit_b32.encode_text(tokens)
        open_clip = vit_b32.model.encode_text(tokens)
    assert_close(bucketed, plain)
    assert_close(chunked, plain)
    assert_close(bucketed, open_clip)


def test_eot_only_last_block_equals_the_full_block_at_the_eot_rows(vit_b32):
    torch.manual_seed(3)
    block = vit_b32.model.transformer.resblocks[-1]
    x = torch.randn(5, 9, vit_b32.text_width)
    rows = torch.arange(5)
    with torch.no_grad():
        full = vit_b32.block(block, x, True)
        for eot in (torch.full((5,), 8), torch.tensor([8, 3, 0, 5, 8])):  # all at the end; mixed (masked keys)
            assert_close(eot_block(vit_b32, block, x, eot), full[rows, eot])
        vit_b32.attention_backend = "naive"
        try:
            assert_close(eot_block(vit_b32, block, x, torch.full((5,), 8)), full[:, 8])
        finally:
            vit_b32.attention_backend = "sdpa"


def test_hooks_see_each_bucket_at_its_own_length_and_the_last_layer_still_gets_prompts(vit_b32):
    tokens = vit_b32.tokenize(NAMES)
    eot = tokens.argmax(-1)
    copies = 16  # enough sequences per length for separate buckets to pay
    embeddings = vit_b32.embed_tokens(tokens).repeat(copies, 1, 1)
    shift = torch.randn(vit_b32.text_width) * 0.1
    seen = []

    def hook(layer, x):
        seen.append((layer, x.shape[0], x.shape[1]))
        if layer == vit_b32.text_layers - 1:  # a last-layer prompt must still reach the features
            x = torch.cat([x[:, :1], x[:, 1:2] + shift, x[:, 2:]], dim=1)
        return x

    with torch.no_grad():
        with text_path(vit_b32, bucketing=False):
            plain = vit_b32.encode_text(tokens, deep_prompts=hook, embeddings=embeddings)
        plain_lengths = {length for _, _, length in seen}
        seen.clear()
        with text_path(vit_b32):
            bucketed = vit_b32.encode_text(tokens, deep_prompts=hook, embeddings=embeddings)
    assert plain_lengths == {int(eot.max()) + 1}
    expected = {length for _, length in text_groups(eot, copies)}
    assert {length for _, _, length in seen} == expected and len(expected) > 1
    assert sum(rows for layer, rows, _ in seen if layer == 0) == copies * len(NAMES)
    assert_close(bucketed, plain)


def test_deep_prompt_lists_shared_and_per_sequence(vit_b32):
    tokens = vit_b32.tokenize([f"X X {name}." for name in NAMES])
    copies, width = 3, vit_b32.text_width
    torch.manual_seed(4)
    embeddings = vit_b32.embed_tokens(tokens).repeat(copies, 1, 1) + 0.01 * torch.randn(copies * len(NAMES), 1, width)
    prompts = [None, torch.randn(2, width), None, torch.randn(copies * len(NAMES), 2, width), *[None] * 7,
               torch.randn(1, 2, width)]
    with torch.no_grad():
        with text_path(vit_b32, bucketing=False):
            plain = vit_b32.encode_text(tokens, deep_prompts=prompts, embeddings=embeddings)
        with text_path(vit_b32, memory_mb=0.2):
            bucketed = vit_b32.encode_text(tokens, deep_prompts=prompts, embeddings=embeddings)
    assert_close(bucketed, plain)


def test_gradients_through_recomputed_chunks_equal_the_single_pass(vit_b32):
    tokens = vit_b32.tokenize([f"X X {name}." for name in NAMES])
    torch.manual_seed(5)
    base = vit_b32.embed_tokens(tokens).repeat(2, 1, 1)
    context = torch.randn(2, width := vit_b32.text_width, requires_grad=True)
    deep = torch.randn(2, width, requires_grad=True)
    target = torch.randn(2 * len(NAMES), vit_b32.embed_dim)
    calls = []

    def run(bucketing, memory_mb):
        context.grad = deep.grad = None

        def hook(layer, x):
            calls.append(layer)
            if layer == 4:
                x = torch.cat([x[:, :1], deep.expand(x.shape[0], -1, -1), x[:, 3:]], dim=1)
            return x

        embeddings = torch.cat([base[:, :1], context.expand(base.shape[0], -1, -1), base[:, 3:]], dim=1)
        with text_path(vit_b32, bucketing, memory_mb):
            loss = (vit_b32.encode_text(tokens, deep_prompts=hook, embeddings=embeddings) * target).sum()
        loss.backward()
        return loss.detach(), context.grad.clone(), deep.grad.clone()

    plain = run(False, None)
    for got, expected in zip(run(True, None), plain):  # buckets, every graph kept
        assert_close(got, expected)
    calls.clear()
    chunked = run(True, 0.3)  # under one row's graph: one row (2 sequences) per chunk, every chunk recomputed
    for got, expected in zip(chunked, plain):
        assert_close(got, expected)
    # Each chunk ran twice: once in forward, once more in backward, since its graph was not kept.
    assert calls.count(0) == 2 * len(NAMES)


def test_shared_prefix_runs_once_per_copy_with_the_same_features_and_gradients(vit_b32):
    tokens = vit_b32.tokenize([f"X X {name}." for name in NAMES])
    copies, width = 3, vit_b32.text_width
    torch.manual_seed(7)
    base = vit_b32.embed_tokens(tokens).repeat(copies, 1, 1)
    context = torch.randn(copies, 2, width, requires_grad=True)  # per copy (image), shared by its classes
    deep = torch.randn(copies, 2, width, requires_grad=True)
    target = torch.randn(copies * len(NAMES), vit_b32.embed_dim)
    shapes = []

    def hook(layer, x):
        shapes.append(tuple(x.shape))
        if layer in (5, vit_b32.text_layers - 1):  # prompts up to the last layer, per copy
            per_copy = deep.repeat_interleave(x.shape[0] // copies, dim=0)
            x = torch.cat([x[:, :1], per_copy, x[:, 3:]], dim=1)
        return x

    def run(bucketing, memory_mb, shared_prefix):
        context.grad = deep.grad = None
        per_sequence = context.repeat_interleave(len(NAMES), dim=0)
        embeddings = torch.cat([base[:, :1], per_sequence, base[:, 3:]], dim=1)
        with text_path(vit_b32, bucketing, memory_mb):
            features = vit_b32.encode_text(tokens, deep_prompts=hook, embeddings=embeddings,
                                           shared_prefix=shared_prefix)
        (features * target).sum().backward()
        return features.detach(), context.grad.clone(), deep.grad.clone()

    plain = run(False, None, 3)  # the single pass ignores shared_prefix
    shapes.clear()
    for memory_mb in (None, 0.3):
        for got, expected in zip(run(True, memory_mb, 3), plain):
            assert_close(got, expected)
    # Hooks saw only the prefix, once per copy: (copies, 3, width) at every layer.
    assert set(shapes) == {(copies, 3, width)}


def test_shared_prefix_refuses_prompts_that_are_not_shared(vit_b32):
    tokens = vit_b32.tokenize([f"X X {name}." for name in NAMES[:3]])
    per_sequence = [None, torch.randn(3, 2, vit_b32.text_width)]
    too_long = [None, torch.randn(4, vit_b32.text_width)]
    with text_path(vit_b32), torch.no_grad():
        with pytest.raises(ValueError,
                           match=r"the text prompt of layer 1 \(\(3, 2, 512\)\) is not shared .* first 3 positions; "
                                 r"pass shared_prefix=0"):
            vit_b32.encode_text(tokens, deep_prompts=per_sequence, shared_prefix=3)
        with pytest.raises(ValueError, match=r"layer 1 \(\(4, 512\)\) is not shared"):
            vit_b32.encode_text(tokens, deep_prompts=too_long, shared_prefix=3)


# ----------------------------------------------------------------- the methods
@pytest.mark.parametrize("method,options", [
    ("coop", {"n_ctx": 4}),
    ("maple", {"depth": 12}),  # prompts up to the last layer, before its EOT-only block
    ("cocoop", {}),
    ("mugcp", {"semantic_source": "none", "depth": 3}),
])
def test_method_loss_and_gradients_equal_the_single_pass(vit_b32, method, options):
    torch.manual_seed(0)
    model = create_model(method, NAMES, backbone=vit_b32, **options)
    model.train()
    batch = {"images": torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2)),
             "labels": torch.tensor([2, 4])}

    def step(bucketing, memory_mb):
        model.zero_grad(set_to_none=True)
        with text_path(vit_b32, bucketing, memory_mb):
            loss, logits, _ = model.training_step(batch)
            loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_logits, plain_grads = step(False, None)
    scale = max(g.abs().max().item() for g in plain_grads.values())
    logits, grads = step(True, 0.5)  # buckets, and chunks recomputed in backward
    assert_close(logits, plain_logits, 1e-4)  # logits are ×100 (CLIP's temperature)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert (grad - plain_grads[name]).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("method,options",
                         [("cocoop", {"max_text_sequences": 0}), ("mugcp", {"semantic_source": "none", "depth": 2})])
def test_conditional_evaluation_in_small_chunks_equals_the_single_pass(vit_b32, method, options):
    torch.manual_seed(0)
    model = create_model(method, NAMES, backbone=vit_b32, **options).eval()
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        with text_path(vit_b32, bucketing=False):
            plain = model(images)
        with text_path(vit_b32, memory_mb=0.1):
            chunked = model(images)
    assert_close(chunked, plain, 1e-4)


def test_config_keys_reach_the_backbone_and_bad_values_are_named(vit_b32):
    import copy

    from mugcp.config import DEFAULTS
    from mugcp.config_schema import check_values

    with text_path(vit_b32):
        configure_text_path(vit_b32, False, 2048)
        assert (vit_b32.text_bucketing, vit_b32.text_memory_mb) == (False, 2048)
        configure_text_path(vit_b32, True, "auto")
        assert (vit_b32.text_bucketing, vit_b32.text_memory_mb) == (True, None)
    for section, key, value, message in (
        ("train", "text_memory_mb", -1, r"^train.text_memory_mb=-1 is not allowed: expected a number > 0"),
        ("model", "text_bucketing", "yes", r"^model.text_bucketing='yes' is not allowed: expected true or false"),
    ):
        cfg = copy.deepcopy(DEFAULTS)
        cfg[section][key] = value
        with pytest.raises(ConfigError, match=message):
            check_values(cfg)


@pytest.mark.slow  # ~11 s: memory-profiled passes of both text paths
def test_memory_of_the_bxc_text_pass_follows_the_budget_in_training_and_evaluation(vit_b32):
    from benchmarks.conftest import peak_memory_bytes  # the profiler's allocation peak, as the benchmarks measure it

    torch.manual_seed(0)
    names = [f"class number {i}" + " extra" * (i % 5) for i in range(64)]
    model = create_model("cocoop", names, backbone=vit_b32)
    contexts = torch.randn(2, 4, vit_b32.text_width, requires_grad=True)  # 2 images × 64 classes

    def train():
        model.per_image_text_features(contexts).square().sum().backward()

    def evaluate():
        with torch.no_grad():
            model.per_image_text_features(contexts)

    peaks = {}
    for bucketing, memory_mb in ((False, None), (True, 40)):
        with text_path(vit_b32, bucketing, memory_mb):
            peaks[bucketing] = [peak_memory_bytes(run, torch.device("cpu")) / 2**20 for run in (train, evaluate)]
    assert max(peaks[True]) <= 40, peaks
    assert peaks[False][0] > 8 * 40, peaks  # the single pass keeps every graph: the budget is what bounds it
