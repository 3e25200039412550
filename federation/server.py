"""The server side of one experiment: data and shards, Ray actors, the Flower ServerApp.

One run's lifecycle, the same in a simulation and a Flower deployment:

* ``Experiment.setup()`` runs on the driver once Ray is up: it loads and verifies the task's data,
  writes the clients' shards (once, cached), builds the seeded initial model and starts the
  ``AggregatorActor`` and ``EvaluatorActor`` where the config places them (restoring a
  checkpoint's state into the aggregator when the run resumes). The aggregator gets only what its
  ``Aggregator.needs`` declares (``check_needs`` refuses, before Ray starts, a need the config
  cannot meet).
* ``Experiment.run_rounds(grid)`` drives the rounds over a Flower ``Grid`` (``server_app()`` wraps
  it in a ServerApp for the simulation engine) and hands each round's report to the callbacks
  (``fedmerge.federation.callbacks``): metrics, events, placement, checkpoint, the user's own,
  upload, progress line.
* ``Experiment.finish(wall_time_s)`` saves the final model, summary and plot (the callbacks'
  ``on_run_end``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.aggregators import Aggregator, create_aggregator
from fedmerge.aggregators.lora import LoraModule, LoraProducts
from fedmerge.clients.adapters import adapter_layout, frozen_digest
from fedmerge.clients.attacks import summary as attack_summary
from fedmerge.clients.partition import limit_examples, load_manifest, materialize_shards
from fedmerge.clients.tasks import Task, TaskSpec
from fedmerge.clients.training import get_state
from fedmerge.federation.actors import AggregatorActor, EvaluatorActor, actor_options
from fedmerge.federation.arrays import state_to_record, to_numpy_state
from fedmerge.federation.callbacks import default_callbacks
from fedmerge.federation.checkpoint import Checkpoint, CheckpointError
from fedmerge.federation.config import ConfigError, DataConfig, ExperimentConfig
from fedmerge.federation.proxy import proxy_inputs, proxy_split
from fedmerge.federation.results import RunDir
from fedmerge.federation.scoring import hold_out
from fedmerge.federation.storage import RunUploader, StorageError
from fedmerge.federation.strategy import FedMergeStrategy, RoundReport

__all__ = [
    "NEEDS",
    "Experiment",
    "build_aggregator",
    "check_needs",
    "checkpoint_due",
    "partition_params",
    "report_events",
    "report_rows",
]

log = logging.getLogger("fedmerge")

PLACEMENT_TIMEOUT_S = 120

NEEDS = {
    "validation": "data.server_val_size",
    "proxy_inputs": "data.proxy_inputs",
    "model_builder": "data.task",
    "base_model": "data.task",
}
"""What an aggregator may declare in ``Aggregator.needs``, and the config key that supplies each:
the server validation set (``RoundContext.evaluate`` / ``evaluate_many``), unlabelled proxy
inputs (``proxy_inputs``), the model's constructor (``build_model``), the round-0 weights
(``base_state``)."""


RUN_LR_PARAM = "local_lr"
"""A declared aggregator hyperparameter that, left at 0, means the run's ``[train] lr``: the
server knows the clients' learning rate from the config, so none need report it (SCAFFOLD)."""


def build_aggregator(config: ExperimentConfig) -> Aggregator:
    """The configured aggregator, built on the driver so a bad name or parameter fails fast;
    a declared ``local_lr`` left at 0 gets the run's ``[train] lr``."""
    try:
        aggregator = create_aggregator(config.aggregator.name, config.aggregator.params)
        if getattr(getattr(aggregator, "hparams", None), RUN_LR_PARAM, None) == 0:
            params = {**config.aggregator.params, RUN_LR_PARAM: float(config.train.lr)}
            aggregator = create_aggregator(config.aggregator.name, params)
        return aggregator
    except (ValueError, TypeError, ImportError) as err:
        raise ConfigError(f"aggregator: {err}") from None


