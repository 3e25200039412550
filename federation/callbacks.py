"""Round callbacks: what a run does when it starts, after each round and when it ends.

A callback is any object with some of the three hooks of ``RoundCallback``; a missing hook is
skipped. ``run`` is the ``fedmerge.federation.server.Experiment`` (its ``config``, ``run_dir``,
``placement``, ``progress``, and at the end ``final_state`` and ``wall_time_s``); ``report`` the
``fedmerge.federation.strategy.RoundReport`` of the round just finished.

The run's own records are callbacks too (``default_callbacks``): metrics, events, placement,
checkpoint, then, at the end, the final model, the summary and the plot. User callbacks
(``fedmerge.run(config, callbacks=[...])`` or ``run.callbacks`` in the config) come after them,
and the copy to ``output.upload_uri`` and the printed progress line after those, so what a
callback writes into the run folder is uploaded with the round.

A user callback that raises does not stop the run: the error is logged with its traceback and
recorded as a ``callback_failed`` event of the round (naming the callback and the hook), and the
run goes on. A built-in record that fails (a full disk) still fails the run.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import ray

from fedmerge.federation.checkpoint import save_checkpoint
from fedmerge.federation.config import ConfigError
from fedmerge.federation.results import format_run_report, plot_curves, summarize
from fedmerge.federation.served import build_served, save_served

if TYPE_CHECKING:
    from fedmerge.federation.server import Experiment
    from fedmerge.federation.strategy import RoundReport

__all__ = [
    "HOOKS",
    "CallbackList",
    "Checkpointer",
    "EventsLog",
    "FinalModel",
    "MetricsLog",
    "PlacementLog",
    "Plot",
    "Progress",
    "RoundCallback",
    "Summary",
    "Upload",
    "default_callbacks",
    "resolve_callback",
    "resolve_callbacks",
]

log = logging.getLogger("fedmerge")

HOOKS = ("on_run_start", "on_round_end", "on_run_end")
"""The hooks a callback may define; it needs at least one."""

SERVED_TIMEOUT_S = 120
"""How long a checkpoint waits for the served model (SMILE, WEMoE) from the object store."""


class RoundCallback(Protocol):
    """Called by a run: ``on_run_start`` once the server actors are placed, before the first round
    this process runs; ``on_round_end`` after each round's records are written; ``on_run_end``
    once the final model, summary and plot are saved. Subclass it to inherit no-op hooks, or
    define only the hooks you need on any class."""

    def on_run_start(self, run: Experiment) -> None:
        """The run is about to start its rounds (a resumed run: the rounds after its checkpoint)."""

    def on_round_end(self, report: RoundReport, run: Experiment) -> None:
        """Round ``report.round`` is done and recorded."""

    def on_run_end(self, run: Experiment) -> None:
        """The run finished all its rounds and saved its results."""


def _name(callback: Any) -> str:
    cls = type(callback)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_hooks(callback: Any, where: str) -> None:
    if isinstance(callback, type):
        raise ConfigError(
            f"{where}: {callback.__qualname__} is a class; pass an instance, "
            f"e.g. {callback.__qualname__}()"
        )
    bad = [
        hook for hook in HOOKS if hasattr(callback, hook) and not callable(getattr(callback, hook))
    ]
    if bad or not any(hasattr(callback, hook) for hook in HOOKS):
        raise ConfigError(
            f"{where}: {_name(callback)} is no round callback: it needs at least one of the "
            f"methods {', '.join(HOOKS)} (see fedmerge.RoundCallback)"
        )


def resolve_callback(path: str) -> Any:
    """The callback a ``module:attr`` path names: a class (instantiated without arguments), or an
    object with the hooks. ``ConfigError`` naming the path and ``run.callbacks`` otherwise."""
    where = f"run.callbacks entry {path!r}"
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ConfigError(f"{where} must look like 'package.module:Name'")
    try:
        module = importlib.import_module(module_name.strip())
    except Exception as err:  # noqa: BLE001 - whatever the import raised, the path is what to fix
        raise ConfigError(
            f"{where}: cannot import {module_name.strip()!r} ({type(err).__name__}: {err}); "
            "is the package installed or on PYTHONPATH?"
        ) from None
    target: Any = module
    for part in attr.strip().split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: {module_name.strip()!r} has no attribute {attr.strip()!r}")
        target = getattr(target, part)
    if isinstance(target, type):
        try:
            target = target()
        except Exception as err:  # noqa: BLE001
            raise ConfigError(
                f"{where}: {attr.strip()}() failed ({type(err).__name__}: {err}); a callback "
                "named in the config is built without arguments"
            ) from None
    _check_hooks(target, where)
    return target


def resolve_callbacks(paths: Iterable[str], given: Sequence[Any] = ()) -> list[Any]:
    """The user's callbacks: those ``given`` (``fedmerge.run(callbacks=...)``) then those the config
    names, each checked to have a hook; a ``ConfigError`` names the bad one."""
    out = []
    for i, callback in enumerate(given):
        _check_hooks(callback, f"callbacks[{i}]")
        out.append(callback)
    return out + [resolve_callback(path) for path in paths]


class CallbackList:
    """The run's callbacks in order: ``builtin`` raise, ``user`` ones are isolated (logged, recorded
    as a ``callback_failed`` event, the run goes on); ``after`` (upload, progress) run last."""

    def __init__(self, builtin: Sequence[Any], user: Sequence[Any], after: Sequence[Any]) -> None:
        self.builtin, self.user, self.after = list(builtin), list(user), list(after)
        self.failures: list[tuple[int, str, str]] = []  # (round, callback, error) of user callbacks

    def __iter__(self):
        return iter([*self.builtin, *self.user, *self.after])

    def call(self, hook: str, run: Experiment, round: int, *args: Any) -> None:
        for callback in self.builtin:
            _hook(callback, hook)(*args, run)
        for callback in self.user:
            fn = _hook(callback, hook)
            try:
                fn(*args, run)
            except Exception as err:  # noqa: BLE001 - a user's logger must not end a long run
                reason = f"{_name(callback)}.{hook} raised {type(err).__name__}: {err}"
                log.error("round %d: callback %s\n%s", round, reason, traceback.format_exc())
                self.failures.append((round, _name(callback), reason))
                run.run_dir.log_events(round, [(None, "callback_failed", reason)])
        for callback in self.after:
            _hook(callback, hook)(*args, run)


def _hook(callback: Any, hook: str):
    fn = getattr(callback, hook, None)
    return fn if callable(fn) else (lambda *args: None)


# ---- the run's own records ---------------------------------------------------------------------


class MetricsLog(RoundCallback):
    """A round's metric rows, and whether each server actor ran on a GPU, to metrics.parquet."""

    def on_round_end(self, report: RoundReport, run: Experiment) -> None:
        from fedmerge.federation.server import report_rows

        placements = run.placement
        run.run_dir.log_round(
            report.round,
            report_rows(report)
            + [
                (
                    "system",
                    None,
                    f"{role}_on_gpu",
                    float(placements[role]["device"].startswith("cuda")),
                )
                for role in ("aggregator", "evaluator")
                if "device" in placements.get(role, {})
            ],
        )


