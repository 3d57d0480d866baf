"""The production path, proven from outside: inputs, outputs, models and temp on a
real GCS-protocol server; workers that cannot see the launcher's disk; kills,
injected faults, and a job graph that does not grow with the inputs."""

from __future__ import annotations

import io
import json
import os
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures import tiny_models
from fixtures.images import photo_like
from imgembed.common import storage
from imgembed.common.embedding_files import embeddings_glob, errors_glob
from imgembed.index import store
from imgembed.pipelines import embed
from tests.beam_workers import can_isolate, isolated_workers


def upload_photos(url: str, count: int, seed: int = 0) -> dict[str, bytes]:
    """``count`` JPEGs written to ``url`` through Beam's FileSystems; name -> bytes."""
    photos = {}
    for number in range(count):
        buffer = io.BytesIO()
        photo_like(seed + number, 120, 90).save(buffer, "JPEG", quality=90)
        photos[f"{number:03d}.jpg"] = buffer.getvalue()
        storage.write_bytes(storage.join(url, f"{number:03d}.jpg"), buffer.getvalue())
    return photos


def read_tables(pattern: str):
    import pyarrow as pa

    return pa.concat_tables(
        pq.read_table(io.BytesIO(storage.read_bytes(path))) for path in storage.list_files(pattern)
    )


def test_workers_that_share_nothing_with_the_launcher_embed_from_and_to_object_storage(gcs, tmp_path):
    why_not = can_isolate()
    if why_not and not os.environ.get("IMGEMBED_REQUIRE_TOOLS"):
        pytest.skip(why_not)
    inputs, output = gcs.url("isolated", "in"), gcs.url("isolated", "out")
    photos = upload_photos(inputs, 7)
    # A model file on the launcher's disk (pytest's tmp_path is under /tmp, which the
    # workers do not see): it must reach them through the output folder.
    model = tiny_models.save_tflite(str(tmp_path / "launcher_only.tflite"))
    with isolated_workers(gcs.env, gcs.credentials_json) as runner:
        summary = embed.run(
            [f"--input={inputs}/*", f"--output={output}", f"--model={model}", "--files-per-shard=3"] + runner
        )
    assert summary.balanced and summary.inputs == 7 and summary.models[0].rows == 7
    table = read_tables(embeddings_glob(storage.join(output, "launcher_only")))
    assert sorted(uri.rsplit("/", 1)[-1] for uri in table["uri"].to_pylist()) == sorted(photos)
    assert table.schema.field("embedding").type.list_size == 256
    assert len(read_tables(errors_glob(output))) == 0
    marker_files = storage.list_files(storage.join(output, "_shards", "*.json"))
    assert len(marker_files) == 3
    assert json.loads(storage.read_bytes(storage.join(output, "run_summary.json")))["balanced"]
    assert np.isfinite(np.stack(table["embedding"].to_numpy(zero_copy_only=False))).all()


IN_PROCESS = ["--runner=DirectRunner"]