def merges_products(config: ExperimentConfig, needs: frozenset[str]) -> bool:
    """Whether a LoRA run merges the adapters' products B·A (``[aggregator] adapters``; ``auto``:
    for the task-vector methods, whose ``needs`` include ``base_model``) rather than the factors."""
    if not config.train.peft.enabled:
        return False
    if config.aggregator.adapters == "auto":
        return "base_model" in needs
    return config.aggregator.adapters == "products"


@dataclass(frozen=True)
class FederatedModel:
    """What a run shares of its model: the initial global state (every tensor, or under
    ``[train.peft]`` the adapters and heads, plus the adapted layers' base weights when the
    products are merged), the keys a reply carries, the adapted layers and the frozen base's
    digest ("" without adapters)."""

    initial_state: dict[str, torch.Tensor]
    reply_keys: tuple[str, ...]
    layout: tuple[LoraModule, ...] = ()
    frozen_digest: str = ""


def federated_model(task: Task, *, seed: int, products: bool) -> FederatedModel:
    """The run's initial model as it is shared (see ``FederatedModel``), seeded by ``seed``."""
    torch.manual_seed(seed)
    model = task.build_federated_model()
    if task.adapter is None:
        state = get_state(model)
        return FederatedModel(state, tuple(state))
    reply = task.shared_state(model)
    layout = adapter_layout(model) if products else ()
    full = get_state(model)
    state = {k: v for k, v in full.items() if k in reply or k in {m.base_key for m in layout}}
    return FederatedModel(state, tuple(reply), layout, frozen_digest(model, state))


def check_needs(config: ExperimentConfig, aggregator: Aggregator | None = None) -> frozenset[str]:
    """The aggregator's declared needs, checked against ``NEEDS`` and the config: a name outside the
    vocabulary, or validation without ``data.server_val_size``, is a ``ConfigError`` naming the
    aggregator, the need and the config key that supplies it."""
    aggregator = build_aggregator(config) if aggregator is None else aggregator
    who = f"aggregator {config.aggregator.name!r} ({type(aggregator).__module__}.{type(aggregator).__qualname__})"
    declared = getattr(aggregator, "needs", frozenset())
    if (
        isinstance(declared, str)
        or not isinstance(declared, (set, frozenset, tuple, list))
        or not all(isinstance(name, str) for name in declared)
    ):
        raise ConfigError(
            f"{who}: needs must be a frozenset of names from {sorted(NEEDS)}, got {declared!r}"
        )
    needs = frozenset(declared)
    unknown = sorted(needs - NEEDS.keys())
    if unknown:
        raise ConfigError(
            f"{who} declares needs {unknown}, which no run provides; Aggregator.needs takes "
            f"names from {sorted(NEEDS)}"
        )
    if "validation" in needs and config.data.server_val_size <= 0:
        raise ConfigError(
            f"{who} needs 'validation': it scores models on a server validation set, which "
            f"{NEEDS['validation']} holds out of the training data; set data.server_val_size > 0 "
            "(e.g. 1000)"
        )
    return needs


def partition_params(data: DataConfig) -> dict[str, Any]:
    """The keyword arguments of the chosen partitioner: the ``[data]`` fields it takes (``alpha``,
    ``classes_per_client``, ``min_partition_size``), then ``data.partitioner_params`` over them."""
    from fedmerge.clients.partition import partitioner_params

    accepted = partitioner_params(data.partitioner)
    fields = {"alpha", "classes_per_client", "min_partition_size"}
    params = {name: getattr(data, name) for name in accepted if name in fields}
    params.update(data.partitioner_params)
    return params


