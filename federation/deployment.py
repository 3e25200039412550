"""The ServerApp of Flower's deployment mode: real SuperNodes, server-side work on Ray.

In a simulation (``fedmerge.federation.runner``) fedmerge starts Flower's simulation engine itself. In a
deployment, a SuperLink runs this ServerApp and SuperNodes (one per site, possibly behind TLS and
SuperNode authentication) run ``fedmerge.clients.app:app``; the ServerApp then drives the same rounds as a
simulation: it attaches to Ray (a cluster given by ``ray-address`` or ``$RAY_ADDRESS``, else a
local Ray), starts the ``AggregatorActor`` and ``EvaluatorActor`` where the experiment places
them, streams the SuperNodes' replies into the aggregator and writes the usual run folder.

The Flower app is ``deploy/flower/pyproject.toml``; its run config names the experiment:

* ``config``: path of the experiment TOML, on the machine that runs the ServerApp;
* ``overrides``: ``--set``-style overrides separated by ``;`` (``federation.num_rounds=3;seed=1``);
* ``ray-address``: Ray cluster to attach to; empty = ``$RAY_ADDRESS``, else a new local Ray.

The SuperNodes act as the virtual clients the strategy samples and read their shards from
``data.cache_dir``, which must therefore be a path every SuperNode can read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.federation.config import ConfigError, ExperimentConfig, load_config
from fedmerge.federation.results import RunDir
from fedmerge.federation.runner import ExperimentError, finish_run, init_ray
from fedmerge.federation.server import Experiment, build_aggregator

__all__ = ["app", "config_from_run_config", "run_deployment"]

log = logging.getLogger("fedmerge")

app = ServerApp()


def config_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment a Flower run config names (keys ``config`` and ``overrides``)."""
    path = str(run_config.get("config", "")).strip()
    if not path:
        raise ConfigError("the Flower run config must name the experiment: config = \"path/to/experiment.toml\"")
    overrides = [item.strip() for item in str(run_config.get("overrides", "")).split(";") if item.strip()]
    return load_config(Path(path), overrides)


def run_deployment(grid: Grid, config: ExperimentConfig, address: str = "") -> RunDir:
    """Run every round of ``config`` over the SuperNodes behind ``grid``; returns the run folder."""
    build_aggregator(config)
    started = time.perf_counter()
    run_dir = RunDir.create(config.output.root_path, config.name)
    with run_dir.lock():  # held until the run ends, as in a simulation
        run_dir.write_config(config.to_toml())
        log.info("fedmerge deployment run: %s", run_dir.path)
        experiment = Experiment(config, run_dir, progress=print)
        init_ray(config, address or None)
        try:
            experiment.setup()
            experiment._run(grid)
        finally:
            if ray.is_initialized():
                ray.shutdown()
        if experiment.final_state is None:
            raise ExperimentError("the deployment run ended before the server finished its rounds")
        finish_run(experiment, time.perf_counter() - started, progress=print)
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config)
    run_deployment(grid, config, address=str(context.run_config.get("ray-address", "")))
