"""Where runs live on a cluster (output.root as path or file:// URI, output.upload_uri copies),
where actors and clients ran (placement.jsonl), and the placement options of actor sections."""

from __future__ import annotations

import time

import pytest

from fedmerge.federation.actors import actor_options
from fedmerge.federation.config import ActorConfig, ConfigError, parse_config
from fedmerge.federation.results import RunDir, RunFileError
from fedmerge.federation.storage import RunUploader, StorageError, local_path, uri_scheme


@pytest.mark.parametrize(
    "location, expected",
    [
        ("runs", "runs"),
        ("/shared/runs", "/shared/runs"),
        ("file:///shared/runs", "/shared/runs"),
        ("file://localhost/shared/my%20runs", "/shared/my runs"),
    ],
)
def test_local_paths_and_file_uris(location, expected):
    assert str(local_path(location)) == expected


@pytest.mark.parametrize("location", ["s3://bucket/runs", "file://otherhost/runs", "gs://b/r"])
def test_non_local_locations_are_refused(location):
    with pytest.raises(StorageError, match="file://"):
        local_path(location)


def test_uri_scheme_only_reads_real_schemes():
    assert (uri_scheme("S3://b/k"), uri_scheme("/a://b"), uri_scheme("runs")) == ("s3", "", "")


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"output": {"root": "s3://bucket/runs"}}, "output.root"),
        ({"output": {"root": "file://host/runs"}}, "output.root"),
        ({"output": {"upload_uri": "ftp://host/runs"}}, "output.upload_uri"),
        ({"output": {"upload_uri": "/no/scheme"}}, "output.upload_uri"),
        (
            {"ray": {"aggregator": {"scheduling_strategy": "spread"}}},
            "ray.aggregator.scheduling_strategy",
        ),
        (
            {"ray": {"evaluator": {"label_selector": {"bad key!": "x"}}}},
            "ray.evaluator.label_selector.bad key!",
        ),
        (
            {"ray": {"evaluator": {"label_selector": {"role": 1}}}},
            "ray.evaluator.label_selector.role",
        ),
    ],
)
def test_bad_storage_and_placement_settings_are_named(raw, key):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value)


def test_file_uri_root_and_placement_options_are_accepted():
    config = parse_config(
        {
            "output": {"root": "file:///shared/runs", "upload_uri": "s3://bucket/runs"},
            "ray": {
                "aggregator": {
                    "label_selector": {"fedmerge-role": "in(aggregator,gpu)"},
                    "scheduling_strategy": "SPREAD",
                }
            },
        }
    )
    assert str(config.output.root_path) == "/shared/runs"
    options = actor_options(config.ray.aggregator)
    assert options["label_selector"] == {"fedmerge-role": "in(aggregator,gpu)"}
    assert options["scheduling_strategy"] == "SPREAD"
    assert "label_selector" not in actor_options(ActorConfig())
    assert "scheduling_strategy" not in actor_options(ActorConfig())


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_uploader_copies_what_changed_and_drops_what_went(tmp_path):
    run = RunDir.create(tmp_path / "runs", "up")
    run.log_round(1, [("server", None, "accuracy", 0.5)])
    (run.path / "checkpoints" / "round_00001").mkdir(parents=True)
    (run.path / "checkpoints" / "round_00001" / "global.safetensors").write_bytes(b"w1")
    (run.path / ".metrics.parquet.tmp").write_bytes(b"half-written")
    uploader = RunUploader(run.path, f"file://{tmp_path}/mirror")
    copy = tmp_path / "mirror" / run.path.name

    assert uploader.sync() == 2
    assert _files(copy) == {k: v for k, v in _files(run.path).items() if not k.startswith(".")}
    assert uploader.sync() == 0  # nothing changed, nothing copied

    time.sleep(0.01)
    run.log_round(2, [("server", None, "accuracy", 0.6)])
    (run.path / "checkpoints" / "round_00001" / "global.safetensors").unlink()
    (run.path / "checkpoints" / "round_00001").rmdir()
    assert uploader.sync() == 1
    assert not (copy / "checkpoints" / "round_00001").exists()
    assert (copy / "metrics.parquet").read_bytes() == run.metrics_path.read_bytes()
    assert RunDir(copy).server_curve() == [(1, 0.5), (2, 0.6)]


def test_uploader_reaches_non_local_file_systems(tmp_path):
    run = RunDir.create(tmp_path / "runs", "mock")
    run.log_round(1, [("server", None, "accuracy", 0.5)])
    uploader = RunUploader(run.path, "mock:///bucket/runs")  # pyarrow's in-memory file system
    uploader.sync()
    assert uploader.listing() == {"metrics.parquet": run.metrics_path.stat().st_size}


def test_placement_records_round_trip_and_truncate(tmp_path):
    run = RunDir.create(tmp_path, "placed")
    run.log_placement(
        1,
        [
            {"role": "aggregator", "client_id": None, "node_id": "a", "device": "cpu"},
            {"role": "client", "client_id": 3, "node_id": "b"},
        ],
    )
    run.log_placement(
        2, [{"role": "aggregator", "client_id": None, "node_id": "c", "device": "cuda"}]
    )
    assert [(p["round"], p["role"], p["client_id"], p["node_id"]) for p in run.placements()] == [
        (1, "aggregator", None, "a"),
        (1, "client", 3, "b"),
        (2, "aggregator", None, "c"),
    ]
    run.truncate_after(1)
    assert [p["round"] for p in run.placements()] == [1, 1]
    with pytest.raises(ValueError, match="role"):
        run.log_placement(3, [{"role": "driver", "client_id": None}])
    with pytest.raises(ValueError, match="strings"):
        run.log_placement(3, [{"role": "client", "client_id": 1, "node_id": 5}])
    run.placement_path.write_text('{"round": 1}\n')
    with pytest.raises(RunFileError, match="placement file"):
        run.placements()