class EventsLog(RoundCallback):
    """Why clients failed or were rejected, skipped rounds and actor restarts, to events.jsonl."""

    def on_round_end(self, report: RoundReport, run: Experiment) -> None:
        from fedmerge.federation.server import report_events

        run.run_dir.log_events(report.round, report_events(report))


class PlacementLog(RoundCallback):
    """Where the server actors and each client ran this round, to placement.jsonl."""

    def on_round_end(self, report: RoundReport, run: Experiment) -> None:
        placements = run.placement
        run.run_dir.log_placement(
            report.round,
            [
                *(
                    {"role": role, "client_id": None, **placements[role]}
                    for role in ("aggregator", "evaluator")
                ),
                *(
                    {"role": "client", "client_id": cid, **where}
                    for cid, where in sorted(report.client_placement.items())
                ),
            ],
        )


class Checkpointer(RoundCallback):
    """A checkpoint every ``checkpoint.every`` rounds and after the last, after the round's records:
    a run killed in between resumes from the previous one and redoes the round, dropping its rows
    first. It holds the resolved config (a resume refuses an edited one) and the served model."""

    def on_round_end(self, report: RoundReport, run: Experiment) -> None:
        from fedmerge.federation.server import checkpoint_due

        config, ckpt = run.config, run.config.checkpoint
        if report.state is None or not checkpoint_due(
            report.round, ckpt.every, config.federation.num_rounds
        ):
            return
        served = None if report.served is None else ray.get(report.served, timeout=SERVED_TIMEOUT_S)
        save_checkpoint(
            run.run_dir.checkpoint_dir,
            report.round,
            config.seed,
            report.state.global_state,
            report.state.aggregator_state,
            keep=ckpt.keep,
            config=config.to_dict(),
            served=served,
        )