def report_rows(report: RoundReport) -> list[tuple[str, int | None, str, float]]:
    """A round's report as long-format metric rows (scope, client_id, metric, value)."""
    rows: list[tuple[str, int | None, str, float]] = []
    rows += [("server", None, k, float(v)) for k, v in report.server_metrics.items()]
    rows += [("aggregator", None, k, float(v)) for k, v in report.aggregator_metrics.items()]
    rows += [
        ("client", None, f"federated_{k}", float(v)) for k, v in report.federated_metrics.items()
    ]
    for cid, metrics in sorted(report.client_metrics.items()):
        rows += [("client", cid, k, float(v)) for k, v in metrics.items()]
    rows += [("system", _client(f.client_id), "failed", 1.0) for f in report.failures]
    rows += [("system", _client(f.client_id), "rejected", 1.0) for f in report.rejected]
    rows += [
        ("system", None, "round_time_s", report.round_time_s),
        ("system", None, "clients_sampled", float(len(report.sampled))),
        ("system", None, "clients_failed", float(len(report.failures))),
        ("system", None, "clients_rejected", float(len(report.rejected))),
        ("system", None, "round_skipped", float(bool(report.skipped))),
        ("system", None, "bytes_sent", float(report.bytes_sent)),
        ("system", None, "bytes_received", float(report.bytes_received)),
    ]
    return rows


def report_events(report: RoundReport) -> list[tuple[int | None, str, str]]:
    """A round's events (client_id, kind, reason): why clients failed or were rejected, why the
    round was skipped, which server actors were restarted."""
    events: list[tuple[int | None, str, str]] = []
    events += [(_client(f.client_id), "failed", f.reason) for f in report.failures]
    events += [(_client(f.client_id), "rejected", f.reason) for f in report.rejected]
    if report.skipped:
        events.append((None, "skipped", report.skipped))
    events += [(None, "actor_restarted", note) for note in report.restarts]
    return events


def checkpoint_due(server_round: int, every: int, last_round: int) -> bool:
    """Checkpoint every ``every`` rounds and after the last one; never when ``every`` is 0."""
    return every > 0 and (server_round % every == 0 or server_round == last_round)


def _client(client_id: int) -> int | None:
    """A client id for the records; None when the reply did not say which client it was."""
    return client_id if client_id >= 0 else None


