"""Faults of the machine and of the input that used to end in a traceback (issue 19, item 7): a
read-only run folder, a full disk, a run name too long for the file system, a non-UTF-8
experiment file, an output root that is a file, a huge config value, an unreachable Ray address.
Each is now one ``fedmerge: error:`` line naming the file (or value, or address) and the fix,
with exit status 2 and no run folder left behind where none was needed."""

from __future__ import annotations

import difflib
import errno
import os
import pathlib
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from fedmerge.clients.partition import write_atomic
from fedmerge.federation.cli import main
from fedmerge.federation.config import MAX_NAME_BYTES, ConfigError, load_config
from fedmerge.federation.results import RunDir
from fedmerge.federation.storage import describe_os_error, os_errors_of

from .conftest import DEFAULT_EXPERIMENT, SAFETY_NET_S, digits_config, digits_overrides

ROOT = Path(__file__).resolve().parents[1]
ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"
"""What safetensors 0.x says when the disk fills up under ``save_file`` (seen on a 64 KiB tmpfs)."""


def cli(*argv: str) -> list[str]:
    args = ["run", str(DEFAULT_EXPERIMENT)]
    for item in argv:
        args += ["--set", item]
    return args


def one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one ``fedmerge: error:`` line, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedmerge: error: "), err
    return lines[0]


# ---- a read-only run folder -----------------------------------------------------------------


def test_write_atomic_cleanup_never_masks_the_write_error(tmp_path, monkeypatch):
    """On a read-only mount the unlink of the temporary file fails as well (EROFS: Linux checks the
    mount before it looks the name up); that second error used to be the one raised."""

    def read_only_unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    def write(tmp: Path) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp))

    monkeypatch.setattr(pathlib.Path, "unlink", read_only_unlink)
    with pytest.raises(OSError) as caught:
        write_atomic(tmp_path / "metrics.parquet", write)
    assert caught.value.errno == errno.EROFS
    assert Path(caught.value.filename).name.startswith(
        ".metrics.parquet.tmp-"
    )  # the write's, not the unlink's
    assert caught.value.__context__ is None  # nothing else went wrong on the way out
    message = describe_os_error(caught.value)
    assert message.startswith(
        f"{tmp_path / 'metrics.parquet'}: Read-only file system; "
    )  # the real file named
    assert "read-only" in message.split("; ", 1)[1]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),  # matplotlib's file object
        OSError("Failed to write: [errno 28] No space left on device"),
    ],
)  # pyarrow's
def test_an_atomic_write_names_the_file_when_the_writer_does_not(tmp_path, error):
    """A writer that goes through a file object (the plot) reports a full disk without a file name;
    seen on a real 128 KiB tmpfs as 'fedmerge: error: No space left on device'."""

    def write(tmp: Path) -> None:
        raise error

    with pytest.raises(OSError) as caught:
        write_atomic(tmp_path / "accuracy.png", write)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(
        tmp_path / "accuracy.png"
    )
    assert describe_os_error(caught.value).startswith(
        f"{tmp_path / 'accuracy.png'}: No space left on device; "
    )


