"""The text tasks on all-MiniLM-L6-v2: data, the multi-task model, the by-task partition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.clients.partition import limit_examples, partition
from fedmerge.clients.tasks import DataError, get_task
from fedmerge.clients.tasks.text import NEG, MultiTaskTextClassifier, load_encoder, parse_wordnet
from fedmerge.clients.training import TrainConfig, train


@pytest.fixture(scope="module")
def multitask():
    return get_task("text_multitask")


@pytest.fixture(scope="module")
def train_data(multitask):
    return multitask.load("train")


@pytest.mark.parametrize(
    ("name", "classes"), [("wordnet_nouns", 26), ("wordnet_verbs", 15), ("rotten_tomatoes", 2)]
)
def test_single_tasks_load_token_ids_deterministically(name: str, classes: int) -> None:
    task = get_task(name)
    train, test = task.load("train"), task.load("test")
    assert train.x.shape == (2000, 32) and test.x.shape == (500, 32) and train.x.dtype == np.int32
    assert task.num_classes == classes and train.y.min() >= 0 and train.y.max() < classes
    assert (train.x[:, 0] == 101).all()  # [CLS]
    assert len(np.unique(train.y)) >= min(classes, 2) and not train.x.flags.writeable
    again = get_task(name).load("train")
    assert np.array_equal(again.x, train.x) and np.array_equal(again.y, train.y)
    # train and test are disjoint slices of one permutation: no gloss appears in both
    assert not {r.tobytes() for r in test.x} & {r.tobytes() for r in train.x[:300]}


def test_multitask_rows_carry_their_task(multitask, train_data) -> None:
    assert train_data.x.shape == (6000, 33) and multitask.num_classes == 26
    assert multitask.task_names == ["wordnet_nouns", "wordnet_verbs", "rotten_tomatoes"]
    assert np.bincount(multitask.task_index(train_data.x)).tolist() == [2000, 2000, 2000]
    verbs = train_data.subset(np.flatnonzero(multitask.task_index(train_data.x) == 1))
    assert multitask.client_task_id(verbs) == 1 and multitask.client_task_id(train_data) == -1
    assert np.array_equal(verbs.x[:, 1:], get_task("wordnet_verbs").load("train").x)


def test_by_task_partition_gives_each_client_one_task(multitask, train_data) -> None:
    groups = multitask.task_index(train_data.x)
    parts = partition(train_data.y, 6, "by_task", seed=3, groups=groups, alpha=0.5)
    assert [np.unique(groups[p]).tolist() for p in parts] == [[0], [1], [2], [0], [1], [2]]
    assert sum(len(p) for p in parts) == 6000
    # two clients of a task split it with label skew
    a, b = (np.bincount(train_data.y[p], minlength=26) / len(p) for p in (parts[0], parts[3]))
    assert np.abs(a - b).sum() > 0.2
    with pytest.raises(ValueError, match="multi-task"):
        partition(train_data.y, 3, "by_task", seed=0)
    with pytest.raises(ValueError, match="at least one client per task"):
        partition(train_data.y, 2, "by_task", seed=0, groups=groups)


def test_limit_examples_caps_each_task(multitask, train_data) -> None:
    small = limit_examples(train_data, 50, seed=1, groups=multitask.task_index(train_data.x))
    assert np.bincount(multitask.task_index(small.x)).tolist() == [50, 50, 50]
    assert limit_examples(train_data, 0, seed=1) is train_data


def test_multitask_model_pads_other_classes_and_trains_only_the_rows_head(
    multitask, train_data
) -> None:
    torch.manual_seed(0)
    model = multitask.build_model()
    assert isinstance(model, MultiTaskTextClassifier)
    rows = np.flatnonzero(multitask.task_index(train_data.x) == 2)[:4]  # rotten tomatoes: 2 classes
    out = model(multitask.preprocess(train_data.x[rows]))
    assert out.shape == (4, 26) and (out[:, 2:] == NEG).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    part = train_data.subset(rows)
    train(model, multitask, part, TrainConfig(batch_size=4, lr=1e-3, optimizer="adam"), seed=0)
    after = model.state_dict()
    assert not torch.equal(before["heads.2.weight"], after["heads.2.weight"])
    for t in (0, 1):
        assert torch.equal(before[f"heads.{t}.weight"], after[f"heads.{t}.weight"])
    assert not torch.equal(
        before["encoder.encoder.layer.5.output.dense.weight"],
        after["encoder.encoder.layer.5.output.dense.weight"],
    )


def test_trainable_regex_freezes_the_rest(multitask, train_data) -> None:
    torch.manual_seed(0)
    model = multitask.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    part = train_data.subset(np.arange(8))  # nouns
    train(
        model,
        multitask,
        part,
        TrainConfig(batch_size=8, lr=1e-2, optimizer="adam", trainable=r"^heads\."),
        seed=0,
    )
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == ["heads.0.weight", "heads.0.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        train(model, multitask, part, TrainConfig(trainable="^nothing"), seed=0)
    with pytest.raises(ValueError, match="regular expression"):
        TrainConfig(trainable="(")


def test_trimming_padding_does_not_change_a_rows_output(multitask, train_data) -> None:
    torch.manual_seed(0)
    model = multitask.build_model().eval()
    x = multitask.preprocess(train_data.x[:8])
    lengths = (x[:, 1:] != 0).sum(dim=1)
    short = int(lengths.argmin())
    with torch.no_grad():
        alone, together = model(x[short : short + 1]), model(x)[short : short + 1]
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)


def test_missing_or_bad_data_is_named(tmp_path) -> None:
    with pytest.raises(DataError, match="make data"):
        get_task("rotten_tomatoes").load("train", data_dir=tmp_path)
    bad = tmp_path / "data.verb"
    bad.write_text("00001740 29 v 01 breathe 0 | to breathe\n00001741 77 v 01 x 0 | oops\n")
    with pytest.raises(DataError, match="lexicographer file 77"):
        parse_wordnet(bad, 29, 15)
    with pytest.raises(DataError, match="not a local model directory"):
        load_encoder(tmp_path)