class Experiment:
    """One configured run on the server side; ``resume`` is the checkpoint a resumed run starts from,
    ``callbacks`` the user's round callbacks (``fedmerge.RoundCallback``), run after the run's own
    records."""

    def __init__(
        self,
        config: ExperimentConfig,
        run_dir: RunDir,
        progress: Callable[[str], None] = print,
        resume: Checkpoint | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.progress = progress
        self.resume = resume
        self.callbacks = default_callbacks(callbacks)
        self.error: BaseException | None = None
        self._task_spec: dict[str, Any] | None = None
        self.model: FederatedModel | None = None  # set by setup
        self.final_state: dict[str, Any] | None = None
        self.final_served: tuple[dict[str, Any], dict[str, Any]] | None = (
            None  # fedmerge.federation.served spec, weights
        )
        self.placement: dict[str, dict[str, str]] = {}
        self.started = time.perf_counter()  # reset when the rounds start
        self.wall_time_s = 0.0
        self.uploader = (
            RunUploader(run_dir.path, config.output.upload_uri)
            if config.output.upload_uri
            else None
        )

    @property
    def clients_per_round(self) -> int:
        fed, n = self.config.federation, self.config.data.num_clients
        return min(n, max(fed.min_train_nodes, int(n * fed.fraction_train)))

    @property
    def num_supernodes(self) -> int:
        return self.config.federation.num_supernodes or self.clients_per_round

    @property
    def rounds_left(self) -> bool:
        """Whether rounds remain (a resume from the last round's checkpoint has none)."""
        return self.resume is None or self.resume.round < self.config.federation.num_rounds

    def setup(self) -> None:
        """Data, shards, initial model and the placed server actors (Ray must be up).

        The server validation set and ``data.proxy_inputs = "held_out"`` are carved out of the
        training data whenever the config asks for them, so the clients' shards never depend on
        the aggregator; they are shipped to the aggregator only when it declares the need. Proxy
        inputs from the test split are not built at all for an aggregator that does not need them.
        """
        cfg = self.config
        needs = check_needs(cfg)
        task = cfg.task_spec.build()
        data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else None
        train, test = task.load("train", data_dir), task.load("test", data_dir)
        self._task_spec = self._task_ref(task)
        train, test = (
            limit_examples(part, cap, cfg.seed, task.task_index(part.x))
            for part, cap in (
                (train, cfg.data.max_train_examples),
                (test, cfg.data.max_test_examples),
            )
        )
        validation = None
        if cfg.data.server_val_size > 0:  # held out before partitioning: in no client's shard
            train, held = hold_out(train, cfg.data.server_val_size, cfg.seed)
            if "validation" in needs:
                validation = {
                    "task": self.task_ref,
                    "x": held.x,
                    "y": held.y,
                    "batch_size": cfg.evaluation.batch_size,
                }
        # unlabelled proxy inputs (WEMoE): the test inputs, or a slice held out here, before partitioning
        proxy = None
        if "proxy_inputs" in needs or cfg.data.proxy_inputs != "test":
            train, proxy_source = proxy_split(
                task,
                train,
                test,
                source=cfg.data.proxy_inputs,
                size=cfg.data.proxy_size,
                seed=cfg.seed,
            )
            if "proxy_inputs" in needs:
                proxy = proxy_inputs(task, proxy_source)
        self.attack = attack_summary(cfg.attack, cfg.data.num_clients)
        (self.run_dir.path / "attack.json").write_text(json.dumps(self.attack, indent=1))
        cache_dir = Path(cfg.data.cache_dir or cfg.output.root_path / "_shards").resolve()
        try:
            self.shard_dir = materialize_shards(
                task,
                train,
                cfg.data.num_clients,
                cfg.data.partitioner,
                cfg.seed,
                partition_params(cfg.data),
                cache_dir,
            )
        except ValueError as err:  # the data cannot be split as configured: a config problem
            raise ConfigError(
                f"data.partitioner = {cfg.data.partitioner!r} cannot split the "
                f"{len(train):,} training examples over data.num_clients = {cfg.data.num_clients}: "
                f"{err}"
            ) from err
        self.shard_sizes = [int(n) for n in load_manifest(self.shard_dir)["counts"]]
        try:
            self.model = federated_model(task, seed=cfg.seed, products=merges_products(cfg, needs))
        except (ValueError, ImportError) as err:  # target modules that fit nothing, no peft
            raise ConfigError(f"train.peft: {err}") from None
        self.initial_state = self.model.initial_state
        task.check_model(list(self.initial_state))
        if self.resume is not None:
            self._check_resume(self.resume)
        aggregator = build_aggregator(cfg)  # after the model: its own init draws on torch's RNG
        if self.model.layout:
            if getattr(aggregator, "clipping", None) == "client":
                raise ConfigError(
                    "aggregator: clipping = 'client' clips the LoRA factors a client sends, but "
                    "adapters = 'products' merges (and would clip) their products: use "
                    "clipping = 'server' or aggregator.adapters = 'factors'"
                )
            if type(aggregator).client_arrays is not Aggregator.client_arrays:
                raise ConfigError(
                    f"aggregator {cfg.aggregator.name!r} sends each client tensors of the adapter "
                    "factors it trains, which the merged products B·A are not: set "
                    '[aggregator] adapters = "factors"'
                )
            aggregator = LoraProducts(aggregator, self.model.layout)
        try:  # before any client trains: a privacy budget the configured rounds would exceed
            aggregator.plan_run(
                num_rounds=cfg.federation.num_rounds,
                num_clients=cfg.data.num_clients,
                clients_per_round=self.clients_per_round,
            )
        except ValueError as err:
            raise ConfigError(f"aggregator: {err}") from None

        agg, ev = cfg.ray.aggregator, cfg.ray.evaluator
        self.aggregator = AggregatorActor.options(**actor_options(agg)).remote(
            aggregator,
            to_numpy_state(self.initial_state),
            cfg.seed,
            validation=validation,
            malicious=self.attack["malicious_clients"],
            task_name=self.task_ref,
            proxy=proxy,
            num_clients=cfg.data.num_clients,
            num_rounds=cfg.federation.num_rounds,
        )
        self.evaluator = EvaluatorActor.options(**actor_options(ev)).remote(
            self.task_ref, test.x, test.y, cfg.evaluation.batch_size, int(ev.num_cpus)
        )
        # Once, to know both are placed; after each round the placement rides on the round's results.
        for role, actor, section in (
            ("aggregator", self.aggregator, agg),
            ("evaluator", self.evaluator, ev),
        ):
            try:
                self.placement[role] = ray.get(
                    actor.placement.remote(), timeout=PLACEMENT_TIMEOUT_S
                )
            except ray.exceptions.GetTimeoutError:
                raise ConfigError(
                    f"the {role} actor was not placed within {PLACEMENT_TIMEOUT_S} s: no node "
                    f"offers what ray.{role} asks for ({actor_options(section)})"
                ) from None
        if self.resume is not None:
            ray.get(
                self.aggregator.restore.remote(
                    self.resume.global_state, self.resume.aggregator_state, self.resume.round
                ),
                timeout=PLACEMENT_TIMEOUT_S,
            )

    def _check_resume(self, checkpoint: Checkpoint) -> None:
        """The checkpoint must belong to this run: same seed, same model layout."""
        if checkpoint.seed != self.config.seed:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written with seed {checkpoint.seed}, "
                f"but the run's config.toml says seed = {self.config.seed}"
            )
        expected = {
            k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for k, v in self.initial_state.items()
        }
        found = {k: (tuple(v.shape), str(v.dtype)) for k, v in checkpoint.global_state.items()}
        if expected != found:
            raise CheckpointError(
                f"checkpoint file {checkpoint.path / 'global.safetensors'} does not fit the "
                f"{self.config.data.task} model: keys, shapes or dtypes differ"
            )

    def _task_ref(self, task: Task) -> dict[str, Any]:
        """What other processes build ``task`` from (``TaskSpec.to_dict()``): the plug-in modules
        to import, and the parameters with relative paths made absolute (a Ray worker's cwd may
        differ from the driver's; a task learns ``data.data_dir`` when it loads)."""
        cfg = self.config
        return TaskSpec(
            cfg.data.task, task.portable_params(), tuple(cfg.run.plugins), cfg.task_spec.adapter
        ).to_dict()

    @property
    def task_ref(self) -> dict[str, Any]:
        """The run's task as other processes build it (set by ``setup``; computed here for a
        caller that builds run configs without one, as the benchmarks do)."""
        if self._task_spec is None:
            task = self.config.task_spec.build()
            data_dir = Path(self.config.data.data_dir) if self.config.data.data_dir else None
            task.load("train", data_dir)
            self._task_spec = self._task_ref(task)
        return self._task_spec

    def run_config(self) -> dict[str, Any]:
        """The static part of every client's message."""
        cfg = self.config
        return {
            "task": self.task_ref,
            "shard_dir": str(self.shard_dir),
            "seed": cfg.seed,
            "local_test_fraction": cfg.data.local_test_fraction,
            "num_threads": max(1, int(cfg.ray.client_num_cpus)),
            "train": asdict(cfg.train),
            "num_clients": cfg.data.num_clients,
            "attack": asdict(cfg.attack) if cfg.attack.active else None,
            **({"frozen_digest": self.model.frozen_digest} if self.model else {}),
        }

    def server_app(self) -> ServerApp:
        """A ServerApp whose main runs ``run_rounds`` (for Flower's simulation engine); an error is
        kept in ``error`` for the driver, which sees only Flower's shutdown."""
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                self.run_rounds(grid)
            except BaseException as err:  # surfaced by the runner after Flower shuts down
                self.error = err
                raise

        return app

    def run_rounds(self, grid: Grid) -> None:
        """Drive the rounds left over ``grid`` (after ``setup``), calling the callbacks' ``on_run_start``
        first and ``on_round_end`` after each round; leaves the final weights (and served model)."""
        cfg = self.config
        strategy = FedMergeStrategy(
            aggregator=self.aggregator,
            evaluator=self.evaluator,
            num_clients=cfg.data.num_clients,
            fraction_train=cfg.federation.fraction_train,
            min_train_nodes=cfg.federation.min_train_nodes,
            fraction_evaluate=cfg.federation.fraction_evaluate,
            min_evaluate_nodes=cfg.federation.min_evaluate_nodes,
            evaluate_every=cfg.evaluation.every,
            seed=cfg.seed,
            run_config=self.run_config(),
            expected_nodes=self.num_supernodes,
            on_round=self.round_end,
            max_update_norm=cfg.federation.max_update_norm,
            max_update_norm_ratio=cfg.federation.max_update_norm_ratio,
            shard_sizes=self.shard_sizes,
            aggregator_restarts=cfg.ray.aggregator.max_restarts,
            evaluator_restarts=cfg.ray.evaluator.max_restarts,
            reply_keys=None if self.model is None else self.model.reply_keys,
        )
        if self.resume is None:
            initial, first_round, aggregator_state, served = (
                state_to_record(self.initial_state),
                1,
                {},
                None,
            )
        else:
            initial = state_to_record(self.resume.global_state)
            first_round, aggregator_state = self.resume.round + 1, self.resume.aggregator_state
            served = self.resume.served
        self.callbacks.call("on_run_start", self, first_round - 1)
        self.started = time.perf_counter()
        result = strategy.start(
            grid,
            initial,
            num_rounds=cfg.federation.num_rounds,
            timeout=cfg.federation.round_timeout_s,
            first_round=first_round,
            aggregator_state=aggregator_state,
            served=served,
        )
        self.final_state = result.arrays.to_torch_state_dict()
        served_ref = strategy.served_model_ref()
        self.final_served = (
            None if served_ref is None else ray.get(served_ref, timeout=PLACEMENT_TIMEOUT_S)
        )

    def round_end(self, report: RoundReport) -> None:
        """Take the actors' placement from the round's results, then run the callbacks' ``on_round_end``
        (records first, checkpoint last of them: a run killed in between redoes the round)."""
        for role, where in report.actor_placement.items():
            self.placement[role] = dict(where)
        self.callbacks.call("on_round_end", self, report.round, report)

    def skip_rounds(self) -> None:
        """A resume from the last round's checkpoint: its weights and served model are the final ones."""
        assert self.resume is not None
        self.final_state = {k: torch.from_numpy(v) for k, v in self.resume.global_state.items()}
        self.final_served = self.resume.served  # the final checkpoint holds the served model too

    def finish(self, wall_time_s: float) -> None:
        """Save the final model, summary and plot, upload and print the report (``on_run_end``)."""
        if self.final_state is None:
            raise RuntimeError("Experiment.finish() before the rounds ended: no final model")
        self.wall_time_s = wall_time_s
        self.callbacks.call("on_run_end", self, self.config.federation.num_rounds)

    def upload(self, final: bool = False) -> None:
        """Copy what changed in the run folder to ``output.upload_uri``. A failed copy during the run
        is only logged (the local folder is complete and the next round retries); a failed final
        copy raises."""
        if self.uploader is None:
            return
        try:
            self.uploader.sync()
        except OSError as err:
            if final:
                raise StorageError(
                    f"the run finished in {self.run_dir.path}, but copying it to "
                    f"{self.config.output.upload_uri} failed: {err}"
                ) from err
            log.warning(
                "copying the run folder to %s failed (retried next round): %s",
                self.config.output.upload_uri,
                err,
            )
