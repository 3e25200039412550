"""WEMoE's unlabelled proxy inputs: the server's test inputs, or a slice held out of each task's
training data before partitioning (``data.proxy_inputs`` / ``data.proxy_size``)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmerge.clients.partition import load_manifest, materialize_shards, open_shard, shard_path
from fedmerge.clients.tasks import get_task
from fedmerge.clients.tasks.base import ArrayData
from fedmerge.federation.config import ConfigError, parse_config
from fedmerge.federation.proxy import proxy_inputs, proxy_split
from fedmerge.federation.scoring import hold_out

TASK = get_task("text_multitask")


def multitask_rows(per_task: tuple[int, ...] = (60, 40, 30)) -> ArrayData:
    """Rows laid out like text_multitask's ([task, ids...]) with a unique id in column 1, so
    that every row can be told apart wherever it ends up."""
    tasks = np.concatenate([np.full(n, t) for t, n in enumerate(per_task)])
    x = np.zeros((len(tasks), 4), dtype=np.int32)
    x[:, 0], x[:, 1] = tasks, np.arange(len(tasks)) + 1000
    y = np.arange(len(tasks)) % 2
    return ArrayData(x, y)


def ids(data: ArrayData) -> set[int]:
    return set(np.asarray(data.x[:, 1]).tolist())


def test_the_default_is_the_test_inputs_as_in_the_paper() -> None:
    config = parse_config({})
    assert (config.data.proxy_inputs, config.data.proxy_size) == ("test", 0)
    train, test = multitask_rows(), multitask_rows((5, 5, 5))
    rest, source = proxy_split(TASK, train, test, source="test", size=0, seed=0)
    assert rest is train and source is test


@pytest.mark.parametrize(
    "data, named",
    [
        ({"proxy_inputs": "held_out"}, "data.proxy_size"),
        ({"proxy_size": 10}, "data.proxy_inputs"),
        ({"proxy_inputs": "heldout", "proxy_size": 10}, "did you mean 'held_out'"),
        ({"proxy_inputs": "held_out", "proxy_size": -1}, "data.proxy_size"),
    ],
)
def test_proxy_settings_that_do_not_fit_are_named(data, named) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_config({"data": data})


def test_held_out_proxy_takes_size_examples_of_each_task_seeded() -> None:
    train, test = multitask_rows(), multitask_rows((5, 5, 5))
    rest, held = proxy_split(TASK, train, test, source="held_out", size=12, seed=3)
    assert np.bincount(TASK.task_index(held.x)).tolist() == [12, 12, 12]
    assert np.bincount(TASK.task_index(rest.x)).tolist() == [48, 28, 18]
    assert ids(held).isdisjoint(ids(rest)) and ids(held) | ids(rest) == ids(train)
    assert np.all(np.diff(held.x[:, 1]) > 0) and np.all(
        np.diff(rest.x[:, 1]) > 0
    )  # original order kept
    again = proxy_split(TASK, train, test, source="held_out", size=12, seed=3)[1]
    assert np.array_equal(again.x, held.x)
    assert ids(proxy_split(TASK, train, test, source="held_out", size=12, seed=4)[1]) != ids(held)
    # not the server validation set's draw for the same seed
    assert ids(hold_out(train, 12, 3, groups=TASK.task_index(train.x))[1]) != ids(held)
    proxy = proxy_inputs(TASK, held)
    assert sorted(proxy) == [0, 1, 2] and all(len(x) == 12 for x in proxy.values())
    assert all(np.all(x[:, 0] == t) for t, x in proxy.items())


def test_held_out_proxy_is_in_no_clients_shard(tmp_path) -> None:
    train, test = multitask_rows(), multitask_rows((5, 5, 5))
    rest, held = proxy_split(TASK, train, test, source="held_out", size=10, seed=0)
    shard_dir = materialize_shards(
        TASK, rest, 6, "by_task", 0, {"alpha": 0.5, "min_partition_size": 2}, tmp_path
    )
    counts = load_manifest(shard_dir)["counts"]
    in_shards: list[int] = []
    for cid in range(6):
        shard = open_shard(shard_path(shard_dir, cid))
        assert len(shard) == counts[cid] > 0
        in_shards += np.asarray(shard.x[:, 1]).tolist()
    assert len(in_shards) == len(set(in_shards)) and set(in_shards) == ids(rest)
    assert not set(in_shards) & ids(held)


def test_a_proxy_that_leaves_a_task_no_training_data_is_named() -> None:
    train, test = multitask_rows((60, 40, 30)), multitask_rows((5, 5, 5))
    with pytest.raises(ValueError, match=r"data.proxy_size=30 leaves no training data of task 2"):
        proxy_split(TASK, train, test, source="held_out", size=30, seed=0)
