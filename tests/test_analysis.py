"""Issue 17: the numbers behind every figure, checked against independent computations, and every PNG
written non-blank at its stated size. Models are the 3-layer tiny CLIP of ``released_reference``."""
import csv
import json
import math
import statistics

import numpy as np
import pytest
import torch
from PIL import Image
from released_reference import randomise_prompt_parameters, tiny_clip

from mugcp.analysis.amg import (
    GATES_SIZE,
    AMGRecorder,
    cocoop_conditional_sizes,
    gate_values,
    map_grid_size,
    mugcp_conditional_sizes,
    plot_gates,
    plot_map_grid,
)
from mugcp.analysis.confusion import cluster_order, figure_size, plot_confusion, top_pairs
from mugcp.analysis.curves import CURVES_SIZE, MetricsLog, plot_curves, read_metrics
from mugcp.analysis.nearest_words import learned_text_contexts, nearest_tokens, nearest_words, token_text
from mugcp.analysis.per_class import aggregate_per_class, write_per_class_report
from mugcp.analysis.predictions import PredictionRecorder, write_subset_outputs
from mugcp.methods import create_model

CLASSES = ["red fox", "blue whale", "snow owl", "sand cat"]


def assert_png(path, size):
    """A PNG of exactly ``size`` pixels that is not one flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == tuple(size)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 5.0, f"{path} looks blank"


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


# ------------------------------------------------------------------ nearest words
def brute_force_nearest(vector, embeddings, k):
    """Distances to every vocabulary row one by one (float64), sorted: nothing shared with the chunked top-k."""
    table = embeddings.detach().double().numpy()
    v = vector.detach().double().numpy()
    distances = np.array([math.sqrt(float(((row - v) ** 2).sum())) for row in table])
    order = np.argsort(distances, kind="stable")[:k]
    return order, distances[order]


@pytest.mark.parametrize("method, options, expected", [
    ("maple", {"depth": 2, "n_ctx": 2}, [("text_prompts.layers.0", 0), ("text_prompts.layers.1", 1)]),
    ("mugcp", {"depth": 3, "n_ctx": 2, "semantic_source": "none", "amg_dim": 16, "amg_heads": 2, "pool_dim": 16,
               "pool_heads": 2},
     [("text_context", 0), ("text_context", 1), ("text_context", 2), ("semantic_tokens", 0)]),
    ("coop", {"n_ctx": 3, "class_specific": True}, [("ctx", 0)] * 4),
])
def test_nearest_words_equal_a_brute_force_search(clip, method, options, expected):
    torch.manual_seed(0)
    model = create_model(method, CLASSES, backbone=clip, **options)
    randomise_prompt_parameters(model, scale=0.05)
    contexts = learned_text_contexts(model)
    assert [(c.name, c.layer) for c in contexts] == expected
    rows = nearest_words(model, k=4)
    assert len(rows) == sum(c.vectors.shape[0] for c in contexts)
    embeddings = clip.model.token_embedding.weight
    by_vector = [(c, p) for c in contexts for p in range(c.vectors.shape[0])]
    for row, (context, position) in zip(rows[:6], by_vector[:6]):
        ids, distances = brute_force_nearest(context.vectors[position], embeddings, 4)
        assert row["token_ids"] == ids.tolist()
        assert row["distances"] == pytest.approx(distances.tolist(), rel=1e-9)
        assert row["words"] == [token_text(clip.tokenizer, int(i)) for i in ids]
    if method == "coop":
        assert [r["class"] for r in rows[::3]] == CLASSES


def test_a_context_vector_on_a_word_embedding_finds_that_word_at_distance_zero(clip):
    model = create_model("coop", CLASSES, backbone=clip, n_ctx=2, ctx_init="")
    photo = int(clip.tokenize(["photo"])[0, 1])
    with torch.no_grad():
        model.ctx[1] = clip.model.token_embedding.weight[photo]
    row = nearest_words(model, k=3)[1]
    assert row["words"][0] == "photo" and row["token_ids"][0] == photo and row["distances"][0] == 0.0


def test_chunked_search_equals_one_pass(clip):
    vectors = torch.randn(5, clip.text_width) * 0.05
    whole = nearest_tokens(vectors, clip.model.token_embedding.weight, 7, chunk=10 ** 6)
    chunked = nearest_tokens(vectors, clip.model.token_embedding.weight, 7, chunk=999)
    assert torch.equal(whole[1], chunked[1]) and torch.allclose(whole[0], chunked[0])


# ------------------------------------------------------------------ AMG maps, gates, conditional sizes
def tiny_mugcp(clip, **extra):
    torch.manual_seed(0)
    model = create_model("mugcp", CLASSES, backbone=clip, depth=3, n_ctx=2, semantic_source="none", amg_dim=16,
                         amg_heads=2, pool_dim=16, pool_heads=2, **extra)
    randomise_prompt_parameters(model, scale=0.3)
    return model.eval()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_amg_maps_are_the_reference_softmax_and_sum_to_one(clip, backend):
    model = tiny_mugcp(clip)
    model.kernels = backend
    images = torch.randn(2, 3, clip.image_size, clip.image_size)
    with torch.no_grad(), AMGRecorder(model) as recorder:
        model(images)
    assert all(module.recorder is None for module in model.guidance)
    maps = recorder.maps()
    patches = (clip.image_size // 8) ** 2
    assert maps.shape == (2, 3, 4, 1 + patches)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(2, 3, 4), atol=1e-6)
    for layer, record in recorder.layers.items():
        a, b = record["affinity_visual"].double(), record["affinity_semantic"].double()
        logits = torch.einsum("bhnd,bhsd->bhns", a, b) / math.sqrt(a.shape[-1])
        weights = logits.exp() / logits.exp().sum(dim=2, keepdim=True)  # over the visual tokens
        assert torch.allclose(maps[:, layer], weights.mean(dim=1).transpose(1, 2).float(), atol=1e-6)
        # The weights are the ones the layer really used: they rebuild what the kernel gathered (U per head).
        gathered = torch.einsum("bhns,bhnd->bhsd", weights, record["values_visual"].double())
        assert torch.allclose(gathered.float(), record["gathered_heads"], atol=1e-4)


def test_map_grid_and_gates_figures(clip, tmp_path):
    model = tiny_mugcp(clip)
    images = torch.rand(1, 3, clip.image_size, clip.image_size)
    with torch.no_grad(), AMGRecorder(model) as recorder:
        model(images)
    path, size = plot_map_grid(images[0].permute(1, 2, 0).numpy(), recorder.maps()[0], tmp_path / "amg.png")
    assert size == map_grid_size(3, 4)
    assert_png(path, size)
    gates = gate_values(model)
    assert torch.allclose(gates["text"], 1 / (1 + torch.exp(-model.text_gates.detach())))
    assert_png(plot_gates(gates, tmp_path / "gates.png"), GATES_SIZE)


def test_mugcp_conditional_size_is_the_gated_semantic_tokens_against_the_context(clip):
    model = tiny_mugcp(clip)
    images = torch.randn(2, 3, clip.image_size, clip.image_size)
    with torch.no_grad(), AMGRecorder(model) as recorder:
        model(images)
    rows = mugcp_conditional_sizes(model, recorder)
    assert len(rows) == 2 * 3 * 2
    first = next(r for r in rows if r["layer"] == 0 and r["prompts"] == "text" and r["image"] == 1)
    # Layer 0's semantic tokens are the learned S⁰ (semantic_source=none), the same for every image.
    gate = torch.sigmoid(model.text_gates[0].detach())
    expected = (gate[:, None] * model.semantic_tokens.detach()).norm(dim=-1).mean()
    assert first["conditional_norm"] == pytest.approx(float(expected), rel=1e-5)
    assert first["shared_norm"] == pytest.approx(float(model.text_context[0].detach().norm(dim=-1).mean()), rel=1e-5)
    assert first["ratio"] == pytest.approx(first["conditional_norm"] / first["shared_norm"])


def test_cocoop_conditional_size_is_the_meta_net_shift(clip):
    torch.manual_seed(0)
    model = create_model("cocoop", CLASSES, backbone=clip, n_ctx=4, meta_reduction=4).eval()
    randomise_prompt_parameters(model, scale=0.2)
    images = torch.randn(3, 3, clip.image_size, clip.image_size)
    rows = cocoop_conditional_sizes(model, images)
    with torch.no_grad():
        feature = clip.encode_image(images[2:3])
        shift = model.meta_net(feature / feature.norm(dim=-1, keepdim=True))[0]
        contexts = model.image_contexts(feature / feature.norm(dim=-1, keepdim=True))[0]
    assert torch.allclose(contexts - model.ctx, shift.expand_as(contexts), atol=1e-6)  # π(x) is the per-image part
    assert rows[2]["conditional_norm"] == pytest.approx(float(shift.norm()), rel=1e-5)
    assert rows[2]["shared_norm"] == pytest.approx(float(model.ctx.detach().norm(dim=-1).mean()), rel=1e-5)


# ------------------------------------------------------------------ predictions, per-class, confusion
def random_predictions(classes=6, images=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    names = [f"class {i}" for i in range(classes)]
    recorder = PredictionRecorder(names)
    labels = torch.arange(images) % classes
    logits = torch.randn(images, classes, generator=generator) + 2.5 * torch.nn.functional.one_hot(labels, classes)
    for first in range(0, images, 16):
        part = slice(first, first + 16)
        recorder.add([f"img{i}.png" for i in range(images)][part], labels[part], logits[part])
    return recorder.result(), labels, logits


def test_prediction_files_agree_with_the_logits_and_the_confusion(tmp_path):
    result, labels, logits = random_predictions()
    zero_shot, _, _ = random_predictions(seed=1)
    written = write_subset_outputs(tmp_path, "base", result, zero_shot)
    rows = list(csv.DictReader(open(written["predictions"])))
    probs = logits.softmax(dim=-1)
    assert len(rows) == 40
    for i, row in enumerate(rows):
        order = sorted(range(6), key=lambda c: -float(probs[i, c]))[:5]
        assert (row["key"] == f"img{i}.png" and int(row["label"]) == int(labels[i])
                and row["label_name"] == f"class {int(labels[i])}")
        assert int(row["predicted"]) == order[0] and row["correct"] == str(int(order[0] == int(labels[i])))
        assert [row[f"top_{r}"] for r in range(1, 6)] == [f"class {c}" for c in order]
        assert [float(row[f"prob_{r}"]) for r in range(1, 6)] == pytest.approx([float(probs[i, c]) for c in order],
                                                                               abs=1e-6)
    per_class = list(csv.DictReader(open(written["per_class"])))
    confusion = result.confusion()
    assert int(confusion.sum()) == 40
    truth_by_hand = np.zeros((6, 6), dtype=int)
    for row in rows:
        truth_by_hand[int(row["label"]), int(row["predicted"])] += 1
    assert np.array_equal(confusion.numpy(), truth_by_hand)
    for row in per_class:
        index = int(row["class_index"])
        assert int(row["count"]) == int(confusion[index].sum())
        assert round(float(row["accuracy"]) / 100 * int(row["count"])) == int(confusion[index, index])
        assert float(row["gain"]) == pytest.approx(float(row["accuracy"]) - float(row["zeroshot_accuracy"]), abs=1e-3)
    pairs = list(csv.DictReader(open(written["confused_pairs"])))
    off = [(int(confusion[t, p]), t, p) for t in range(6) for p in range(6) if t != p and confusion[t, p] > 0]
    assert [int(p["count"]) for p in pairs] == sorted((c for c, _, _ in off), reverse=True)[:len(pairs)]
    assert_png(written["confusion"], figure_size(6))


def test_cluster_order_puts_mutually_confused_classes_side_by_side():
    rng = np.random.default_rng(0)
    blocks = [[0, 7, 3], [5, 1], [2, 9, 4, 8], [6]]
    counts = np.diag(rng.integers(10, 20, 10))
    for block in blocks:
        for i in block:
            for j in block:
                if i != j:
                    counts[i, j] += rng.integers(2, 6)
    order = cluster_order(counts)
    assert sorted(order) == list(range(10))
    for block in blocks:
        positions = sorted(order.index(c) for c in block)
        assert positions == list(range(positions[0], positions[0] + len(block))), (block, order)


def test_a_thousand_class_confusion_is_clustered_with_its_top_pairs(tmp_path):
    rng = np.random.default_rng(1)
    classes = 1000
    counts = np.diag(rng.integers(20, 40, classes))
    for _ in range(600):
        i = int(rng.integers(classes))
        counts[i, (i + 1) % classes] += int(rng.integers(1, 8))
    names = [f"class number {i}" for i in range(classes)]
    path, size, order = plot_confusion(counts, names, tmp_path / "big.png")
    assert size == figure_size(classes) and sorted(order) == list(range(classes))
    assert_png(path, size)
    pairs = top_pairs(counts, 20)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    assert [p[2] for p in pairs] == sorted(off.ravel().tolist(), reverse=True)[:20]


# ------------------------------------------------------------------ curves
def test_metrics_log_resumes_without_replayed_steps_and_tolerates_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.train_step(step, 1 + step // 3, 1.0 / step, 0.01 * step, {"ce": 0.9 / step, "kl": 0.1 / step})
    log.close()
    with open(path, "a") as handle:
        handle.write('{"kind": "train", "st')  # a crash mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    resumed = MetricsLog(path, resume_step=3)
    resumed.train_step(4, 2, 0.2, 0.04, {"ce": 0.2, "kl": 0.0})
    resumed.evaluation(4, {"base": {"accuracy": 61.5}, "hm": 50.0})
    resumed.close()
    records = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("train", 4),
                                                         ("eval", 4)]
    assert records[-1] == {"kind": "eval", "step": 4, "subset": "base", "accuracy": 61.5}
    assert_png(plot_curves(records, tmp_path / "curves.png"), CURVES_SIZE)


# ------------------------------------------------------------------ per-class report across seeds
def write_seed_run(folder, seed, accuracies, zero_shot, method="coop"):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "dataset": "dtd", "protocol": "base2new", "shots": 16, "backbone": "ViT-B-16", "seed": seed,
        "pretrained": True, "base": {"accuracy": statistics.fmean(accuracies)}}))
    (folder / "per_class").mkdir()
    lines = ["class_index,class,count,correct,accuracy,zeroshot_accuracy,gain"]
    lines += [f"{i},c{i},10,{round(a / 10)},{a},{z},{a - z}" for i, (a, z) in enumerate(zip(accuracies, zero_shot))]
    (folder / "per_class" / "base.csv").write_text("\n".join(lines) + "\n")


def test_per_class_means_across_seeds_sorted_by_gain(tmp_path, capsys):
    from mugcp.report import main

    per_seed = {1: [90.0, 40.0, 70.0], 2: [80.0, 60.0, 70.0], 3: [100.0, 50.0, 40.0]}
    zero_shot = [85.0, 20.0, 60.0]
    for seed, accuracies in per_seed.items():
        write_seed_run(tmp_path / "runs" / f"s{seed}", seed, accuracies, zero_shot)
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert "per_class.md" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "report" / "per_class.csv")))
    expected = []
    for index in range(3):
        values = [per_seed[s][index] for s in (1, 2, 3)]
        expected.append((f"c{index}", statistics.fmean(values), statistics.stdev(values),
                         statistics.fmean(values) - zero_shot[index]))
    expected.sort(key=lambda e: -e[3])
    assert [r["class"] for r in rows] == [e[0] for e in expected] == ["c1", "c0", "c2"]
    for row, (_, mean, std, gain) in zip(rows, expected):
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-4) and float(row["std"]) == pytest.approx(std, abs=1e-4)
        assert float(row["gain"]) == pytest.approx(gain, abs=1e-4) and row["n"] == "3"
    table = (tmp_path / "report" / "per_class.md").read_text()
    assert "| c1 | 50.00 ± 10.00 | 20.00 | +30.00 |" in table
    pngs = list((tmp_path / "report" / "per_class").glob("*.png"))
    assert len(pngs) == 1
    from mugcp.analysis.per_class import plot_size

    assert_png(pngs[0], plot_size(3))


def test_runs_without_per_class_files_add_no_per_class_report(tmp_path):
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"method": "coop", "dataset": "dtd", "seed": 1,
                                                     "base": {"accuracy": 1.0}}))
    assert write_per_class_report([{"method": "coop", "dataset": "dtd", "_path": str(folder)}], tmp_path / "out") == []
    assert aggregate_per_class([{"_path": str(folder)}]) == []
