"""Shared fixtures: quiet, offline Flower and Ray; small configs for real end-to-end runs."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _flower_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.getbasetemp() / "flwr"))


def digits_overrides(tmp_path: Path, *overrides: str) -> list[str]:
    """``--set`` overrides of the default experiment for a real but tiny run: sklearn digits,
    3 clients, 2 rounds, everyone trains (later overrides win)."""
    return [
        "name=digits-e2e", "seed=7",
        "data.task=digits", "data.num_clients=3", "data.alpha=0.5", "data.min_partition_size=20",
        f"data.cache_dir={str(tmp_path / 'shards')!r}",
        "train.local_epochs=2", "train.batch_size=16", "train.lr=0.05",
        "federation.num_rounds=2", "federation.fraction_train=1.0", "federation.min_train_nodes=2",
        f"output.root={str(tmp_path / 'runs')!r}", "evaluation.batch_size=512",
        *overrides,
    ]


DEFAULT_EXPERIMENT = ROOT / "experiments" / "fashion_mnist_fedavg.toml"


def digits_config(tmp_path: Path, *overrides: str):
    """The tiny digits experiment of ``digits_overrides`` as a loaded config."""
    from federation.config import load_config

    return load_config(DEFAULT_EXPERIMENT, digits_overrides(tmp_path, *overrides))


def kill_actor(actor, until_restarted: bool = False) -> None:
    """``ray.kill`` the actor (Ray may restart it) and wait until its process is really gone
    (``ray.kill`` only asks; a call made meanwhile could still reach the old process), or, with
    ``until_restarted``, until Ray has restarted it: a restart that no driver call saw fail.
    The actor must have a ``placement()`` method reporting its ``pid`` (the server actors do)."""
    import ray

    pid = ray.get(actor.placement.remote())["pid"]
    ray.kill(actor, no_restart=False)
    while True:
        try:
            if ray.get(actor.placement.remote(), timeout=60)["pid"] != pid:
                return
        except ray.exceptions.RayActorError:
            if not until_restarted:
                return  # dead or restarting
        time.sleep(0.05)


@pytest.fixture(scope="session")
def ray_address():
    """The address of one local Ray (a head with 2 CPUs, no dashboard) that the in-process end-to-end
    runs attach to, as to a cluster: starting and stopping a Ray of their own would launch its
    half-dozen system processes for every run, most of a small run's cost on 2 cores. Each run is
    its own Ray job, so its actors and workers end with it. Tests of what a run's own local Ray
    does (SIGKILL and resume, the demo's path) do not use it."""
    from .ray_cluster import start_cluster

    cluster = start_cluster(workers={}, head_args=["--num-cpus", "2"], dashboard=False, object_store_mb=1024)
    try:
        yield cluster.address
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def attached_ray(ray_address):
    """``ray``, with this module's driver attached to the shared local Ray (``ray_address``): for
    tests that create and kill actors themselves. Workers import the project through PYTHONPATH."""
    import ray

    ray.init(address=ray_address, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster started with ``ray start`` (tests/ray_cluster.py), shared by the
    cluster and Ray Jobs tests: a head with no CPUs that declares one GPU and the ``aggregator``
    resource (it also runs the dashboard and job drivers), and a ``clients`` worker with 2 CPUs
    labelled ``fedmerge-role=clients``."""
    from .ray_cluster import start_cluster

    cluster = start_cluster(
        workers={"clients": ["--num-cpus", "2", "--labels", "fedmerge-role=clients"]},
        head_args=["--num-cpus", "0", "--num-gpus", "1", "--resources", '{"aggregator": 1}'],
    )
    try:
        yield cluster
    finally:
        cluster.stop()
