"""The ``fedmerge`` command: run | resume | compare | sweep | report | partition | list."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmerge", description="Federated model merging on Flower + Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def experiment_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", type=Path, help="experiment TOML file (see experiments/)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override a config value, e.g. --set aggregator.name=fedavg (repeatable)",
        )

    p = sub.add_parser("run", help="run one federated experiment")
    experiment_args(p)
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to attach to (default: $RAY_ADDRESS or a local Ray)",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")

    p = sub.add_parser(
        "resume", help="continue a stopped run from its newest checkpoint, in its own folder"
    )
    p.add_argument(
        "run_dir", type=Path, help="the run's folder (it holds config.toml and checkpoints/)"
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to attach to (default: $RAY_ADDRESS or a local Ray)",
    )
    p.add_argument("--verbose", action="store_true", help="show Flower's own log")

    p = sub.add_parser("compare", help="run the same experiment with several aggregators")
    experiment_args(p)
    p.add_argument("--aggregators", required=True, help="comma-separated names, e.g. fedavg,wsa")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to attach to (default: $RAY_ADDRESS or a local Ray)",
    )

    p = sub.add_parser(
        "sweep", help="run methods x settings x seeds from a sweep file; mean ± std table and plots"
    )
    p.add_argument(
        "sweep",
        type=Path,
        help="sweep TOML file (see federation/sweep.py, experiments/*sweep*.toml)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for results.jsonl, summary.md, plots and runs",
    )
    p.add_argument("--seeds", default=None, help="comma-separated subset of the sweep's seeds")
    p.add_argument("--methods", default=None, help="comma-separated subset of the sweep's methods")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only settings whose axis KEY has VALUE (TOML literal; repeatable)",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only rewrite summary.md and plots from results.jsonl",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster every run attaches to (default: $RAY_ADDRESS or a local Ray per run)",
    )

    p = sub.add_parser("report", help="re-print and re-plot a finished run")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("partition", help="print per-client label counts and save a heat-map PNG")
    experiment_args(p)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG path (default: <output.root>/<name>-partition.png)",
    )

    p = sub.add_parser("list", help="list aggregators, tasks and partitioners")
    p.add_argument(
        "--fields", action="store_true", help="also list every config field with its default"
    )
    p.add_argument(
        "--aggregator",
        default=None,
        metavar="NAME",
        help="list one aggregator's hyperparameters: type, default, allowed values, meaning",
    )
    p.add_argument(
        "--attack",
        default=None,
        metavar="KIND",
        help="list the [attack] parameters a kind reads (see attack.kind)",
    )
    p.add_argument(
        "--task",
        default=None,
        metavar="NAME",
        help="list one task's parameters ([data.task_params] keys): type, default, meaning",
    )
    p.add_argument(
        "--plugins",
        default="",
        metavar="MODULES",
        help="comma-separated modules or .py files to import first (as [run] plugins), so the "
        "names they register are listed",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fedmerge.clients.tasks.base import DataError
    from fedmerge.federation.config import ConfigError
    from fedmerge.federation.results import RunFileError

    try:
        return _dispatch(args)
    except (ConfigError, DataError, RunFileError) as err:
        return _fail(str(err), args)
    except OSError as err:
        # A file the run cannot read or write (read-only folder, full disk, a name too long): one
        # line naming the file and the fix. Our own FileNotFoundError / NotADirectoryError carry a
        # sentence and no errno.
        from fedmerge.federation.storage import describe_os_error

        return _fail(str(err) if err.errno is None else describe_os_error(err), args)


MAX_ERROR_CHARS = 2000
"""An error message is cut to this many characters: it may quote a user's value, and a 100 MB
``--set`` value must not be echoed whole."""


def _fail(message: str, args: argparse.Namespace) -> int:
    """Print one ``fedmerge: error:`` line (the traceback too with ``--verbose``); exit status 2."""
    if getattr(args, "verbose", False):
        import traceback

        traceback.print_exc()
    if len(message) > MAX_ERROR_CHARS:
        message = f"{message[:MAX_ERROR_CHARS]}... ({len(message):,} characters)"
    print(f"fedmerge: error: {message}", file=sys.stderr)
    return 2


def _dispatch(args: argparse.Namespace) -> int:
    from fedmerge.federation.config import ConfigError, load_config

    if args.command == "list":
        from fedmerge.plugins import PluginError, import_plugins

        try:
            import_plugins([p.strip() for p in args.plugins.split(",") if p.strip()])
        except PluginError as err:
            raise ConfigError(str(err)) from None
        if args.aggregator is not None or args.attack is not None or args.task is not None:
            return _list_params(args.aggregator, args.attack, args.task)
        return _list(args.fields)
    if args.command == "report":
        from fedmerge.federation.results import RunDir, format_run_report, plot_curves

        run = RunDir(args.run_dir)
        print(format_run_report(run))
        plot_curves(
            {run.path.name: run.server_curve("accuracy")},
            run.plot_path,
            title=f"{run.path.name}: test accuracy",
        )
        print(f"plot: {run.plot_path}")
        return 0
    if args.command == "sweep":
        import tomllib

        from fedmerge.federation.config import ConfigError
        from fedmerge.federation.sweep import load_sweep, run_sweep, summarize_sweep

        sweep = load_sweep(args.sweep)
        if args.summary_only:
            path = summarize_sweep(sweep, args.out)
        else:
            only = {}
            for item in args.only:
                key, _, value = item.partition("=")
                try:
                    only[key.strip()] = tomllib.loads(f"v = {value}")["v"]
                except tomllib.TOMLDecodeError:
                    raise ConfigError(
                        f"--only {item[:80]!r}: the value must be a TOML literal"
                    ) from None
            path = run_sweep(
                sweep,
                args.out,
                methods=args.methods.split(",") if args.methods else None,
                seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
                only=only,
                address=args.address,
            )
        print(path.read_text(encoding="utf-8"))
        print(f"summary: {path}")
        return 0
    if args.command == "resume":
        from fedmerge.federation.runner import resume_experiment

        resume_experiment(args.run_dir, address=args.address, verbose=args.verbose)
        return 0
    config = load_config(args.config, args.overrides)
    if args.command == "run":
        from fedmerge.federation.runner import run_experiment

        run_experiment(config, address=args.address, verbose=args.verbose)
    elif args.command == "compare":
        from fedmerge.federation.runner import compare

        compare(
            config,
            [a.strip() for a in args.aggregators.split(",") if a.strip()],
            address=args.address,
        )
    elif args.command == "partition":
        from fedmerge.federation.runner import partition_report

        table, png = partition_report(config, args.out)
        print(table)
        print(f"heat-map: {png}")
    return 0


def _list(fields: bool) -> int:
    from fedmerge.aggregators import available
    from fedmerge.clients.partition import available_partitioners
    from fedmerge.clients.tasks import available_tasks

    print("aggregators: ", ", ".join(available()))
    print("tasks:       ", ", ".join(available_tasks()))
    print("partitioners:", ", ".join(available_partitioners()))
    if fields:
        from fedmerge.federation.config import describe_fields
        from fedmerge.federation.results import format_table

        print()
        print(format_table(["key", "default", "meaning"], describe_fields()))
    return 0


def _list_params(aggregator: str | None, attack: str | None, task: str | None = None) -> int:
    """Print the declared parameters of an aggregator, an attack kind and/or a task, one a line."""
    from fedmerge.aggregators.params import format_specs
    from fedmerge.aggregators.registry import aggregator_params
    from fedmerge.clients.attacks import attack_params
    from fedmerge.federation.config import ConfigError

    blocks = []
    try:
        if aggregator is not None:
            blocks.append(
                (f"aggregator {aggregator!r} ([aggregator] keys)", aggregator_params(aggregator))
            )
        if attack is not None:
            blocks.append((f"attack {attack!r} ([attack] keys)", attack_params(attack)))
        if task is not None:
            from fedmerge.clients.tasks import task_params

            blocks.append((f"task {task!r} ([data.task_params] keys)", task_params(task)))
    except ValueError as err:  # an unknown name: one line with its "did you mean", exit status 2
        raise ConfigError(str(err)) from None
    for i, (title, specs) in enumerate(blocks):
        print(("\n" if i else "") + f"{title}:")
        print(format_specs(specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
