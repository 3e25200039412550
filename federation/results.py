"""The run directory of one experiment: config, per-round metrics, final model, plot and summary.

Metrics are kept in long format, one row per (round, scope, client, metric), in ``metrics.parquet``
(schema ``METRICS_SCHEMA``). The file is rewritten atomically after every round, so a killed run
keeps every round it finished. The model is stored as safetensors, never as a pickle.

What went wrong, and why, goes to ``events.jsonl``: one JSON object per line with ``round``,
``client_id`` (null when the event is not about one client), ``kind`` (``EVENT_KINDS``) and a
human-readable ``reason`` — failed and rejected clients, skipped rounds, restarted actors, resumes.
Per-round checkpoints live under ``checkpoints/`` (``fedmerge.federation.checkpoint``). Where each server
actor and each client ran every round (Ray node id, host, device, GPU name) goes to
``placement.jsonl``, one JSON object per line (``RunDir.log_placement``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedmerge.clients.partition import write_atomic
from fedmerge.federation.storage import os_errors_of

__all__ = [
    "EVENT_KINDS",
    "METRICS_SCHEMA",
    "PLACEMENT_ROLES",
    "SCOPES",
    "RunDir",
    "RunFileError",
    "RunLockedError",
    "compare_table",
    "format_run_report",
    "format_table",
    "plot_curves",
    "summarize",
]

METRICS_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("scope", pa.string()),
        ("client_id", pa.int32()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)
"""Columns of ``metrics.parquet``; ``client_id`` is null for rows that are not per client."""

SCOPES = frozenset({"server", "client", "aggregator", "system"})
"""Who a metric is about: the global model, one client, the aggregator, or the machinery."""

PLACEMENT_ROLES = frozenset({"aggregator", "evaluator", "client"})
"""Who a ``placement.jsonl`` record is about: a server actor, or one client's training."""

EVENT_KINDS = frozenset(
    {"failed", "rejected", "skipped", "actor_restarted", "resumed", "callback_failed"}
)
"""What an ``events.jsonl`` line reports: a client that raised or timed out, a reply refused by
validation, a round below ``min_train_nodes``, a server actor Ray restarted, a resumed run."""

_INT32_MAX = 2**31 - 1


class RunFileError(ValueError):
    """A file of a run directory cannot be read or has the wrong shape; the message names it."""


class RunLockedError(RunFileError):
    """Another process is writing the run directory (it holds the folder's lock)."""


LOCK_FILE = ".fedmerge.lock"
"""The lock file in a run folder; dot-named, so ``RunUploader`` does not copy it."""


