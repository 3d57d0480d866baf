"""The embed job and the distributed index build on a real Dask cluster (a scheduler
and two isolated worker processes, started as users start them), with the inputs
and outputs on a GCS-protocol server: shards spread over both workers, and a worker
SIGKILLed mid-job loses nothing."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
from dask import config as dask_config

from fixtures import tiny_models
from imgembed.common import runners, storage
from imgembed.common.embedding_files import embeddings_glob, errors_glob
from imgembed.common.runners import DASK_RUNNER
from imgembed.index import command as index_command
from imgembed.index import store
from imgembed.pipelines import embed
from tests.beam_workers import can_isolate
from tests.clusters import dask_cluster
from tests.test_production_path import read_tables, upload_photos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dask(gcs):
    why_not = can_isolate()
    if why_not and not os.environ.get("IMGEMBED_REQUIRE_TOOLS"):
        pytest.skip(why_not)
    with dask_cluster(gcs.env, gcs.credentials_json) as cluster:
        yield cluster


def markers(output: str) -> list[dict]:
    return [json.loads(storage.read_bytes(path)) for path in storage.list_files(f"{output}/_shards/*.json")]


def embed_args(gcs, name: str, model: str) -> tuple[str, list[str]]:
    root = gcs.url(name)
    args = [f"--input={root}/in", f"--output={root}/out", f"--model={model}", "--files-per-shard=25"]
    return root, args + ["--inference-threads=1"]


def test_the_embed_job_and_a_distributed_index_spread_over_dask_workers(gcs, dask, tmp_path):
    model = tiny_models.save_tflite(str(tmp_path / "launcher_only.tflite"))  # staged for the workers
    root, args = embed_args(gcs, "dask", model)
    upload_photos(f"{root}/in", 200)
    summary = embed.run(args + dask.runner_flags)
    assert summary.balanced and summary.inputs == summary.models[0].rows == 200
    assert summary.run.shards_written == summary.shards == 8
    writers, live = {marker["worker"]["pid"] for marker in markers(f"{root}/out")}, dask.worker_pids()
    assert writers == live.keys() and len(set(live.values())) == 2, (  # both wrote, neither was replaced
        f"shards from {writers}, workers now {live}, replaced {dask.restarts()}\n{dask.log_tails()}"
    )

    index = f"{root}/index"
    argv = ["--embeddings", f"{root}/out/launcher_only", "--output", index, "--distributed"]
    argv += ["--index-type", "IVF4,Flat", f"--temp_location={root}/tmp", *dask.runner_flags]
    assert index_command.main(argv) == 0
    loaded = store.load(index)
    assert loaded.count == 200 and loaded.manifest["index"]["factory"] == "IVF4,Flat"
    assert not storage.list_files(f"{root}/tmp/**")  # the shards of the build are gone


def test_a_dask_worker_killed_mid_job_loses_nothing(gcs, dask, tmp_path):
    model = tiny_models.save_tflite(str(tmp_path / "tiny.tflite"))
    root, args = embed_args(gcs, "dask-kill", model)
    upload_photos(f"{root}/in", 300)
    killed_at = []

    def kill_once_work_is_under_way():
        deadline = time.monotonic() + 300
        while len(storage.list_files(f"{root}/out/_shards/*.json")) < 2 or not dask.is_running_a_task(0):
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        dask.kill_worker(0)  # the worker and its nanny, in the middle of a task
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_once_work_is_under_way)
    killer.start()
    summary = embed.run(args + dask.runner_flags)
    finished_at = time.monotonic()
    killer.join()
    assert killed_at and killed_at[0] < finished_at, "worker 0 was never killed while the job ran"
    assert len(markers(f"{root}/out")) == 12 and summary.run.shards_written == 12
    rows = read_tables(embeddings_glob(f"{root}/out/tiny"))["uri"].to_pylist()
    errors = read_tables(errors_glob(f"{root}/out"))["uri"].to_pylist()
    assert len(rows) + len(errors) == len(set(rows + errors)) == 300 and summary.balanced


def test_a_launch_warns_of_workers_whose_profiler_can_freeze_them(dask, caplog):
    from distributed import Client

    runners.warn_of_stalling_dask_workers(dask.runner_flags)
    assert not caplog.records  # the test cluster starts its workers as scripts/dask_cluster.sh does

    def profile(on: bool) -> None:
        with Client(dask.address, timeout=30) as client:
            client.run(dask_config.set, {"distributed.worker.profile.enabled": on})

    profile(True)  # as `dask worker` starts by default
    try:
        runners.warn_of_stalling_dask_workers(dask.runner_flags)
    finally:
        profile(False)
    if sys.version_info[:2] == (3, 11):
        workers = len(dask.worker_pids())  # one, after a test killed the other
        assert f"Dask's statistical profiler runs on {workers} worker(s) on CPython 3.11" in caplog.text
        assert runners.NO_DASK_PROFILER in caplog.text


def test_the_transform_stage_is_refused_on_dask_with_the_reason(gcs, dask, capsys):
    argv = ["--embeddings", gcs.url("nowhere"), "--output", gcs.url("nowhere-index"), "--dims", "8"]
    argv += [f"--temp_location={gcs.url('tmp')}", *dask.runner_flags]
    assert index_command.main(argv) == 2
    assert "DaskRunner cannot run the tf.Transform analysis" in capsys.readouterr().err


def test_the_cluster_script_starts_a_cluster_that_runs_a_job_and_stops_it(photo_dir, tmp_path):
    import subprocess

    from tests.servers import free_port
    from tests.test_embed_pipeline import embeddings

    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "dask_cluster.sh")
    port = str(free_port())
    started = subprocess.run([script, "start", "2", port], capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        assert f"tcp://127.0.0.1:{port}, 2 workers" in started.stdout
        summary = embed.run(
            [f"--input={photo_dir}", f"--output={tmp_path}", "--files-per-shard=2", "--inference-threads=1"]
            + [f"--runner={DASK_RUNNER}", f"--dask_client_address=tcp://127.0.0.1:{port}"]
        )
        assert summary.balanced and summary.models[0].rows == 6 == len(
            embeddings(tmp_path, summary.models[0].model)
        )
    finally:
        stopped = subprocess.run([script, "stop"], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
