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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.federation.config import ConfigError, ExperimentConfig, load_config
from fedmerge.federation.results import RunDir
from fedmerge.federation.runner import execute_run, open_run, pin_plugins, prepare_run

__all__ = ["app", "config_from_run_config", "run_deployment"]

log = logging.getLogger("fedmerge")

app = ServerApp()


def config_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment a Flower run config names (keys ``config`` and ``overrides``)."""
    path = str(run_config.get("config", "")).strip()
    if not path:
        raise ConfigError(
            'the Flower run config must name the experiment: config = "path/to/experiment.toml"'
        )
    overrides = [
        item.strip() for item in str(run_config.get("overrides", "")).split(";") if item.strip()
    ]
    return load_config(Path(path), overrides)


def run_deployment(
    grid: Grid, config: ExperimentConfig, address: str = "", callbacks: Sequence[Any] = ()
) -> RunDir:
    """Run every round of ``config`` over the SuperNodes behind ``grid``; returns the run folder.

    The same lifecycle as a simulation (``fedmerge.federation.runner``): ``prepare_run`` checks the
    aggregator's needs and imports ``run.callbacks`` here, in the ServerApp, before Ray starts;
    ``execute_run`` sets up the actors, drives ``Experiment.run_rounds`` over ``grid`` and finishes.
    """
    config = pin_plugins(config)
    user = prepare_run(config, address=address or None, callbacks=callbacks)
    with open_run(
        config, progress=print
    ) as run_dir:  # locked until the run ends, as in a simulation
        execute_run(
            config,
            run_dir,
            None,
            address=address or None,
            progress=print,
            callbacks=user,
            drive=lambda experiment: experiment.run_rounds(grid),
        )
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config)
    run_deployment(grid, config, address=str(context.run_config.get("ray-address", "")))