def write_photos(folder, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        photo_like(seed, 80, 60).save(folder / name, "JPEG")


def test_transient_read_faults_are_retried_and_end_as_rows(tiny_model_dir, tmp_path):
    from tests.filesystems import FlakyFileSystem

    FlakyFileSystem.failed.clear()
    names = [f"{n}_flaky.jpg" if n % 3 == 0 else f"{n}.jpg" for n in range(9)]
    write_photos(tmp_path / "photos", names)
    summary = embed.run(
        [f"--input=flaky://{tmp_path}/photos/*", f"--output={tmp_path}/out", f"--model={tiny_model_dir}"]
        + ["--files-per-shard=4"]
        + IN_PROCESS
    )
    assert len(FlakyFileSystem.failed) == 3  # each flaky file failed once...
    assert summary.models[0].rows == 9 and summary.errors_total == 0 and summary.balanced  # ...and was read


def save_failing_model(path: str, failing_calls: int | None) -> str:
    """A 32x32 model whose first ``failing_calls`` calls on images raise inside
    TensorFlow (None: every call), as a model whose runtime is briefly unavailable, or
    broken. The all-zero probe that describes a model always succeeds."""
    import tensorflow as tf

    class Failing(tf.Module):
        def __init__(self):
            super().__init__()
            self.calls = tf.Variable(0, dtype=tf.int64)

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def __call__(self, images):
            probe = tf.reduce_all(tf.equal(images, 0.0))
            calls = self.calls.assign_add(tf.where(probe, tf.constant(0, tf.int64), 1))
            limit = tf.constant(-1 if failing_calls is None else failing_calls, tf.int64)
            healthy = tf.logical_or(probe, tf.logical_and(limit >= 0, calls > limit))
            with tf.control_dependencies([tf.debugging.Assert(healthy, ["the model is unavailable"])]):
                return tf.reduce_mean(images, axis=[1, 2])

    tf.saved_model.save(Failing(), path)
    return path


def test_a_model_that_fails_its_first_batches_is_retried_and_ends_as_rows(tmp_path):
    write_photos(tmp_path / "photos", [f"{n}.jpg" for n in range(5)])
    model = save_failing_model(str(tmp_path / "fails_twice"), failing_calls=2)
    summary = embed.run(
        [f"--input={tmp_path}/photos", f"--output={tmp_path}/out", f"--model={model}", "--backend=tensorflow"]
        + IN_PROCESS
    )
    assert summary.models[0].rows == 5 and summary.errors_total == 0 and summary.balanced


def test_a_broken_model_stops_the_job_and_leaves_its_shard_to_redo(tmp_path, capsys, monkeypatch):
    from imgembed.pipelines import shard_worker

    monkeypatch.setattr(shard_worker, "SHARD_RETRY_PAUSES", (0.0, 0.0))
    write_photos(tmp_path / "photos", [f"{n}.jpg" for n in range(4)])
    model = save_failing_model(str(tmp_path / "broken"), failing_calls=None)
    argv = [
        f"--input={tmp_path}/photos",
        f"--output={tmp_path}/out",
        f"--model={model}",
        "--backend=tensorflow",
    ]
    assert embed.main(argv + IN_PROCESS) == 1
    err = capsys.readouterr().err
    assert "1 shards (4 inputs) failed after 3 tries" in err and "run the same command again" in err
    assert (
        "model broken failed on each of 4 images and on a probe: InvalidArgumentError: assertion failed"
        in err
    )
    assert not list((tmp_path / "out" / "_shards").glob("*.json"))


def test_a_fault_that_does_not_pass_fails_the_run_and_the_rerun_finishes_once_it_clears(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from imgembed.pipelines import shard_worker
    from tests.filesystems import DeniedFileSystem

    monkeypatch.setattr(shard_worker, "SHARD_RETRY_PAUSES", (0.0, 0.0))
    names = [f"{n}.jpg" for n in range(6)] + ["6_denied.jpg"]
    write_photos(tmp_path / "photos", names)
    argv = [f"--input=denied://{tmp_path}/photos/*", f"--output={tmp_path}/out", f"--model={tiny_model_dir}"]
    argv += ["--files-per-shard=2"] + IN_PROCESS
    assert embed.main(argv) == 1
    err = capsys.readouterr().err
    assert f"cannot read denied://{tmp_path}/photos/6_denied.jpg: PermissionError" in err
    done = {path.name for path in (tmp_path / "out" / "_shards").glob("*.json")}
    assert len(done) == 3  # the others commit; the shard of 6_denied.jpg has no marker

    monkeypatch.setattr(DeniedFileSystem, "denying", False)  # the permissions are fixed
    summary = embed.run(argv)
    assert (summary.shards, summary.run.shards_kept, summary.models[0].rows) == (4, 3, 7)
    assert summary.balanced and not summary.failed_shards


def test_a_run_that_mostly_failed_exits_non_zero_and_says_why(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for number in range(40):
        (folder / f"{number:02d}.jpg").write_text("these are not the pixels you are looking for")
    argv = [f"--input={folder}", f"--output={tmp_path}/out", f"--model={tiny_model_dir}"] + IN_PROCESS
    assert embed.main(argv) == 1
    err = capsys.readouterr().err
    assert "100% of the inputs failed for tiny_mobilenet_64 (more than --max-error-rate 0.5)" in err
    assert f"not_an_image: 40 (e.g. {folder}/00.jpg)" in err
    assert embed.main(argv + ["--max-error-rate=1"]) == 0


def job_file_bytes(tmp_path, gcs, inputs: int) -> int:
    from tests.filesystems import RemoteLookingFileSystem

    folder = tmp_path / f"inputs{inputs}"
    folder.mkdir()
    for number in range(inputs):  # listed, never read: a dry run submits nothing
        (folder / f"{number:05d}.jpg").write_bytes(b"")
    job_file = tmp_path / f"job{inputs}.json"
    result = embed.run(
        [f"--input={RemoteLookingFileSystem.SCHEME}://{folder}/*", f"--output={gcs.url('dry', 'out')}"]
        + ["--runner=DataflowRunner", "--dry_run=True", "--project=example-project", "--region=europe-west1"]
        + [f"--temp_location={gcs.url('dry', 'tmp')}", f"--dataflow_job_file={job_file}"]
        + [f"--setup_file={os.path.join(os.path.dirname(os.path.dirname(__file__)), 'setup.py')}"]
    )
    assert isinstance(result, embed.DryRun) and result.job_file == str(job_file)
    text = job_file.read_text()
    for step in ("PlanParts", "ReadPlan", "EmbedShards"):
        assert step in text, step
    return len(text)


def test_the_dataflow_job_graph_does_not_grow_with_the_inputs_and_a_dry_run_changes_nothing(gcs, tmp_path):
    stale = gcs.url("dry", "out", "errors-00000000-stale.parquet")  # a dry run deletes nothing
    storage.write_bytes(stale, b"old")
    small, large = job_file_bytes(tmp_path, gcs, 200), job_file_bytes(tmp_path, gcs, 20_000)
    assert large <= 1.2 * small, (small, large)
    assert storage.list_files(gcs.url("dry", "**")) == [stale]


def test_dataflow_is_refused_paths_of_this_machine(tmp_path, capsys):
    argv = [f"--input={tmp_path}", "--output=gs://bucket/out", "--runner=DataflowRunner", "--dry_run=True"]
    assert embed.main(argv) == 2
    assert "Dataflow workers cannot reach it" in capsys.readouterr().err


def test_embed_index_and_query_run_end_to_end_on_object_storage(gcs, tmp_path, capsys):
    from imgembed.common.runners import DEFAULT_RUNNER_ARGS
    from imgembed.index import command as index_command
    from imgembed.service import query

    root = gcs.url("end-to-end")
    photos = upload_photos(storage.join(root, "in"), 30, seed=100)
    model = storage.join(root, "models", "tiny.tflite")
    storage.copy_file(tiny_models.save_tflite(str(tmp_path / "tiny.tflite")), model)
    summary = embed.run(
        [f"--input={root}/in", f"--output={root}/out", f"--model={model}", "--files-per-shard=10"]
        + DEFAULT_RUNNER_ARGS
    )
    assert summary.balanced and summary.models[0].rows == 30 and summary.shards == 3

    index = storage.join(root, "index")
    argv = ["--embeddings", f"{root}/out/tiny", "--output", index, "--dims", "64", "--distributed"]
    argv += ["--index-type", "IVF4,Flat", f"--temp_location={root}/tmp", "--no-transform-report"]
    assert index_command.main(argv) == 0, capsys.readouterr().err
    assert "30 vectors x 64-d" in capsys.readouterr().out
    assert storage.exists(
        storage.join(root, "out", "tiny", "transform_pca64", "transform_fn", "saved_model.pb")
    )
    assert not storage.list_files(storage.join(root, "tmp", "**"))  # the distributed build's files are gone
    version = storage.read_bytes(storage.join(index, "CURRENT")).decode()
    manifest = json.loads(storage.read_bytes(storage.join(index, version, "manifest.json")))
    assert manifest["count"] == 30 and manifest["transform"]["output_dim"] == 64

    rows = read_tables(embeddings_glob(storage.join(root, "out", "tiny")))
    first = rows.slice(0, 1).to_pylist()[0]
    assert query.main(["--index", index, "--id", first["id"], "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert len(hits) == 5 and first["id"] not in [hit["id"] for hit in hits]
    assert {hit["uri"].rsplit("/", 1)[-1] for hit in hits} <= set(photos)

    # A rebuild publishes beside it; the version before the live one stays.
    rebuild = ["--embeddings", f"{root}/out/tiny", "--output", index, "--index-type", "Flat", "--overwrite"]
    assert index_command.main(rebuild) == 0, capsys.readouterr().err
    newer = storage.read_bytes(storage.join(index, "CURRENT")).decode()
    assert store.version_names(index) == [version, newer]


def test_a_staged_model_cut_short_or_without_its_record_is_staged_again(tmp_path):
    from imgembed.models.loading import PreparedModel, resolve_spec
    from imgembed.pipelines.model_staging import STAGED_SUFFIX, stage

    model = tiny_models.save_tflite(str(tmp_path / "tiny.tflite"))
    prepared = PreparedModel(resolve_spec(model), "tflite", None, None)
    output = str(tmp_path / "out")
    staged = stage(prepared, output).runtime.source
    whole = pathlib.Path(staged).read_bytes()
    assert whole == pathlib.Path(model).read_bytes() and os.path.exists(staged + STAGED_SUFFIX)

    pathlib.Path(staged).write_bytes(whole[: len(whole) // 2])  # a launch killed while it copied
    assert stage(prepared, output).runtime.source == staged
    assert pathlib.Path(staged).read_bytes() == whole
    os.remove(staged + STAGED_SUFFIX)  # copied, but killed before its record
    pathlib.Path(staged).write_bytes(whole[:-1] + b"x")  # of the right size, other bytes
    stage(prepared, output)
    assert pathlib.Path(staged).read_bytes() == whole


def test_a_container_cut_mid_read_is_read_again_and_a_poison_shard_fails_alone(tmp_path, capsys, monkeypatch):
    from imgembed.pipelines import shard_worker, sources
    from tests.filesystems import CutFileSystem
    from tests.test_sources import write_containers

    monkeypatch.setattr(sources, "RETRY_PAUSES", (0.0, 0.0))
    monkeypatch.setattr(shard_worker, "SHARD_RETRY_PAUSES", (0.0,))
    folder = tmp_path / "in"
    folder.mkdir()
    names = write_containers(folder, 30)
    os.rename(folder / names["webdataset"], folder / "broken.tar")  # its reads fail half way, always
    write_photos(folder / "photos", [f"{n}.jpg" for n in range(4)])
    model = tiny_models.save_tflite(str(tmp_path / "tiny.tflite"))
    argv = [
        f"--input={CutFileSystem.SCHEME}://{folder}/*",
        f"--input={CutFileSystem.SCHEME}://{folder}/photos",
    ]
    argv += [f"--output={tmp_path}/out", f"--model={model}"] + IN_PROCESS
    assert embed.main(argv) == 1
    err = capsys.readouterr().err
    assert (
        "1 shards (1 inputs) failed after 2 tries" in err
        and "broken.tar" in err
        and "ConnectionResetError" in err
    )

    rows = read_tables(embeddings_glob(str(tmp_path / "out" / "tiny")))["uri"].to_pylist()
    errors = read_tables(errors_glob(str(tmp_path / "out")))
    assert not len(errors)  # the cut reads were read again, not taken for corrupt containers
    assert sorted(uri.rsplit("/", 1)[-1].split("#")[0] for uri in rows) == sorted(
        ["c.tfrecord"] * 30 + ["c.parquet"] * 30 + [f"{n}.jpg" for n in range(4)]
    )
    markers = storage.list_files(str(tmp_path / "out" / "_shards" / "*.json"))
    assert len(markers) == 3  # every shard but the broken one, which a rerun tries again
    summary = embed.run(argv)
    assert summary.run.shards_kept == 3 and len(summary.failed_shards) == 1


def test_a_distributed_add_through_a_transform_reaches_workers_that_share_nothing(gcs, tmp_path):
    from fixtures.synthetic_vectors import write_synthetic_embeddings
    from imgembed.index import command as index_command

    why_not = can_isolate()
    if why_not and not os.environ.get("IMGEMBED_REQUIRE_TOOLS"):
        pytest.skip(why_not)
    root = gcs.url("transform-add")
    write_synthetic_embeddings(str(tmp_path / "first"), count=600, dim=32, files=2, seed=1)
    write_synthetic_embeddings(str(tmp_path / "later"), count=300, dim=32, files=1, seed=2)
    for name in ("first", "later"):
        storage.copy_tree(str(tmp_path / name), f"{root}/{name}")
    index = f"{root}/index"
    build = ["--embeddings", f"{root}/first", "--output", index, "--dims", "8", "--index-type", "IVF4,Flat"]
    assert index_command.main(build + ["--no-transform-report"]) == 0
    with isolated_workers(gcs.env, gcs.credentials_json) as runner:
        added = ["--add", "--embeddings", f"{root}/later", "--output", index, "--distributed"]
        assert index_command.main(added + [f"--temp_location={root}/tmp", *runner]) == 0
    loaded = store.load(index)
    assert loaded.count == 900 and loaded.manifest["transform"]["output_dim"] == 8