class FinalModel(RoundCallback):
    """The final global model (and a served model) as safetensors, with output.save_model."""

    def on_run_end(self, run: Experiment) -> None:
        config = run.config
        if not config.output.save_model:
            return
        run.run_dir.save_model(
            run.final_state,
            metadata={"task": config.data.task, "aggregator": config.aggregator.name},
        )
        if run.final_served is not None:  # SMILE, WEMoE: fedmerge.federation.served.load_served
            spec, weights = run.final_served
            save_served(
                run.run_dir.path / "served_model.safetensors",
                build_served(spec, weights),
                spec["task"],
                metadata={
                    "aggregator": config.aggregator.name,
                    "params": dict(config.aggregator.params),
                },
            )


class Summary(RoundCallback):
    """summary.json: the metrics' summary, wall time, placement, aggregator, seed (and the round a
    resumed run started from)."""

    def on_run_end(self, run: Experiment) -> None:
        config = run.config
        summary = summarize(run.run_dir)
        summary.update(
            wall_time_s=run.wall_time_s,
            placement=run.placement,
            aggregator=config.aggregator.name,
            seed=config.seed,
        )
        if run.resume is not None:
            summary["resumed_from_round"] = run.resume.round
        run.run_dir.write_summary(summary)


class Plot(RoundCallback):
    """The accuracy-per-round plot, with ``output.plot``."""

    def on_run_end(self, run: Experiment) -> None:
        config = run.config
        if config.output.plot:
            plot_curves(
                {config.aggregator.name: run.run_dir.server_curve("accuracy")},
                run.run_dir.plot_path,
                title=f"{config.name}: global test accuracy per round",
            )


class Upload(RoundCallback):
    """Copy what changed in the run folder to ``output.upload_uri`` after every round (a failure is
    logged, the next round retries) and at the end (a failure raises)."""

    def on_round_end(self, report: RoundReport, run: Experiment) -> None:
        run.upload()

    def on_run_end(self, run: Experiment) -> None:
        run.upload(final=True)


class Progress(RoundCallback):
    """The printed lines: where the actors run, one line a round, the report at the end."""

    def on_run_start(self, run: Experiment) -> None:
        config = run.config
        run.progress(
            f"aggregator {config.aggregator.name!r} on {_where(run.placement['aggregator'])}, "
            f"evaluator on {_where(run.placement['evaluator'])}; "
            f"{config.data.num_clients} clients, {run.clients_per_round} a round"
        )

    def on_round_end(self, report: RoundReport, run: Experiment) -> None:
        n = run.config.federation.num_rounds
        ok, sampled = len(report.client_metrics), len(report.sampled)
        line = f"round {report.round:>3}/{n}  clients {ok}/{sampled}"
        if report.server_metrics:
            metrics = report.server_metrics
            line += f"  test acc {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}"
        if report.failures or report.rejected:
            line += f"  failed {len(report.failures)} rejected {len(report.rejected)}"
        if report.restarts:
            line += f"  actor restarts {len(report.restarts)}"
        if report.skipped:
            line += f"  SKIPPED: {report.skipped}"
        line += (
            f"  round {report.round_time_s:5.1f}s  total {time.perf_counter() - run.started:6.1f}s"
        )
        run.progress(line)

    def on_run_end(self, run: Experiment) -> None:
        run.progress(format_run_report(run.run_dir))
        run.progress(f"wall time {run.wall_time_s:.1f}s; results in {run.run_dir.path}")


def _where(placement: dict[str, str]) -> str:
    device = placement["device"] + (f" ({placement['gpu']})" if placement.get("gpu") else "")
    return f"{placement['hostname']} [{device}]"


def default_callbacks(user: Sequence[Any] = ()) -> CallbackList:
    """The run's own records, then ``user``'s callbacks, then the upload and the progress lines."""
    return CallbackList(
        builtin=[
            MetricsLog(),
            EventsLog(),
            PlacementLog(),
            Checkpointer(),
            FinalModel(),
            Summary(),
            Plot(),
        ],
        user=user,
        after=[Upload(), Progress()],
    )
