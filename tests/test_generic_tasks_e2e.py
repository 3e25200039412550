"""One real Flower + Ray simulation per generic task, configured as a user would: a data file
written here, ``[data.task_params]`` naming it, ``fedmerge.run(fedmerge.parse_config(...))``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fedmerge

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, data: dict, **sections) -> fedmerge.ExperimentConfig:
    raw = {
        "name": "generic-e2e",
        "seed": 3,
        "data": {"cache_dir": str(tmp_path / "shards"), "min_partition_size": 5, **data},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "federation": {"num_rounds": 2, "fraction_train": 1.0, "min_train_nodes": 2},
        "evaluation": {"batch_size": 256},
        "output": {"root": str(tmp_path / "runs")},
        "checkpoint": {"every": 0},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return fedmerge.parse_config(raw)


def _accuracy_rounds(run) -> list[tuple[int, float]]:
    curve = run.server_curve("accuracy")
    assert [r for r, _ in curve] == [1, 2], curve
    assert all(0.0 <= acc <= 1.0 for _, acc in curve)
    return curve


def test_tabular_on_a_csv_of_ones_own(tmp_path, ray_address):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    label = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "yes", "no")
    frame = pd.DataFrame({"f1": x[:, 0], "f2": x[:, 1], "f3": x[:, 2], "f4": x[:, 3], "y": label})
    (tmp_path / "data").mkdir()
    frame.to_csv(tmp_path / "data" / "separable.csv", index=False)
    config = _config(
        tmp_path,
        {
            "task": "tabular",
            "data_dir": str(tmp_path / "data"),  # the relative file below is found there
            "num_clients": 3,
            "partitioner": "iid",
            "task_params": {"files": ["separable.csv"], "label_column": "y", "hidden_sizes": [16]},
        },
        train={"local_epochs": 3},
    )
    run = fedmerge.run(config, address=ray_address, progress=lambda _: None).run_dir
    curve = _accuracy_rounds(run)
    assert curve[-1][1] > 0.8, f"final accuracy {curve[-1][1]} is not well above chance (0.5)"


def test_hf_text_on_a_csv_with_the_installed_minilm(tmp_path, ray_address):
    words = {1: ["great", "lovely", "superb", "moving"], 0: ["dull", "awful", "boring", "weak"]}
    rows = [
        {"review": f"a {words[k][i % 4]} film, {words[k][(i + 1) % 4]} acting", "stars": k}
        for i in range(24)
        for k in (0, 1)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "reviews.parquet")
    config = _config(
        tmp_path,
        {
            "task": "hf_text_classification",
            "num_clients": 2,
            "partitioner": "iid",
            "task_params": {
                "files": [str(tmp_path / "reviews.parquet")],
                "text_column": "review",
                "label_column": "stars",
                "max_length": 12,
            },
        },
        train={"lr": 1e-4, "optimizer": "adam"},
        ray={"client_num_cpus": 1.0},
    )
    run = fedmerge.run(config, address=ray_address, progress=lambda _: None).run_dir
    _accuracy_rounds(run)


def test_hf_image_on_a_tiny_vit_and_an_image_folder(tmp_path, ray_address):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    vit = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    ViTForImageClassification(vit).save_pretrained(model)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model)
    rng = np.random.default_rng(0)
    for k, name in enumerate(("red", "green", "blue")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(10):
            pixels = (rng.random((36, 36, 3)) * 80).astype(np.uint8)
            pixels[..., k] += 170
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    config = _config(
        tmp_path,
        {
            "task": "hf_image_classification",
            "num_clients": 2,
            "partitioner": "iid",
            "task_params": {
                "files": [str(tmp_path / "images")],
                "model": str(model),
                "test_fraction": 0.3,
            },
        },
        train={"lr": 1e-3, "optimizer": "adam", "batch_size": 8},
    )
    run = fedmerge.run(config, address=ray_address, progress=lambda _: None).run_dir
    _accuracy_rounds(run)


def test_tabular_multi_task_from_two_files(tmp_path, ray_address):
    """Two files = two tasks with their own label spaces: one client per task (by_task), one
    head per task in the global model, each task scored on its own test rows."""
    rng = np.random.default_rng(1)
    for name, classes in (("two", 2), ("three", 3)):
        x = rng.normal(size=(150, 3))
        y = np.digitize(x[:, 0], [-0.4, 0.4])[:, None] if classes == 3 else (x[:, 0] > 0)[:, None]
        frame = pd.DataFrame(np.hstack([x, y]), columns=["a", "b", "c", "label"])
        frame["label"] = frame["label"].astype(int)
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    config = _config(
        tmp_path,
        {
            "task": "tabular",
            "num_clients": 2,
            "partitioner": "by_task",
            "task_params": {
                "files": [str(tmp_path / "two.csv"), str(tmp_path / "three.csv")],
                "hidden_sizes": [16],
            },
        },
        train={"local_epochs": 3},
    )
    run = fedmerge.run(config, address=ray_address, progress=lambda _: None).run_dir
    _accuracy_rounds(run)
    metrics = {row["metric"] for row in run.metrics().to_pylist() if row["scope"] == "server"}
    assert any("two" in m for m in metrics) and any("three" in m for m in metrics), metrics
