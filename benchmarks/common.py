"""What every benchmark shares: machine facts, memory probes, worker subprocesses, tables.

Memory is read from Linux's own accounting: ``ru_maxrss`` (``getrusage``) for the calling
process and ``VmHWM`` ("high water mark", the peak resident set) from ``/proc/<pid>/status`` for
another live process, e.g. a Ray actor. Both count every resident page, shared memory included,
so summing the driver and an actor counts the Ray object-store pages they both touched twice:
a sum is an upper bound. ``PrivatePeak`` separates the two: it samples ``RssAnon``, the pages
a process holds privately (heap, NumPy and torch buffers), which leaves out shared memory such as
the object store (``RssShmem``) and mapped files such as shared libraries.

A measurement whose peak memory matters runs in a fresh Python process (``run_worker``): the
parent stays light (it imports neither torch, flwr nor ray) and reads one JSON result line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ROOT",
    "PrivatePeak",
    "ProcessPeaks",
    "WorkerError",
    "add_json_flag",
    "emit_result",
    "find_pids",
    "format_machine",
    "machine_info",
    "markdown_table",
    "mem_available_gb",
    "peak_rss_mb",
    "proc_peak_mb",
    "quiet_env",
    "run_worker",
    "write_json",
]

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH-RESULT "


class WorkerError(RuntimeError):
    """A benchmark subprocess failed; the message carries the end of its output."""


# ---- environment and machine --------------------------------------------------------------


def quiet_env(home: Path | None = None) -> None:
    """Offline, quiet Flower and Ray; Flower's state under ``home`` when given."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FEDMERGE_DATA_DIR", str(ROOT / "data"))
    if home is not None:
        os.environ.setdefault("FLWR_HOME", str(home / "flwr"))


def _meminfo_kb(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mem_available_gb() -> float:
    """Memory the kernel could hand out now without swapping (MemAvailable), in GB."""
    return _meminfo_kb("MemAvailable") * 1024 / 1e9


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    """A package's version without importing it (the parent process stays light)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare numbers across machines (and to see a busy one)."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": round(_meminfo_kb("MemTotal") * 1024 / 1e9, 1),
        "available_gb": round(mem_available_gb(), 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "flwr": _version("flwr"),
        "ray": _version("ray"),
        "numpy": _version("numpy"),
        "platform": platform.platform(),
    }


def format_machine(info: Mapping[str, Any]) -> str:
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM "
        f"({info['available_gb']} GB available, load {info['load_avg_1m']}); "
        f"python {info['python']}, torch {info['torch']}, flwr {info['flwr']}, ray {info['ray']}, "
        f"numpy {info['numpy']}; {info['platform']}"
    )


# ---- memory probes ------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set of the calling process so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def _status_kb(pid: int, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def proc_peak_mb(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a live process, in MB; None once it is gone."""
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb * 1024 / 1e6


def rss_mb(pid: int | None = None) -> float:
    """Current resident set of a process (default: this one), in MB."""
    kb = _status_kb(os.getpid() if pid is None else pid, "VmRSS")
    return 0.0 if kb is None else kb * 1024 / 1e6


def find_pids(prefix: str) -> list[int]:
    """Processes whose command line starts with ``prefix`` (Ray titles actors ``ray::Class``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(prefix):
            pids.append(int(entry.name))
    return pids


class ProcessPeaks:
    """The largest VmHWM seen per role, for processes found by command-line prefix.

    VmHWM is a peak since the process started, so sampling a live actor once after its busiest
    moment (e.g. after each round) gives its true peak; ``sample`` is cheap enough to call often.
    """

    def __init__(self, prefixes: Mapping[str, str]) -> None:
        self.prefixes = dict(prefixes)
        self.peaks: dict[str, float] = {role: 0.0 for role in prefixes}
        self.counts: dict[str, int] = {role: 0 for role in prefixes}

    def sample(self) -> None:
        for role, prefix in self.prefixes.items():
            pids = find_pids(prefix)
            self.counts[role] = max(self.counts[role], len(pids))
            for pid in pids:
                self.peaks[role] = max(self.peaks[role], proc_peak_mb(pid) or 0.0)


class PrivatePeak:
    """Peak of the summed private resident memory (``RssAnon``) of some processes, sampled on a
    background thread every ``interval`` seconds between ``start()`` and ``stop()``, in MB.

    Linux keeps no high-water mark for ``RssAnon``, so this is a sampled peak: a spike shorter
    than ``interval`` can be missed. Use it as a lower bound beside ``VmHWM``'s upper bound.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.01) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="private-peak", daemon=True)

    def now_mb(self) -> float:
        return sum(_status_kb(pid, "RssAnon") or 0 for pid in self.pids) * 1024 / 1e6

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def start(self) -> PrivatePeak:
        self.start_mb = self.peak_mb = self.now_mb()
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.now_mb())
        return self.peak_mb


# ---- worker subprocesses ------------------------------------------------------------------


def add_worker_flag(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--worker SPEC`` flag with which ``run_worker`` starts a benchmark's measurement."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``: every figure of the run, unrounded, for a program (or a test) to read: the
    printed tables round, and a rounded time of a fast machine reads 0.00."""
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write every measured figure, unrounded, as JSON to PATH",
    )


def write_json(path: Path | None, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` as JSON (nothing when ``path`` is None)."""
    if path is not None:
        path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def add_address_flag(parser: argparse.ArgumentParser) -> None:
    """``--address``: a running Ray cluster every run of the benchmark attaches to."""
    parser.add_argument(
        "--address",
        default="",
        help="Ray cluster both systems attach to (default: a local Ray "
        "started and stopped by each run, included in its times)",
    )


def address_override(address: str) -> list[str]:
    """``ray.address`` for every run of a benchmark attached to a running cluster (none for a local Ray)."""
    return [f"ray.address={address!r}"] if address else []


def ran_as_worker(args: argparse.Namespace, worker: Callable[[Mapping[str, Any]], None]) -> bool:
    """Run ``worker`` on the JSON spec of ``--worker`` when the process was started as one."""
    if not args.worker:
        return False
    worker(json.loads(args.worker))
    return True


def emit_result(result: Mapping[str, Any]) -> None:
    """A worker's answer: one tagged JSON line on stdout (anything else there is ignored)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_worker(module: str, spec: Mapping[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m <module> --worker <spec>`` in a fresh process; return its JSON result."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise WorkerError(f"{module} worker {spec} ran past {timeout:.0f}s") from err
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            result.setdefault("process_s", time.perf_counter() - started)
            return result
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise WorkerError(f"{module} worker {spec} exited {proc.returncode} without a result:\n{tail}")


# ---- output -------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-Markdown table (readable as plain text too); first column left, others right."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)
