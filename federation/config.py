"""Experiment configuration: one TOML file per experiment, validated, with ``--set`` overrides.

A config is data. Every field below has a default and a one-line doc (``fedmerge list --fields``
prints them); unknown keys and bad values raise ``ConfigError`` naming the key, so a typo never
silently falls back to a default. ``[aggregator]`` is open: every key other than ``name`` is a
hyperparameter of the chosen aggregator, checked against its declared ``Params`` (``fedmerge list
--aggregator NAME`` prints them) before Ray starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedmerge.aggregators.lora import ADAPTER_MERGES
from fedmerge.clients.attacks import AttackConfig
from fedmerge.clients.training import TrainConfig
from fedmerge.federation.validation import DEFAULT_MAX_UPDATE_NORM_RATIO

__all__ = [
    "ActorConfig",
    "AttackConfig",
    "AggregatorConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "FederationConfig",
    "OutputConfig",
    "RayConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "describe_fields",
    "load_config",
    "parse_config",
]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


INT32_MAX = 2**31 - 1
"""Rounds and client ids are stored as int32 in metrics.parquet."""

MAX_NAME_BYTES = 200
"""Longest run name, in UTF-8 bytes: the run folder is ``<name>-YYYYmmdd-HHMMSS[-n]`` (and
``compare`` appends ``-<aggregator>``), and a file system refuses names over 255 bytes
(ENAMETOOLONG) only once the run starts to write."""

MAX_AGGREGATOR_NAME_CHARS = 1000
"""Longest ``aggregator.name`` (a registered name or a ``module:Class`` path)."""

MAX_SUGGEST_CHARS = 100
"""A "did you mean" search is skipped for longer input: no key or choice is that long, and
difflib's cost grows with the product of the lengths (a 100 MB value took gigabytes)."""

PROXY_INPUTS = ("test", "held_out")
"""Where the server's unlabelled proxy inputs come from (``data.proxy_inputs``)."""


