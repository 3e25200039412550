"""Entry points that run experiments: one run, a resumed run, a comparison of aggregators, a
partition report.

``run_experiment`` starts (or attaches to) Ray itself before handing over to Flower's simulation
engine, so the ServerApp can create actors and Flower's clients share the same cluster: a local
Ray by default, an existing cluster with ``address`` / ``ray.address`` / ``$RAY_ADDRESS``.
``resume_experiment`` continues a stopped run from its newest checkpoint, in the same folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from fedmerge.clients.partition import (
    format_label_counts,
    label_counts,
    partition,
    plot_label_heatmap,
)
from fedmerge.federation.callbacks import resolve_callbacks
from fedmerge.federation.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_changes,
    latest_checkpoint,
)
from fedmerge.federation.config import AggregatorConfig, ConfigError, ExperimentConfig, load_config
from fedmerge.federation.results import RunDir, compare_table, plot_curves
from fedmerge.federation.server import (
    Experiment,
    check_needs,
    federated_model,
    merges_products,
    partition_params,
)

__all__ = [
    "AddressError",
    "ExperimentError",
    "check_address",
    "compare",
    "execute_run",
    "finish_run",
    "init_ray",
    "open_run",
    "partition_report",
    "prepare_run",
    "resolve_address",
    "resume_experiment",
    "run_experiment",
]

log = logging.getLogger("fedmerge")


class ExperimentError(RuntimeError):
    """The federated run itself failed (the message carries the cause)."""


class AddressError(ConfigError):
    """The Ray cluster the run should attach to cannot be reached; the message names the address."""


ADDRESS_TIMEOUT_S = 5.0
"""How long ``check_address`` waits for a TCP connection to a cluster's GCS before giving up."""