def read_only_folder(monkeypatch, folder: Path) -> None:
    """Make every write and unlink under ``folder`` fail as on a read-only mount (the tests run as
    root in places, where chmod stops nothing)."""
    real_write_text, real_unlink = pathlib.Path.write_text, pathlib.Path.unlink

    def inside(path: Path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(folder)

    def write_text(self, *args, **kwargs):
        if inside(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write_text(self, *args, **kwargs)

    def unlink(self, missing_ok=False):
        if inside(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)


def test_resume_in_a_read_only_run_folder_is_one_line(tmp_path, monkeypatch, capsys):
    run = RunDir.create(tmp_path / "runs", "ro")
    run.write_config(digits_config(tmp_path).to_toml())
    read_only_folder(monkeypatch, run.path.resolve())
    assert main(["resume", str(run.path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert (
        f"{run.path.resolve() / 'events.jsonl'}: Read-only file system" in line
        or f"{run.path / 'events.jsonl'}: Read-only file system" in line
    ), line
    assert "writable" in line


def test_verbose_keeps_the_traceback(tmp_path, monkeypatch, capsys):
    run = RunDir.create(tmp_path / "runs", "ro")
    run.write_config(digits_config(tmp_path).to_toml())
    read_only_folder(monkeypatch, run.path.resolve())
    assert main(["resume", str(run.path), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("fedmerge: error: ")


# ---- a full disk ----------------------------------------------------------------------------


def test_a_real_safetensors_io_failure_becomes_the_os_error_it_wraps(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes the kernel refuse the write (EFBIG) as a full disk
    refuses it (ENOSPC): a real SafetensorError, with no mount needed."""
    target = tmp_path / "model.safetensors"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(
        signal.SIGXFSZ, signal.SIG_IGN
    )  # the write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as caught, os_errors_of(target):
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(100_000)}, str(target))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(target)
    assert isinstance(caught.value.__cause__, SafetensorError)


def test_a_full_disk_while_saving_the_model_names_the_file(tmp_path, monkeypatch):
    import fedmerge.federation.results as results

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr(results, "save_file", full_disk)
    run = RunDir.create(tmp_path, "full")
    with pytest.raises(OSError) as caught:
        run.save_model({"w": torch.zeros(3)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(run.model_path)
    assert [p.name for p in run.path.iterdir()] == []  # the half-written temporary file is gone
    message = describe_os_error(caught.value)
    assert (
        message.startswith(f"{run.model_path}: No space left on device; ")
        and "disk is full" in message
    )


def test_a_full_disk_while_checkpointing_names_the_file(tmp_path, monkeypatch):
    import numpy as np

    import fedmerge.federation.checkpoint as checkpoint

    def full_disk(tensors, filename, metadata=None):
        raise SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr(checkpoint, "save_numpy", full_disk)
    with pytest.raises(OSError) as caught:
        checkpoint.save_checkpoint(tmp_path, 1, 0, {"w": np.zeros(3, np.float32)}, {})
    assert caught.value.errno == errno.ENOSPC
    assert Path(caught.value.filename).parent.name == "round_00001"


def test_other_safetensors_errors_stay_what_they_are(tmp_path):
    with pytest.raises(SafetensorError), os_errors_of(tmp_path / "x"):
        raise SafetensorError("Error while serializing: tensor is not contiguous")


# ---- a run name too long for the file system ------------------------------------------------


def test_a_run_name_too_long_for_a_folder_is_a_config_error(tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(cli(*digits_overrides(tmp_path), "name=" + "n" * 240)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert (
        "name =" in line
        and "240 bytes" in line
        and str(MAX_NAME_BYTES) in line
        and "shorter" in line
    )
    assert not root.exists()
    load_config(DEFAULT_EXPERIMENT, ["name=" + "n" * MAX_NAME_BYTES])  # the limit itself is fine
    with pytest.raises(ConfigError, match="bytes long"):  # bytes, not characters: é is two
        load_config(DEFAULT_EXPERIMENT, ["name=" + "é" * (MAX_NAME_BYTES // 2 + 1)])


def test_a_folder_name_the_file_system_refuses_is_one_line(tmp_path):
    with pytest.raises(OSError) as caught:  # e.g. compare's <name>-<aggregator path> variants
        RunDir.create(tmp_path, "x" * 250)
    assert caught.value.errno == errno.ENAMETOOLONG
    message = describe_os_error(caught.value)
    assert (
        "File name too long; " in message and "shorter run name" in message and len(message) < 400
    )


# ---- a non-UTF-8 experiment file -------------------------------------------------------------


def test_a_non_utf8_experiment_file_names_the_file_and_the_byte(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and "byte 11 (0xe9)" in str(caught.value)
    assert main(["run", str(path)]) == 2
    assert "UTF-8" in one_error_line(capsys.readouterr().err)


# ---- an output root that is a file ------------------------------------------------------------


def test_an_output_root_that_is_a_file_is_one_line(tmp_path, capsys):
    root = tmp_path / "runs"
    root.write_text("not a folder")
    assert main(cli(*digits_overrides(tmp_path), f"output.root={str(root)!r}")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(root) in line and "is a file" in line
    assert root.read_text() == "not a folder"


def test_an_output_root_below_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" / "runs"
    assert main(cli(*digits_overrides(tmp_path), f"output.root={str(root)!r}")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(root) in line and "not a folder" in line


# ---- a huge config value ---------------------------------------------------------------------

HUGE = 20 * 2**20  # 20 MB: the 100 MB of the report, smaller, the effect the same


@pytest.mark.parametrize(
    "override",
    [
        "name=" + "n" * HUGE,  # too long a name
        "data.task=" + "t" * HUGE,  # not one of the choices: used to search for a close one
        "aggregator.name=" + "a" * HUGE,  # the registry's own search
        "x" * HUGE + "=1",  # an unknown key: its search
        "data.partitioner='" + "p" * HUGE + "'",
    ],
)
def test_a_huge_value_is_cut_in_the_message_and_never_searched(
    override, tmp_path, monkeypatch, capsys
):
    searched: list[int] = []
    real = difflib.get_close_matches

    def spy(word, possibilities, *args, **kwargs):
        searched.append(len(word))
        return real(word, possibilities, *args, **kwargs)

    monkeypatch.setattr(difflib, "get_close_matches", spy)
    assert main(cli(f"output.root={str(tmp_path / 'runs')!r}", override)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert len(line) < 1000 and "characters)" in line, line[:2000]
    assert all(n <= 100 for n in searched), searched  # difflib's cost is the product of the lengths
    assert not (tmp_path / "runs").exists()


# ---- an unreachable Ray address --------------------------------------------------------------


def test_an_unreachable_address_fails_at_once_naming_it_and_makes_no_folder(tmp_path):
    root = tmp_path / "runs"
    args = [
        sys.executable,
        "-m",
        "fedmerge",
        *cli(*digits_overrides(tmp_path)),
        "--address",
        "127.0.0.1:1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The timeout only keeps a regression (Ray retrying for minutes) from hanging the suite.
    proc = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SAFETY_NET_S
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "'127.0.0.1:1'" in line and "cannot reach the Ray cluster" in line
    assert not root.exists() or not any(root.iterdir())


def test_address_checks(monkeypatch):
    from fedmerge.federation.runner import AddressError, check_address

    for address in ("", "local", "auto", "ray://10.0.0.1:10001", "not an address"):
        check_address(address)  # left to Ray
    with pytest.raises(AddressError, match="port 70000 is not in 1..65535"):
        check_address("127.0.0.1:70000")
    with pytest.raises(AddressError, match="'127.0.0.1:1'.*Connection refused"):
        check_address("127.0.0.1:1")
    with pytest.raises(AddressError, match="is not known"):
        check_address("no-such-host.invalid:6379")


def test_a_reachable_address_passes_the_check():
    import socket

    from fedmerge.federation.runner import check_address

    with socket.create_server(("127.0.0.1", 0)) as server:
        check_address(f"127.0.0.1:{server.getsockname()[1]}")


def test_resume_with_an_unreachable_address_touches_nothing(tmp_path, capsys):
    run = RunDir.create(tmp_path / "runs", "r")
    run.write_config(digits_config(tmp_path).to_toml())
    before = sorted(p.name for p in run.path.iterdir())
    assert main(["resume", str(run.path), "--address", "127.0.0.1:1"]) == 2
    assert "127.0.0.1:1" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in run.path.iterdir()) == before  # no "resumed" event was logged


# ---- an OS error inside the run itself ---------------------------------------------------------


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_run_is_one_line(tmp_path, monkeypatch, capfd, ray_address):
    """The metrics are written by the ServerApp, inside Flower's simulation: its OSError used to
    come out wrapped in an ExperimentError traceback."""

    def full_disk(self, round, rows):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics_path))

    monkeypatch.setattr(RunDir, "log_round", full_disk)
    assert main([*cli(*digits_overrides(tmp_path)), "--address", ray_address]) == 2
    err = capfd.readouterr().err  # the file descriptor: Flower's and Ray's logs too
    # Flower's actors may log their shutdown ("Manually terminating ClientAppActor"): no traceback.
    assert "Traceback" not in err and "ExperimentError" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("fedmerge: error: ")]
    assert "metrics.parquet: No space left on device; " in line and "disk is full" in line, line


def test_a_full_disk_under_a_checkpoints_json_names_the_checkpoint(tmp_path, monkeypatch):
    """Seen on a real 40 KiB tmpfs: the checkpoint's JSON files hit ENOSPC in write(), which names
    no file, and the run ended in 'fedmerge: error: No space left on device'."""
    import numpy as np

    import fedmerge.federation.checkpoint as checkpoint

    real_write_text = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(OSError) as caught:
        checkpoint.save_checkpoint(tmp_path, 3, 0, {"w": np.zeros(3, np.float32)}, {})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(
        tmp_path / "round_00003"
    )
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint folder is gone