def _f(default: Any, doc: str) -> Any:
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"doc": doc})
    if dataclasses.is_dataclass(default):
        return field(default_factory=type(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class DataConfig:
    task: str = _f(
        "fashion_mnist",
        "the task (data, model, loss, metrics): a name (`fedmerge list`), a "
        "`module:Class` path or a `fedmerge.tasks` entry point",
    )
    task_params: dict[str, Any] = _f(
        {},
        "the task's own settings, checked against its declared Params "
        "(`fedmerge list --task NAME`), e.g. the file and columns of `tabular`",
    )
    data_dir: str = _f(
        "", "where the task's data lie; empty = $FEDMERGE_DATA_DIR, then system paths"
    )
    num_clients: int = _f(10, "number of (virtual) clients, one data shard each")
    partitioner: str = _f(
        "dirichlet",
        "how labels are split across clients: iid | dirichlet | pathological | "
        "by_task (multi-task data: one task a client, dirichlet within a task)",
    )
    alpha: float = _f(
        0.5, "Dirichlet concentration; smaller = stronger label skew (dirichlet only)"
    )
    classes_per_client: int = _f(2, "classes each client holds (pathological only)")
    partitioner_params: dict[str, Any] = _f(
        {},
        "keyword arguments of the partitioner, over the fields above it takes (alpha, ...); "
        "a plug-in partitioner's own settings go here",
    )
    min_partition_size: int = _f(
        10, "resample until every client has at least this many examples (dirichlet)"
    )
    local_test_fraction: float = _f(
        0.0, "share of each shard kept by the client for federated evaluation"
    )
    cache_dir: str = _f(
        "", "where shards are written once and reused; empty = <output.root>/_shards"
    )
    server_val_size: int = _f(
        0,
        "examples held out of the training data, before partitioning, as the server's "
        "validation set (FedDRL's reward; 1000 in its experiments); 0 = none",
    )
    proxy_inputs: str = _f(
        "test",
        "the server's unlabelled inputs for test-time adaptation (WEMoE's routers): "
        "test = the server's test inputs (the paper's transductive setting) | "
        "held_out = data.proxy_size examples per task held out of the training data",
    )
    proxy_size: int = _f(
        0,
        "examples per task held out of the training data, before partitioning (in no "
        'client\'s shard), as unlabelled proxy inputs; only with proxy_inputs = "held_out"',
    )
    max_train_examples: int = _f(
        0,
        "use at most this many training examples (per task for multi-task data), a "
        "seeded random subset; 0 = all",
    )
    max_test_examples: int = _f(
        0, "score on at most this many test examples (per task for multi-task data); 0 = all"
    )

    def validate(self) -> None:
        _check(1 <= self.num_clients <= INT32_MAX, "data.num_clients", f"must be in 1..{INT32_MAX}")
        _check(
            self.alpha > 0 and math.isfinite(self.alpha), "data.alpha", "must be a positive number"
        )
        _check(self.classes_per_client >= 1, "data.classes_per_client", "must be >= 1")
        _check(self.min_partition_size >= 0, "data.min_partition_size", "must be >= 0")
        _check(
            0.0 <= self.local_test_fraction < 1.0, "data.local_test_fraction", "must be in [0, 1)"
        )
        _check(
            0 <= self.server_val_size <= INT32_MAX,
            "data.server_val_size",
            f"must be in 0..{INT32_MAX}",
        )
        _check_choice(self.proxy_inputs, PROXY_INPUTS, "data.proxy_inputs")
        _check(0 <= self.proxy_size <= INT32_MAX, "data.proxy_size", f"must be in 0..{INT32_MAX}")
        _check(
            (self.proxy_size > 0) == (self.proxy_inputs == "held_out"),
            "data.proxy_size",
            f"= {self.proxy_size} does not fit data.proxy_inputs = {self.proxy_inputs!r}: held_out needs "
            "a proxy_size > 0, test takes none (0)",
        )
        _check(self.max_train_examples >= 0, "data.max_train_examples", "must be >= 0 (0 = all)")
        _check(self.max_test_examples >= 0, "data.max_test_examples", "must be >= 0 (0 = all)")
        from fedmerge.clients.partition import PARTITIONERS, partitioner_params
        from fedmerge.clients.tasks import create_task
        from fedmerge.plugins import PluginError

        _check(bool(self.task.strip()), "data.task", "must not be empty")
        try:
            create_task(self.task, self.task_params)
        except PluginError as err:
            raise ConfigError(f"data.task: {err}") from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
        try:
            PARTITIONERS.resolve(self.partitioner)
        except PluginError as err:
            raise ConfigError(f"data.partitioner: {err}") from None
        accepted = partitioner_params(self.partitioner)
        for key in self.partitioner_params:
            hint = _close_match(str(key), accepted)
            _check(
                key in accepted,
                f"data.partitioner_params.{_cut(str(key))}",
                f"is not a parameter of partitioner {self.partitioner!r}"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; it takes: {', '.join(accepted) or '(none)'}",
            )


@dataclass(frozen=True)
class FederationConfig:
    num_rounds: int = _f(10, "federated rounds")
    fraction_train: float = _f(0.5, "share of clients sampled for training each round")
    min_train_nodes: int = _f(
        2, "never sample fewer clients than this; a round with fewer valid replies is skipped"
    )
    fraction_evaluate: float = _f(
        0.0, "share of clients sampled for federated evaluation on their local split"
    )
    min_evaluate_nodes: int = _f(0, "never sample fewer clients than this for federated evaluation")
    round_timeout_s: float = _f(
        600.0, "seconds to wait for a round's replies before going on without the rest"
    )
    num_supernodes: int = _f(
        0, "simulation SuperNodes (execution slots); 0 = as many as clients sampled a round"
    )
    max_update_norm: float = _f(
        0.0,
        "reject a client update whose L2 distance from the global model exceeds this; "
        "0 = no bound (the scale is model-specific: see each client's update_norm metric)",
    )
    max_update_norm_ratio: float = _f(
        DEFAULT_MAX_UPDATE_NORM_RATIO,
        "reject a client update whose L2 distance from the global model exceeds this "
        "many times the global model's own L2 norm (at least 1); stops absurd updates "
        "whatever the model; 0 = no bound",
    )

    def validate(self) -> None:
        _check(
            1 <= self.num_rounds <= INT32_MAX, "federation.num_rounds", f"must be in 1..{INT32_MAX}"
        )
        _check(0.0 < self.fraction_train <= 1.0, "federation.fraction_train", "must be in (0, 1]")
        _check(self.min_train_nodes >= 1, "federation.min_train_nodes", "must be >= 1")
        _check(
            0.0 <= self.fraction_evaluate <= 1.0,
            "federation.fraction_evaluate",
            "must be in [0, 1]",
        )
        _check(self.min_evaluate_nodes >= 0, "federation.min_evaluate_nodes", "must be >= 0")
        _check(self.round_timeout_s > 0, "federation.round_timeout_s", "must be > 0")
        _check(self.num_supernodes >= 0, "federation.num_supernodes", "must be >= 0")
        _check(
            self.max_update_norm >= 0, "federation.max_update_norm", "must be >= 0 (0 = no bound)"
        )
        _check(
            self.max_update_norm_ratio >= 0 and math.isfinite(self.max_update_norm_ratio),
            "federation.max_update_norm_ratio",
            "must be a finite number >= 0 (0 = no bound)",
        )


@dataclass(frozen=True)
class AggregatorConfig:
    name: str = _f(
        "fedavg",
        "a registered name, a `module:Class` path, or a `fedmerge.aggregators` entry point",
    )
    params: dict[str, Any] = _f(
        {}, "every other key of [aggregator]: keyword arguments of the aggregator"
    )
    adapters: str = _f(
        "auto",
        "with [train.peft]: factors (merge A and B as tensors: FedIT under fedavg) | products "
        "(merge the B·A they stand for, folded into the base: FLoRA's exact merge) | auto "
        "(products for task-vector methods, factors otherwise)",
    )

    def validate(self) -> None:
        _check(bool(self.name.strip()), "aggregator.name", "must not be empty")
        _check_choice(self.adapters, ADAPTER_MERGES, "aggregator.adapters")
        _check(
            len(self.name) <= MAX_AGGREGATOR_NAME_CHARS,
            "aggregator.name",
            f"= {_short(self.name)} is longer than {MAX_AGGREGATOR_NAME_CHARS} characters: no registered "
            "name or module:Class path is",
        )


@dataclass(frozen=True)
class ActorConfig:
    num_cpus: float = _f(0.0, "CPUs reserved for the actor (0 leaves every core to the clients)")
    num_gpus: float = _f(0.0, "GPUs for the actor; it computes on CUDA when Ray gives it one")
    resources: dict[str, float] = _f(
        {}, "custom Ray resources, e.g. {aggregator = 1} to pin it to a node"
    )
    max_restarts: int = _f(
        3,
        "times Ray restarts the actor when its process dies (the round is replayed "
        "into it); 0 = a dead actor ends the run",
    )
    label_selector: dict[str, str] = _f(
        {},
        'node labels the actor requires, e.g. {"fedmerge-role" = "aggregator"} '
        "(labels come from `ray start --labels`; values may be `!x`, `in(a,b)`)",
    )
    scheduling_strategy: str = _f(
        "DEFAULT", "Ray scheduling strategy: DEFAULT (pack) or SPREAD (prefer another node)"
    )

    def validate(self, prefix: str) -> None:
        _check(self.num_cpus >= 0, f"{prefix}.num_cpus", "must be >= 0")
        _check(self.num_gpus >= 0, f"{prefix}.num_gpus", "must be >= 0")
        _check(self.max_restarts >= 0, f"{prefix}.max_restarts", "must be >= 0")
        for key, value in self.resources.items():
            _check(
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and 0 < value < math.inf,
                f"{prefix}.resources.{key}",
                "must be a positive finite number",
            )
        _check(
            self.scheduling_strategy in SCHEDULING_STRATEGIES,
            f"{prefix}.scheduling_strategy",
            f"= {_short(self.scheduling_strategy)} is not one of {', '.join(SCHEDULING_STRATEGIES)}",
        )
        for key, value in self.label_selector.items():
            _check(
                isinstance(key, str) and isinstance(value, str),
                f"{prefix}.label_selector.{key}",
                f"must be a string (a label value or selector), got {_type_name(value)}",
            )
            problem = _label_problem(key, value)
            _check(
                problem is None,
                f"{prefix}.label_selector.{key}",
                f"is not a valid Ray label selector: {problem}",
            )


@dataclass(frozen=True)
class RayConfig:
    address: str = _f(
        "",
        "Ray cluster to attach to (`auto`, `host:port`); empty = $RAY_ADDRESS or a new local Ray",
    )
    num_cpus: int = _f(0, "CPUs of a new local Ray; 0 = all cores (ignored when attaching)")
    client_num_cpus: float = _f(
        1.0, "CPUs per simulated client; clients in parallel = cluster CPUs / this"
    )
    client_num_gpus: float = _f(0.0, "GPUs per simulated client")
    aggregator: ActorConfig = _f(ActorConfig(), "placement of the AggregatorActor")
    evaluator: ActorConfig = _f(ActorConfig(), "placement of the EvaluatorActor")

    def validate(self) -> None:
        _check(self.num_cpus >= 0, "ray.num_cpus", "must be >= 0")
        _check(self.client_num_cpus > 0, "ray.client_num_cpus", "must be > 0")
        _check(self.client_num_gpus >= 0, "ray.client_num_gpus", "must be >= 0")
        self.aggregator.validate("ray.aggregator")
        self.evaluator.validate("ray.evaluator")


@dataclass(frozen=True)
class EvaluationConfig:
    batch_size: int = _f(1000, "batch size of server-side evaluation")
    every: int = _f(1, "evaluate the global model every N rounds (the last round always)")

    def validate(self) -> None:
        _check(self.batch_size >= 1, "evaluation.batch_size", "must be >= 1")
        _check(self.every >= 1, "evaluation.every", "must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = _f(
        1, "checkpoint every N rounds and after the last one, for `fedmerge resume`; 0 = never"
    )
    keep: int = _f(2, "how many of the newest checkpoints to keep; 0 = all")

    def validate(self) -> None:
        _check(self.every >= 0, "checkpoint.every", "must be >= 0 (0 = never)")
        _check(self.keep >= 0, "checkpoint.keep", "must be >= 0 (0 = all)")


@dataclass(frozen=True)
class OutputConfig:
    root: str = _f(
        "runs",
        "directory (path or file:// URI) under which each run gets its own folder; on a "
        "cluster, a volume every node mounts",
    )
    save_model: bool = _f(True, "write the final global model as safetensors")
    plot: bool = _f(True, "write the accuracy-per-round plot")
    upload_uri: str = _f(
        "",
        "also copy the run folder to <upload_uri>/<folder> after every round (pyarrow.fs "
        "URI: s3://, gs://, abfs://, hdfs://, file://); empty = no copy",
    )

    def validate(self) -> None:
        from fedmerge.federation.storage import (
            LOCAL_SCHEMES,
            REMOTE_SCHEMES,
            StorageError,
            local_path,
            uri_scheme,
        )

        _check(bool(self.root.strip()), "output.root", "must not be empty")
        scheme = uri_scheme(self.root)
        _check(
            scheme in LOCAL_SCHEMES,
            "output.root",
            f"= {_short(self.root)}: runs are written to a local or mounted folder (a path or file:// URI); "
            "to keep a copy on object storage set output.upload_uri",
        )
        try:
            local_path(self.root)
        except StorageError as err:
            raise ConfigError(f"output.root {err}") from None
        if self.upload_uri:
            _check(
                uri_scheme(self.upload_uri) in REMOTE_SCHEMES,
                "output.upload_uri",
                f"= {_short(self.upload_uri)} must be a URI with one of the schemes "
                f"{', '.join(sorted(REMOTE_SCHEMES))}",
            )

    @property
    def root_path(self) -> Path:
        """``root`` as a local path (a ``file://`` URI unwrapped)."""
        from fedmerge.federation.storage import local_path

        return local_path(self.root)


@dataclass(frozen=True)
class RunConfig:
    plugins: tuple[str, ...] = _f(
        (),
        'modules (or .py files) that register plug-ins, e.g. ["mypkg.tasks"]: '
        "imported before the config's names are resolved, on the driver and in every "
        "Ray worker; a run adds the modules its registered plug-ins came from",
    )
    callbacks: tuple[str, ...] = _f(
        (),
        'round callbacks by import path, e.g. ["mypkg.logs:MyLogger"] (a class '
        "is built without arguments; see fedmerge.RoundCallback); imported on the "
        "driver before Ray starts",
    )

    def validate(self) -> None:
        from fedmerge.plugins import PluginError, import_plugins

        try:
            import_plugins(self.plugins)
        except PluginError as err:
            raise ConfigError(str(err)) from None
        for path in self.callbacks:
            module, sep, attr = path.partition(":")
            _check(
                bool(sep and module.strip() and attr.strip()),
                "run.callbacks",
                f"entry {_short(path)} must look like 'package.module:Name'",
            )


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _f("experiment", "run name; the run folder is <output.root>/<name>-<timestamp>")
    seed: int = _f(0, "seeds partitions, sampling, model init and local training")
    data: DataConfig = _f(DataConfig(), "data and partitioning")
    train: TrainConfig = _f(TrainConfig(), "local training on each client")
    federation: FederationConfig = _f(FederationConfig(), "rounds and client sampling")
    aggregator: AggregatorConfig = _f(AggregatorConfig(), "server-side merge")
    ray: RayConfig = _f(RayConfig(), "cluster and placement")
    evaluation: EvaluationConfig = _f(EvaluationConfig(), "server-side evaluation")
    checkpoint: CheckpointConfig = _f(
        CheckpointConfig(), "per-round checkpoints, for `fedmerge resume`"
    )
    output: OutputConfig = _f(OutputConfig(), "run directory")
    attack: AttackConfig = _f(
        AttackConfig(), "simulated malicious clients (robustness experiments)"
    )
    run: RunConfig = _f(RunConfig(), "the run's own hooks: round callbacks")

    def validate(self) -> None:
        _check(bool(self.name.strip()), "name", "must not be empty")
        _check(
            self.name not in {".", ".."} and not any(c in self.name for c in "/\\\0"),
            "name",
            f"{_short(self.name)} must be usable as a folder name (no '/', '\\' or NUL, not '.' or '..')",
        )
        size = len(self.name.encode("utf-8", "surrogatepass"))
        _check(
            size <= MAX_NAME_BYTES,
            "name",
            f"= {_short(self.name)} is {size} bytes long; the limit is {MAX_NAME_BYTES} (the run folder "
            f"adds a timestamp, and file names stop at 255 bytes): choose a shorter name",
        )
        _check(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")
        for section in (
            self.run,  # first: it imports the plug-ins the other sections name
            self.data,
            self.federation,
            self.aggregator,
            self.ray,
            self.evaluation,
            self.checkpoint,
            self.output,
        ):  # [train] checks itself on construction
            section.validate()
        _check(
            self.federation.min_train_nodes <= self.data.num_clients,
            "federation.min_train_nodes",
            f"is {self.federation.min_train_nodes} but data.num_clients is only {self.data.num_clients}",
        )
        _check(
            self.federation.min_evaluate_nodes <= self.data.num_clients,
            "federation.min_evaluate_nodes",
            f"is {self.federation.min_evaluate_nodes} but data.num_clients is only {self.data.num_clients}",
        )
        if self.federation.fraction_evaluate > 0:
            _check(
                self.data.local_test_fraction > 0,
                "data.local_test_fraction",
                "must be > 0 when federation.fraction_evaluate > 0 (clients need a local split)",
            )

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        agg = raw.pop("aggregator")
        raw["aggregator"] = {"name": agg["name"], "adapters": agg["adapters"], **agg["params"]}
        # Keys added after the first release are left out while they hold their default, so
        # config.toml and the checkpoints of older runs stay as they were.
        for section, key in (
            ("run", "plugins"),
            ("run", "callbacks"),
            ("data", "task_params"),
            ("data", "partitioner_params"),
            ("attack", "params"),
        ):
            if not raw[section][key]:
                del raw[section][key]
        if self.train.peft == type(self.train.peft)():  # all defaults: the file stays short
            del raw["train"]["peft"]
        if self.aggregator.adapters == "auto":
            del raw["aggregator"]["adapters"]
        if not raw["run"]:
            del raw["run"]
        return raw

    @property
    def task_spec(self):
        """The run's task as it crosses processes: spec, parameters, plug-in modules."""
        from fedmerge.clients.tasks import TaskSpec

        adapter = (
            {**self.train.peft.to_dict(), "seed": self.seed} if self.train.peft.enabled else None
        )
        return TaskSpec(
            self.data.task, dict(self.data.task_params), tuple(self.run.plugins), adapter
        )

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# ---- parsing -------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a TOML experiment file, apply ``section.key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text: byte {err.start} (0x{data[err.start]:02x}) cannot be "
            f"decoded; save the file as UTF-8"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    return parse_config(apply_overrides(raw, overrides), source=str(path))


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings; values are TOML literals (``0.1``, ``true``, ``"x"``) or bare text."""
    out = _deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {_short(item)} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {_short(item)}: {_cut('.'.join(parents[: i + 1]))} is not a section"
                )
            node = child
        node[leaf] = value
    return out


def parse_config(raw: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    """Build and validate an ExperimentConfig from plain data (e.g. parsed TOML)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a table of settings, got {type(raw).__name__}")
    if (
        "run" in raw
    ):  # the plug-ins first: sections that check themselves may name what they register
        _build(RunConfig, raw["run"], prefix="run.").validate()
    config = _build(ExperimentConfig, raw, prefix="")
    config.validate()
    return config


def describe_fields() -> list[tuple[str, str, str]]:
    """(key, default, doc) of every field, for `fedmerge list --fields` and the docs."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, repr(default), f.metadata.get("doc", "")))

    walk(ExperimentConfig, "")
    return rows


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table, got {_type_name(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is AggregatorConfig:
        params = {k: v for k, v in raw.items() if k not in ("name", "adapters")}
        for key in params:
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"aggregator.{_cut(str(key))} is not a valid parameter name")
        name = raw.get("name", AggregatorConfig.name)
        if not isinstance(name, str):
            raise ConfigError(f"aggregator.name must be a string, got {_type_name(name)}")
        adapters = raw.get("adapters", AggregatorConfig.adapters)
        if not isinstance(adapters, str):
            raise ConfigError(f"aggregator.adapters must be a string, got {_type_name(adapters)}")
        return AggregatorConfig(name=name, params=params, adapters=adapters)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            hint = _close_match(str(key), names)
            suggestion = f" (did you mean '{prefix}{hint}'?)" if hint else ""
            raise ConfigError(
                f"unknown key '{prefix}{_cut(str(key))}'{suggestion}; allowed: {', '.join(names)}"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # sections that validate themselves name the field first
        raise ConfigError(f"{prefix}{err}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {_short(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            if "\0" in value:
                raise ConfigError(f"{key} must not contain a NUL character")
            return value
    elif typing.get_origin(tp) is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif typing.get_origin(tp) is tuple:  # tuple[str, ...]: a TOML array of strings
        if isinstance(value, (list, tuple)):
            bad = [item for item in value if not isinstance(item, str) or "\0" in item]
            if bad:
                raise ConfigError(f"{key} must be an array of strings, got {_short(bad[0])} in it")
            return tuple(value)
    else:  # pragma: no cover - a field type this parser does not know is a programming error
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    expected = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, "an array of strings" if typing.get_origin(tp) is tuple else "a table"
    )
    raise ConfigError(f"{key} must be {expected}, got {_type_name(value)} {_short(value)}")


SCHEDULING_STRATEGIES = ("DEFAULT", "SPREAD")
"""The placement-free Ray scheduling strategies an actor section may name."""


def _label_problem(key: str, value: str) -> str | None:
    """Ray's own verdict on one label selector entry (None when it is valid)."""
    from ray._private.label_utils import validate_label_selector

    return validate_label_selector({key: value})


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _check_choice(value: str, choices: Iterable[str], key: str) -> None:
    choices = sorted(choices)
    if value not in choices:
        hint = _close_match(value, choices)
        suggestion = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(f"{key} = {_short(value)} is not one of {', '.join(choices)}{suggestion}")


def _close_match(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` is most likely a typo of, or None; long input is not searched
    (``MAX_SUGGEST_CHARS``)."""
    if len(word) > MAX_SUGGEST_CHARS:
        return None
    hint = difflib.get_close_matches(word, list(choices), n=1)
    return hint[0] if hint else None


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters with the full length said: an error
    message names a value, not a page of it (a string is cut before ``repr`` copies it)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _cut(text: str, limit: int = 80) -> str:
    """``text`` itself (a key, not a value: no quotes), cut like ``_short``."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _type_name(value: Any) -> str:
    return {
        dict: "table",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "float",
    }.get(type(value), type(value).__name__)


def _deepcopy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
