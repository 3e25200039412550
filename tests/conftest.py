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
        "name=digits-e2e",
        "seed=7",
        "data.task=digits",
        "data.num_clients=3",
        "data.alpha=0.5",
        "data.min_partition_size=20",
        f"data.cache_dir={str(tmp_path / 'shards')!r}",
        "train.local_epochs=2",
        "train.batch_size=16",
        "train.lr=0.05",
        "federation.num_rounds=2",
        "federation.fraction_train=1.0",
        "federation.min_train_nodes=2",
        f"output.root={str(tmp_path / 'runs')!r}",
        "evaluation.batch_size=512",
        *overrides,
    ]


DEFAULT_EXPERIMENT = ROOT / "experiments" / "fashion_mnist_fedavg.toml"


def digits_config(tmp_path: Path, *overrides: str):
    """The tiny digits experiment of ``digits_overrides`` as a loaded config."""
    from fedmerge.federation.config import load_config

    return load_config(DEFAULT_EXPERIMENT, digits_overrides(tmp_path, *overrides))


SAFETY_NET_S = 600.0
"""How long a test waits for an event (a process gone, an actor back) before it reports that the
event never came: a bound against a hang, far above any wait under load, never a race to win."""


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` of this machine has exited (a zombie counts: it runs no code)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")  # the state field follows "(comm)"


def wait_until(condition, what: str, interval: float = 0.05) -> None:
    """Poll ``condition()`` until it holds; fail naming ``what`` after ``SAFETY_NET_S``."""
    deadline = time.monotonic() + SAFETY_NET_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {SAFETY_NET_S:g} s"
        time.sleep(interval)


def kill_actor(actor, until_restarted: bool = False) -> None:
    """``ray.kill`` the actor (Ray may restart it) and wait until its process has exited (``ray.kill``
    only asks; a call made meanwhile could still reach the old process), or, with
    ``until_restarted``, until Ray has restarted it and the new process answers: a restart that no
    driver call saw fail. Both wait for the event itself, however long Ray takes under load.
    The actor must have a ``placement()`` method reporting its ``pid`` (the server actors do) and
    run on this machine (the tests' local Ray)."""
    import ray

    pid = int(ray.get(actor.placement.remote(), timeout=SAFETY_NET_S)["pid"])
    ray.kill(actor, no_restart=False)
    wait_until(lambda: process_gone(pid), f"actor process {pid} still running after ray.kill")
    if not until_restarted:
        return

    def answers_from_a_new_process() -> bool:
        try:  # a call to a restarting actor waits for it (or fails, and is asked again)
            return int(ray.get(actor.placement.remote(), timeout=SAFETY_NET_S)["pid"]) != pid
        except ray.exceptions.RayActorError:
            return False

    wait_until(answers_from_a_new_process, "the killed actor was not restarted")


@pytest.fixture(scope="session")
def ray_address():
    """The address of one local Ray (a head with 2 CPUs, no dashboard) that the in-process end-to-end
    runs attach to, as to a cluster: starting and stopping a Ray of their own would launch its
    half-dozen system processes for every run, most of a small run's cost on 2 cores. Each run is
    its own Ray job, so its actors and workers end with it. Tests of what a run's own local Ray
    does (SIGKILL and resume, the demo's path) do not use it."""
    from .ray_cluster import start_cluster

    cluster = start_cluster(
        workers={}, head_args=["--num-cpus", "2"], dashboard=False, object_store_mb=1024
    )
    try:
        yield cluster.address
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def attached_ray(ray_address):
    """``ray``, with this module's driver attached to the shared local Ray (``ray_address``): for
    tests that create and kill actors themselves. Workers import the project through PYTHONPATH."""
    import ray

    ray.init(
        address=ray_address,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
    )
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