def _quiet_env() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def init_ray(config: ExperimentConfig, address: str | None = None) -> str:
    """Start a local Ray or attach to a cluster; returns the address used ('' for a new local one).

    Workers get the driver's ``sys.path`` so that aggregators named by a ``module:Class`` path and
    the project's packages import there, as Flower does for its own simulation workers.
    """
    _quiet_env()
    address = resolve_address(config, address)
    if ray.is_initialized():
        ray.shutdown()
    env_vars = {
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    # Inside a Ray Job, Ray refuses a driver runtime_env that sets a variable the job's does.
    job_env = _job_env_vars()
    runtime_env = {"env_vars": {k: v for k, v in env_vars.items() if k not in job_env}}
    kwargs = dict(runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            address="local", num_cpus=config.ray.num_cpus or None, include_dashboard=False, **kwargs
        )
    return address


def resolve_address(config: ExperimentConfig, address: str | None = None) -> str:
    """The Ray address a run attaches to: ``--address``, else ``ray.address``, else ``$RAY_ADDRESS``
    ('' = a new local Ray)."""
    return address or config.ray.address or os.environ.get("RAY_ADDRESS", "")


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse a ``host:port`` Ray address that no server answers on, before anything is made.

    ``ray.init`` retries an unreachable GCS for minutes, printing a warning each time; a TCP
    connection to the GCS port says within ``timeout`` seconds whether anyone is there. '',
    ``local``, ``auto`` (Ray looks for a cluster on this node and says so at once when there is
    none) and ``ray://`` client addresses are left to Ray, as is anything not ``host:port``.
    """
    text = address.strip()
    if not text or text in ("local", "auto") or "://" in text:
        return
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit():
        return
    where = f"the Ray cluster at {text!r} (--address, ray.address or $RAY_ADDRESS)"
    if not 0 < int(port) < 65536:
        raise AddressError(f"{where}: port {port} is not in 1..65535")
    try:
        _connect(host, int(port), timeout)
    except socket.gaierror as err:
        raise AddressError(
            f"cannot reach {where}: host {host!r} is not known ({err.strerror}); fix the address"
        ) from None
    except TimeoutError:
        raise AddressError(
            f"cannot reach {where}: no answer within {timeout:g} s; check the address and "
            "that nothing (a firewall) blocks the port"
        ) from None
    except OSError as err:
        raise AddressError(
            f"cannot reach {where}: {err.strerror or err}; start the cluster there "
            "(`ray start --head`) or fix the address"
        ) from None


def _connect(host: str, port: int, timeout: float) -> None:
    """Open (and close) a TCP connection to ``host:port``, or raise the ``OSError`` of the attempt.
    Ray connects to a loopback address through this node's IP instead, so for a loopback host
    either answering is enough."""
    hosts = [host]
    if host in ("127.0.0.1", "::1", "localhost"):
        try:
            from ray._private.services import get_node_ip_address

            hosts.append(get_node_ip_address())
        except Exception:  # noqa: BLE001 - a private helper of Ray's: without it, loopback alone decides
            pass
    error: OSError | None = None
    for candidate in dict.fromkeys(hosts):
        try:
            with socket.create_connection((candidate, port), timeout=timeout):
                return
        except OSError as err:
            error = error or err
    assert error is not None
    raise error


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env of the Ray Job this driver runs in (empty outside a job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


@dataclass(frozen=True)
class RunOutcome:
    run_dir: RunDir
    wall_time_s: float
    placement: dict[str, dict[str, str]]


@dataclass(frozen=True)
class CompareOutcome:
    path: Path
    table: str
    runs: dict[str, RunDir]


def run_experiment(
    config: ExperimentConfig,
    *,
    address: str | None = None,
    progress: Callable[[str], None] = print,
    verbose: bool = False,
    callbacks: Sequence[Any] = (),
) -> RunOutcome:
    """Run one federated experiment end to end; returns its run directory. ``callbacks`` are round
    callbacks (``fedmerge.RoundCallback``), called after the run's own records and before those
    that ``run.callbacks`` in the config names."""
    config = pin_plugins(config)
    user = prepare_run(
        config, address=address, callbacks=callbacks
    )  # before any folder or cluster exists
    with open_run(
        config, progress
    ) as run_dir:  # locked until the run ends: a `resume` of a live run is refused
        return execute_run(
            config,
            run_dir,
            None,
            address=address,
            progress=progress,
            callbacks=user,
            drive=lambda experiment: _simulate(experiment, verbose),
        )


def pin_plugins(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with ``run.plugins`` extended by the modules that registered the plug-ins it
    names by name (task, aggregator, partitioner), so that Ray workers and ``fedmerge resume``,
    fresh processes, import them too. A top-level module is listed by its file (it need not be on
    the path elsewhere), a module inside a package by name. A plug-in registered by the script
    being run is a ConfigError saying how to move it."""
    from fedmerge.aggregators.registry import AGGREGATORS
    from fedmerge.clients.attacks import ATTACK_KINDS, ATTACKS
    from fedmerge.clients.partition import PARTITIONERS
    from fedmerge.clients.tasks import TASKS
    from fedmerge.plugins import PluginError

    # A file is listed by its absolute path: a resume may start from another folder.
    plugins = [
        str(Path(p).expanduser().resolve()) if p.endswith(".py") else p for p in config.run.plugins
    ]
    for key, registry, spec in (
        ("data.task", TASKS, config.data.task),
        ("aggregator.name", AGGREGATORS, config.aggregator.name),
        ("data.partitioner", PARTITIONERS, config.data.partitioner),
        *(
            [("attack.kind", ATTACKS, config.attack.kind)]
            if config.attack.kind not in ATTACK_KINDS
            else []
        ),
    ):
        try:
            module = registry.origin(spec)
        except PluginError as err:
            raise ConfigError(f"{key}: {err}") from None
        if module is None or module in plugins:
            continue
        loaded = sys.modules.get(module)
        path = getattr(loaded, "__file__", None)
        entry = str(Path(path).resolve()) if "." not in module and path else module
        if entry not in plugins:
            plugins.append(entry)
    if plugins == list(config.run.plugins):
        return config
    return dataclasses.replace(config, run=dataclasses.replace(config.run, plugins=tuple(plugins)))


def prepare_run(
    config: ExperimentConfig, *, address: str | None = None, callbacks: Sequence[Any] = ()
) -> list[Any]:
    """What every run checks before a folder or Ray exists, a simulation or a deployment: the
    aggregator and its declared needs, the callbacks (given, and ``run.callbacks`` imported here),
    the Ray address and both splits of the data. Returns the user's callbacks."""
    check_needs(config)
    user = resolve_callbacks(config.run.callbacks, callbacks)
    check_address(resolve_address(config, address))
    _check_data(config)
    return user


@contextmanager
def open_run(config: ExperimentConfig, progress: Callable[[str], None] = print) -> Iterator[RunDir]:
    """A new run folder holding the resolved config, locked until the block ends."""
    run_dir = RunDir.create(config.output.root_path, config.name)
    with run_dir.lock():
        run_dir.write_config(config.to_toml())
        progress(f"run directory: {run_dir.path}")
        yield run_dir


RESUMABLE_CHANGES = frozenset({"ray.address", "run.callbacks"})
"""Config keys that may differ between a run's checkpoint and its ``config.toml`` on resume: where
to find Ray (``--address`` overrides it anyway) and the round callbacks, which change no result. Everything else,
output paths and ``federation.num_rounds`` included, is refused: a path is part of what the run
wrote, and more rounds would change the checkpoint schedule and a learning-rate schedule's horizon;
extend a run by starting a new one."""


def resume_experiment(
    run_dir: str | os.PathLike[str],
    *,
    address: str | None = None,
    progress: Callable[[str], None] = print,
    verbose: bool = False,
    callbacks: Sequence[Any] = (),
) -> RunOutcome:
    """Continue a stopped run in its own folder, from its newest checkpoint.

    Reads the run's resolved ``config.toml``, takes the folder's lock (a run or resume still
    writing it is an error naming its pid), verifies and loads the newest checkpoint and checks
    that it belongs to this run (``_check_resumable``: the config it recorded, its round, the
    metrics, the model's layout), all before anything is changed or Ray starts; a corrupt, forged
    or foreign checkpoint is an error naming the file and what differs. It then drops the metrics
    and events of rounds after it and runs the remaining rounds, appending to the same
    ``metrics.parquet``. With the same seed the result equals that of a run never stopped. Without
    a checkpoint the run
    starts again from round 1.
    """
    run = RunDir(run_dir)
    config = load_config(run.config_path)  # first: a folder that is no run gets no lock file
    user = prepare_run(config, address=address, callbacks=callbacks)  # before the folder is touched
    with run.lock():
        checkpoint = latest_checkpoint(run.checkpoint_dir)
        if checkpoint is not None:
            _check_resumable(config, run, checkpoint)
        done = checkpoint.round if checkpoint is not None else 0
        run.truncate_after(done)
        where = (
            f"checkpoint {checkpoint.path.name}"
            if checkpoint is not None
            else "round 1 (no checkpoint)"
        )
        run.log_events(done, [(None, "resumed", f"resumed from {where}")])
        progress(
            f"resuming {run.path} from {where}; rounds {done + 1}..{config.federation.num_rounds} to go"
        )
        return execute_run(
            config,
            run,
            checkpoint,
            address=address,
            progress=progress,
            callbacks=user,
            drive=lambda experiment: _simulate(experiment, verbose),
        )


def _check_resumable(config: ExperimentConfig, run: RunDir, checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint that is not this run's: a config that differs from the one it recorded
    (outside ``RESUMABLE_CHANGES``; the seed included), a round beyond ``num_rounds`` or beyond the
    rounds in ``metrics.parquet``, weights that do not fit the task's model. Reads only."""
    meta = checkpoint.path / "checkpoint.json"
    changes = [
        c
        for c in config_changes(checkpoint.config, config.to_dict())
        if c[0] not in RESUMABLE_CHANGES
    ]
    if changes:
        shown = ", ".join(
            f"{key} ({_short(old)} -> {_short(new)})" for key, old, new in changes[:10]
        )
        more = f" and {len(changes) - 10} more" if len(changes) > 10 else ""
        raise CheckpointError(
            f"{run.config_path} differs from the run's checkpoint ({meta}) in {shown}{more}; "
            "a resume must use the config the run started with: undo the change, or start a "
            "new run with the new config"
        )
    last = config.federation.num_rounds
    if checkpoint.round > last:
        raise CheckpointError(
            f"checkpoint file {meta}: field 'round' is {checkpoint.round}, beyond the run's "
            f"federation.num_rounds = {last}"
        )
    logged = run.metrics()["round"]
    reached = max(logged.to_pylist(), default=0)
    if checkpoint.round > reached:
        raise CheckpointError(
            f"checkpoint file {meta}: field 'round' is {checkpoint.round}, but {run.metrics_path} "
            f"holds rounds up to {reached} only: the checkpoint is not this run's"
        )
    shared = federated_model(
        config.task_spec.build(),
        seed=config.seed,
        products=merges_products(config, check_needs(config)),
    ).initial_state
    expected = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in shared.items()}
    found = {k: (tuple(v.shape), str(v.dtype)) for k, v in checkpoint.global_state.items()}
    if expected != found:
        raise CheckpointError(
            f"checkpoint file {checkpoint.path / 'global.safetensors'} does not fit the "
            f"{config.data.task} model: keys, shapes or dtypes differ"
        )


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_data(config: ExperimentConfig) -> None:
    """Read both splits of the task's data (a ``DataError`` names what is missing) before a run folder
    or Ray exists; the task caches what it read, so the run's setup does not read it twice."""
    task = config.task_spec.build()
    data_dir = Path(config.data.data_dir) if config.data.data_dir else None
    for split in ("train", "test"):
        task.load(split, data_dir)


def execute_run(
    config: ExperimentConfig,
    run_dir: RunDir,
    resume: Checkpoint | None,
    *,
    address: str | None,
    progress: Callable[[str], None],
    callbacks: Sequence[Any] = (),
    drive: Callable[[Experiment], None],
) -> RunOutcome:
    """The lifecycle of a run whose folder exists, shared by simulation and deployment: start Ray,
    ``Experiment.setup``, ``drive`` the rounds (Flower's simulation engine, or a deployment's Grid:
    both end in ``Experiment.run_rounds``), stop Ray, then ``Experiment.finish``. A resume from the
    last round's checkpoint skips straight to ``finish``."""
    started = time.perf_counter()
    experiment = Experiment(config, run_dir, progress=progress, resume=resume, callbacks=callbacks)
    if experiment.rounds_left:
        init_ray(config, address)
        try:
            experiment.setup()
            drive(experiment)
        finally:
            if ray.is_initialized():
                ray.shutdown()
        if isinstance(
            experiment.error, OSError
        ):  # a run file that cannot be written: the CLI names it and the fix
            raise experiment.error
        if experiment.error is not None:
            raise ExperimentError(f"the run failed: {experiment.error!r}") from experiment.error
        if experiment.final_state is None:
            raise ExperimentError(
                "the server ended before it finished its rounds; see the log above"
            )
    else:
        experiment.skip_rounds()
    return finish_run(experiment, time.perf_counter() - started)


def finish_run(
    experiment: Experiment, wall: float, progress: Callable[[str], None] | None = None
) -> RunOutcome:
    """Save the final model, summary and plot of a run whose rounds are done and print its report
    (``Experiment.finish``: the callbacks' ``on_run_end``). ``progress`` is ignored: the
    experiment's own is used (kept for callers of earlier versions)."""
    experiment.finish(wall)
    return RunOutcome(run_dir=experiment.run_dir, wall_time_s=wall, placement=experiment.placement)


def _simulate(experiment: Experiment, verbose: bool) -> None:
    """Run the experiment's rounds on Flower's simulation engine (Ray is up, the actors placed);
    an error inside the ServerApp is left in ``experiment.error``."""
    from flwr.simulation import run_simulation

    from fedmerge.clients.app import app as client_app

    config = experiment.config
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose and not any(isinstance(f, _HideDeprecation) for f in flwr_log.filters):
        flwr_log.addFilter(_HideDeprecation())
    run_simulation(
        server_app=experiment.server_app(),
        client_app=client_app,
        num_supernodes=experiment.num_supernodes,
        backend_config={
            "client_resources": {
                "num_cpus": config.ray.client_num_cpus,
                "num_gpus": config.ray.client_num_gpus,
            }
        },
        verbose_logging=verbose,
    )


def compare(
    config: ExperimentConfig,
    aggregators: Sequence[str],
    *,
    address: str | None = None,
    progress: Callable[[str], None] = print,
) -> CompareOutcome:
    """Run the same experiment (partitions, seed, everything) once per aggregator; one table, one plot."""
    if not aggregators:
        raise ConfigError("compare needs at least one aggregator name")
    runs: dict[str, RunDir] = {}
    for name in aggregators:
        progress(f"=== {name}")
        # The config's [aggregator] parameters belong to the aggregator it names; others use defaults.
        params = config.aggregator.params if name == config.aggregator.name else {}
        variant = dataclasses.replace(
            config,
            name=f"{config.name}-{name}",
            aggregator=AggregatorConfig(name=name, params=params),
        )
        runs[name] = run_experiment(variant, address=address, progress=progress).run_dir
    out = RunDir.create(config.output.root_path, f"{config.name}-compare").path
    table = compare_table(runs)
    (out / "compare.txt").write_text(
        table + "\n" + "\n".join(f"{k}: {v.path}" for k, v in runs.items()) + "\n"
    )
    plot_curves(
        {name: run.server_curve("accuracy") for name, run in runs.items()},
        out / "compare.png",
        title=f"{config.name}: global test accuracy per round",
    )
    progress(table)
    progress(f"overlay plot: {out / 'compare.png'}")
    return CompareOutcome(path=out, table=table, runs=runs)


def partition_report(config: ExperimentConfig, out: Path | None = None) -> tuple[str, Path]:
    """Per-client label counts of the config's partition, as a table and a heat-map PNG."""
    task = config.task_spec.build()
    train = task.load("train", Path(config.data.data_dir) if config.data.data_dir else None)
    parts = partition(
        train.y,
        config.data.num_clients,
        config.data.partitioner,
        config.seed,
        groups=task.task_index(train.x),
        **partition_params(config.data),
    )
    counts = label_counts(parts, train.y, task.num_classes)
    out = out or config.output.root_path / f"{config.name}-partition.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{config.data.task}: {config.data.partitioner} {partition_params(config.data)}, seed {config.seed}"
    plot_label_heatmap(counts, out, title=title)
    return format_label_counts(counts), out


class _HideDeprecation(logging.Filter):
    """run_simulation announces its deprecation in favour of `flwr run` on every call; once is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()