class RunDir:
    """One experiment's folder: ``config.toml``, ``metrics.parquet``, ``model.safetensors``,
    ``accuracy.png`` and ``summary.json``.

    ``RunDir.create`` makes a fresh folder for a new run; ``RunDir(path)`` opens an existing one,
    e.g. to report on it, to compare runs, or to go on logging into it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"run directory {path} does not exist")
        if not path.is_dir():
            raise NotADirectoryError(f"run directory {path} is not a directory")
        self._path = path
        # Rows logged through this object (with those already on disk); None until the first
        # log_round, so that a reader opened on another process's run sees the file as it grows.
        self._table: pa.Table | None = None

    @classmethod
    def create(cls, root: str | os.PathLike[str], name: str) -> RunDir:
        """Make ``root/<name>-<YYYYmmdd-HHMMSS>``, with ``-1``, ``-2``... when that exists."""
        if not name or name in {".", ".."} or "/" in name or os.sep in name:
            raise ValueError(
                f"run name {name!r} must be a non-empty folder name without separators"
            )
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(
                f"output.root {root} is a file, not a folder: set output.root to a folder "
                "(or move the file away)"
            )
        root.mkdir(parents=True, exist_ok=True)
        base = f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
        path, n = root / base, 0
        while True:
            try:
                path.mkdir()  # exist_ok=False: two runs started in the same second never share.
                return cls(path)
            except FileExistsError:
                n += 1
                path = root / f"{base}-{n}"

    def __repr__(self) -> str:
        return f"RunDir({str(self._path)!r})"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def config_path(self) -> Path:
        return self._path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self._path / "metrics.parquet"

    @property
    def model_path(self) -> Path:
        return self._path / "model.safetensors"

    @property
    def plot_path(self) -> Path:
        return self._path / "accuracy.png"

    @property
    def summary_path(self) -> Path:
        return self._path / "summary.json"

    @property
    def events_path(self) -> Path:
        return self._path / "events.jsonl"

    @property
    def placement_path(self) -> Path:
        return self._path / "placement.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self._path / "checkpoints"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's exclusive lock while writing it (a run, a resume, a deployment run).

        ``flock`` on ``.fedmerge.lock``, taken without waiting: a second writer (a ``resume``
        started while the run is alive) fails at once with a RunLockedError naming the folder and
        the holder's pid. The kernel drops the lock when its holder dies, even by SIGKILL, so a
        killed run can be resumed; the stale pid left in the file means nothing then.
        """
        path = self._path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunFileError(
                f"cannot open the lock file {path} of run directory {self._path}: {exc.strerror}"
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise RunLockedError(
                    f"run directory {self._path} is being written by {who} (it holds {path}); "
                    "wait for it to end, or stop it, before resuming"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def write_config(self, text: str) -> None:
        """Write the resolved config (TOML text), so the run can be reproduced from its folder."""
        write_atomic(self.config_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def log_round(self, round: int, rows: Iterable[tuple[str, int | None, str, float]]) -> None:
        """Append ``(scope, client_id, metric, value)`` rows for ``round`` and rewrite the file.

        The whole (small) table is rewritten through a temporary file and ``os.replace``, so the
        file on disk is always a complete, valid table of the rounds logged so far.
        """
        new = _rows_to_table(round, rows)
        if self._table is None:
            self._table = self._read_metrics()
        self._table = pa.concat_tables([self._table, new]).combine_chunks()
        table = self._table
        write_atomic(self.metrics_path, lambda tmp: pq.write_table(table, tmp))

    def log_events(self, round: int, events: Iterable[tuple[int | None, str, str]]) -> None:
        """Append ``(client_id, kind, reason)`` events of ``round`` to ``events.jsonl``.

        Validated first, then the file is rewritten through a temporary file, like the metrics:
        a kill never leaves half a line.
        """
        lines = [_event_line(round, *event) for event in events]
        if lines:
            text = "".join(json.dumps(e) + "\n" for e in [*self.events(), *lines])
            write_atomic(self.events_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def events(self) -> list[dict[str, Any]]:
        """Every event logged so far, in order; empty when there were none."""
        path = self.events_path
        if not path.exists():
            return []
        events = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                event = json.loads(line)
                events.append(
                    _event_line(event["round"], event["client_id"], event["kind"], event["reason"])
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise RunFileError(f"events file {path}, line {number}: {exc}") from exc
        return events

    def truncate_after(self, round: int) -> None:
        """Drop the metrics and events of rounds after ``round``: what a resumed run will redo."""
        table = self._read_metrics()
        kept = table.filter(pc.less_equal(table["round"], round))
        if kept.num_rows != table.num_rows:
            write_atomic(self.metrics_path, lambda tmp: pq.write_table(kept, tmp))
        self._table = kept
        events = self.events()
        later = [e for e in events if e["round"] > round]
        if later:
            text = "".join(json.dumps(e) + "\n" for e in events if e["round"] <= round)
            write_atomic(self.events_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        placements = self.placements()
        if any(p["round"] > round for p in placements):
            text = "".join(json.dumps(p) + "\n" for p in placements if p["round"] <= round)
            write_atomic(self.placement_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def log_placement(self, round: int, records: Iterable[Mapping[str, Any]]) -> None:
        """Append where each actor and client of ``round`` ran to ``placement.jsonl``.

        A record has ``role`` (``PLACEMENT_ROLES``), ``client_id`` (None for the server actors)
        and string fields such as ``node_id``, ``hostname``, ``device`` and ``gpu``. Node ids are
        text, which the float ``value`` column of ``metrics.parquet`` cannot hold.
        """
        lines = [_placement_line(round, record) for record in records]
        if lines:
            text = "".join(json.dumps(p) + "\n" for p in [*self.placements(), *lines])
            write_atomic(self.placement_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def placements(self) -> list[dict[str, Any]]:
        """Every placement record logged so far, in order; empty when there were none."""
        path = self.placement_path
        if not path.exists():
            return []
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
                records.append(_placement_line(record.pop("round"), record))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise RunFileError(f"placement file {path}, line {number}: {exc}") from exc
        return records

    def metrics(self) -> pa.Table:
        """All rows logged so far (schema ``METRICS_SCHEMA``); empty before the first round."""
        return self._table if self._table is not None else self._read_metrics()

    def server_curve(self, metric: str = "accuracy") -> list[tuple[int, float]]:
        """``(round, value)`` of a server metric, sorted by round (the last row wins per round)."""
        return sorted(_series(self.metrics(), "server", metric).items())

    def save_model(
        self, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> None:
        """Write a state dict as safetensors (contiguous CPU copies), atomically.

        Tensors sharing storage (tied weights) are refused by safetensors: pass one of them.
        """
        if metadata is not None:
            bad = [
                k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))
            ]
            if bad:
                raise TypeError(f"model metadata must map str to str; bad entries: {bad}")
        tensors = {key: t.detach().cpu().contiguous() for key, t in state.items()}
        with os_errors_of(
            self.model_path
        ):  # a full disk is an OSError naming the file, not a SafetensorError
            write_atomic(
                self.model_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata)
            )

    def load_model(self) -> dict[str, torch.Tensor]:
        """The saved state dict, on CPU (safetensors: no pickle, nothing executed)."""
        return self._read_safetensors(lambda p: load_file(str(p)))

    def model_metadata(self) -> dict[str, str]:
        """The metadata saved with the model (empty when none was given)."""

        def read(p: Path) -> dict[str, str]:
            with safe_open(str(p), framework="pt") as f:
                return dict(f.metadata() or {})

        return self._read_safetensors(read)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary`` as indented JSON (e.g. the dict from ``summarize``)."""
        text = json.dumps(summary, indent=2) + "\n"
        write_atomic(self.summary_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def read_summary(self) -> dict[str, Any]:
        path = _existing(self.summary_path, "summary")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunFileError(f"cannot read summary {path}: {exc}") from exc

    def _read_metrics(self) -> pa.Table:
        path = self.metrics_path
        if not path.exists():
            return METRICS_SCHEMA.empty_table()
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise RunFileError(f"cannot read metrics file {path}: {exc}") from exc
        if not table.schema.equals(METRICS_SCHEMA):
            raise RunFileError(
                f"metrics file {path} has schema\n{table.schema}\nexpected\n{METRICS_SCHEMA}"
            )
        return table

    def _read_safetensors(self, read: Callable[[Path], Any]) -> Any:
        path = _existing(self.model_path, "model")
        try:
            return read(path)
        except SafetensorError as exc:
            raise RunFileError(f"cannot read model file {path}: {exc}") from exc


def plot_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str = "test accuracy",
) -> None:
    """Plot one line per label (``(round, value)`` points, with markers) and save it to ``path``.

    Serves one run's accuracy plot and the ``compare`` overlay. It draws on a bare ``Figure``
    (Agg), so it neither needs a display nor touches pyplot's global state.
    """
    path = Path(path)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, points in curves.items():
        points = sorted(points)
        ax.plot(
            [r for r, _ in points], [v for _, v in points], marker="o", markersize=4, label=label
        )
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    fmt = path.suffix.lstrip(".") or "png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width text table: floats to 4 decimals, numeric columns right-aligned, ``-`` for None."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(headers)} headers")
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        all(row[i] is None or _is_number(row[i]) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def summarize(run: RunDir) -> dict[str, Any]:
    """The headline numbers of a run, from its metrics; None where a metric was never logged.

    ``rounds_completed`` is the last round logged (round 0, Flower's evaluation of the initial
    model, does not count as one); ``wall_time_s`` sums the system ``round_time_s`` rows.
    """
    table = run.metrics()
    accuracy = _series(table, "server", "accuracy")
    loss = _series(table, "server", "loss")
    round_times = _series(table, "system", "round_time_s")
    valid = {r: v for r, v in accuracy.items() if not math.isnan(v)}
    best_round = max(valid, key=lambda r: (valid[r], -r)) if valid else None
    rounds = table.column("round")
    return {
        "run": run.path.name,
        "rounds_completed": pc.max(rounds).as_py() if len(rounds) else 0,
        "final_accuracy": accuracy[max(accuracy)] if accuracy else None,
        "final_loss": loss[max(loss)] if loss else None,
        "best_accuracy": valid[best_round] if best_round is not None else None,
        "best_round": best_round,
        "wall_time_s": sum(round_times.values()) if round_times else None,
    }


def format_run_report(run: RunDir) -> str:
    """A per-round table (server metrics, clients aggregated, round time) and the summary lines."""
    table = run.metrics()
    server = sorted(
        {m for s, m in _keys(table) if s == "server"},
        key=lambda m: ({"accuracy": 0, "loss": 1}.get(m, 2), m),
    )
    columns = [(m, _series(table, "server", m)) for m in server]
    clients = {r: _int_if_whole(v) for r, v in _series(table, "aggregator", "num_clients").items()}
    round_time = _series(table, "system", "round_time_s")
    columns += [(h, s) for h, s in [("clients", clients), ("round time s", round_time)] if s]
    rounds = sorted({r for _, series in columns for r in series})
    rows = [[r, *(series.get(r) for _, series in columns)] for r in rounds]
    summary = summarize(run)
    lines = [
        f"run {run.path}",
        "",
        format_table(["round", *(h for h, _ in columns)], rows),
        "",
        f"rounds completed: {summary['rounds_completed']}",
        f"final accuracy:   {_fmt(summary['final_accuracy'])}",
        f"best accuracy:    {_fmt(summary['best_accuracy'])}"
        + (f" (round {summary['best_round']})" if summary["best_round"] is not None else ""),
        f"final loss:       {_fmt(summary['final_loss'])}",
        f"wall time:        {_fmt(summary['wall_time_s'], '.1f')} s",
    ]
    return "\n".join(lines)


def compare_table(runs: Mapping[str, RunDir]) -> str:
    """One row per labelled run: final and best accuracy, best round, final loss, wall time."""
    headers = [
        "run",
        "rounds",
        "final accuracy",
        "best accuracy",
        "best round",
        "final loss",
        "wall time s",
    ]
    rows = []
    for label, run in runs.items():
        s = summarize(run)
        rows.append(
            [
                label,
                s["rounds_completed"],
                s["final_accuracy"],
                s["best_accuracy"],
                s["best_round"],
                s["final_loss"],
                s["wall_time_s"],
            ]
        )
    return format_table(headers, rows)


def _rows_to_table(round: int, rows: Iterable[tuple[str, int | None, str, float]]) -> pa.Table:
    """Validate one round's rows and make them a table, so a bad row never reaches the file."""
    if (
        not isinstance(round, numbers.Integral)
        or isinstance(round, bool)
        or not 0 <= round <= _INT32_MAX
    ):
        raise ValueError(f"round must be a non-negative int32, got {round!r}")
    scopes, clients, metrics, values = [], [], [], []
    for row in rows:
        if len(row) != 4:
            raise ValueError(
                f"round {round}: a row is (scope, client_id, metric, value), got {row!r}"
            )
        scope, client_id, metric, value = row
        if scope not in SCOPES:
            raise ValueError(f"round {round}: scope {scope!r} is not one of {sorted(SCOPES)}")
        if client_id is not None and (
            not isinstance(client_id, numbers.Integral)
            or isinstance(client_id, bool)
            or not 0 <= client_id <= _INT32_MAX
        ):
            raise ValueError(
                f"round {round}: client_id must be None or a non-negative int32, "
                f"got {client_id!r} for {metric!r}"
            )
        if not isinstance(metric, str) or not metric:
            raise ValueError(
                f"round {round}: metric name must be a non-empty string, got {metric!r}"
            )
        if not _is_number(value):
            raise ValueError(
                f"round {round}: value of {scope} {metric!r} must be a number, got {value!r}"
            )
        scopes.append(scope)
        clients.append(None if client_id is None else int(client_id))
        metrics.append(metric)
        values.append(float(value))
    return pa.table(
        {
            "round": [int(round)] * len(scopes),
            "scope": scopes,
            "client_id": clients,
            "metric": metrics,
            "value": values,
        },
        schema=METRICS_SCHEMA,
    )


def _event_line(round: int, client_id: int | None, kind: str, reason: str) -> dict[str, Any]:
    """One event as a JSON-able dict, or ValueError saying which field is wrong."""
    if (
        not isinstance(round, numbers.Integral)
        or isinstance(round, bool)
        or not 0 <= round <= _INT32_MAX
    ):
        raise ValueError(f"event round must be a non-negative int32, got {round!r}")
    if client_id is not None and (
        not isinstance(client_id, numbers.Integral) or isinstance(client_id, bool)
    ):
        raise ValueError(
            f"round {round}: event client_id must be None or an int, got {client_id!r}"
        )
    if kind not in EVENT_KINDS:
        raise ValueError(f"round {round}: event kind {kind!r} is not one of {sorted(EVENT_KINDS)}")
    if not isinstance(reason, str):
        raise ValueError(f"round {round}: event reason must be a string, got {reason!r}")
    return {
        "round": int(round),
        "client_id": None if client_id is None else int(client_id),
        "kind": kind,
        "reason": reason,
    }


def _placement_line(round: int, record: Mapping[str, Any]) -> dict[str, Any]:
    """One placement record as a JSON-able dict, or ValueError saying which field is wrong."""
    if (
        not isinstance(round, numbers.Integral)
        or isinstance(round, bool)
        or not 0 <= round <= _INT32_MAX
    ):
        raise ValueError(f"placement round must be a non-negative int32, got {round!r}")
    role, client_id = record.get("role"), record.get("client_id")
    if role not in PLACEMENT_ROLES:
        raise ValueError(
            f"round {round}: placement role {role!r} is not one of {sorted(PLACEMENT_ROLES)}"
        )
    if client_id is not None and (
        not isinstance(client_id, numbers.Integral) or isinstance(client_id, bool)
    ):
        raise ValueError(
            f"round {round}: placement client_id must be None or an int, got {client_id!r}"
        )
    fields = {k: v for k, v in record.items() if k not in ("role", "client_id")}
    bad = sorted(k for k, v in fields.items() if not (isinstance(k, str) and isinstance(v, str)))
    if bad:
        raise ValueError(f"round {round}: placement fields {bad} of {role} must be strings")
    return {
        "round": int(round),
        "role": role,
        "client_id": None if client_id is None else int(client_id),
        **fields,
    }


def _series(table: pa.Table, scope: str, metric: str) -> dict[int, float]:
    """``{round: value}`` of the non-per-client rows of one scope and metric; last row wins."""
    mask = pc.and_(
        pc.and_(pc.equal(table["scope"], scope), pc.equal(table["metric"], metric)),
        pc.is_null(table["client_id"]),
    )
    picked = table.filter(mask)
    return dict(zip(picked["round"].to_pylist(), picked["value"].to_pylist()))


def _keys(table: pa.Table) -> set[tuple[str, str]]:
    """The distinct (scope, metric) pairs of the non-per-client rows."""
    shared = table.filter(pc.is_null(table["client_id"]))
    return set(zip(shared["scope"].to_pylist(), shared["metric"].to_pylist()))


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"no {what} in this run: {path} does not exist")
    return path


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_if_whole(value: float) -> float | int:
    """Counts are stored as float64; show 5, not 5.0000."""
    return int(value) if value.is_integer() else value


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return f"{float(value):.4f}"
    return str(value)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)
