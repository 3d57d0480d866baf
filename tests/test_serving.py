"""The service as users of a big index meet it, started for real on loopback: every
index kind the chooser picks is served, metadata comes back with every hit and
filters select on it, a new version is swapped in under load without a failed
request, and schemathesis finds nothing against the OpenAPI document."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from bench.load_test import BY_ID
from fixtures.synthetic_vectors import StructuredVectors, write_embeddings
from imgembed.common.embedding_files import image_id
from imgembed.index import command as index_command
from tests.conftest import live, require_tool
from tests.gcs import TOOLS
from tests.servers import child_processes, connections_by_process, serve

BIN = os.path.dirname(sys.executable)
DIM = 64
COLOURS = ["red"] * 8 + ["green", "blue"]  # red: most of the corpus; blue: a tenth
# The factories the chooser produces (index/choose.py), at this corpus's size, and
# the HNSW coarse quantizer it adds from 4,096 lists.
KINDS = {
    "flat": "Flat",
    "hnsw": "HNSW32",
    "ivf_flat": "IVF32,Flat",
    "ivf_sq8": "IVF32,SQ8",
    "ivf_pq_rflat": "IVF32,PQ16x4fs,RFlat",
    "ivf_hnsw_sq8": "IVF32_HNSW32,SQ8",
}
# Built with --distributed: each embedding file added on a Beam worker, then merged.
DISTRIBUTED = {"distributed": "IVF32,Flat", "distributed_pq_rflat": "IVF32,PQ16x4fs,RFlat"}


def uris_of(row: int) -> str:
    return f"synthetic://shard{row // 1000}/{row:06d}.jpg"


def catalogue_rows(start: int, count: int) -> tuple[np.ndarray, list[str], list[dict]]:
    vectors = StructuredVectors(DIM, seed=4).chunk(start, count)
    uris = [uris_of(row) for row in range(start, start + count)]
    metadata = [
        {
            "key": f"{row:06d}",
            "caption": f"a {COLOURS[row % len(COLOURS)]} thing",
            "url": f"https://example.com/{row}.jpg",
        }
        for row in range(start, start + count)
    ]
    return vectors, uris, metadata


def catalogue_vector(row: int, rows_per_file: int = 1000) -> list[list[float]]:
    """The vector of one row, as write_catalogue wrote it (files of 1000 rows)."""
    start = row - row % rows_per_file
    return catalogue_rows(start, rows_per_file)[0][row - start : row - start + 1].tolist()


def write_catalogue(folder, start: int, count: int, files: int) -> None:
    bounds = np.linspace(start, start + count, files + 1).astype(int)
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        vectors, uris, metadata = catalogue_rows(int(low), int(high - low))
        write_embeddings(
            str(folder), vectors, uris, file_name=f"embeddings-{low:06d}.parquet", metadata=metadata
        )


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    write_catalogue(folder / "embeddings", 0, 6000, files=6)
    return folder


def build(catalogue, name: str, *flags: str) -> str:
    index = str(catalogue / f"index-{name}")
    if not os.path.exists(os.path.join(index, "CURRENT")):
        argv = ["--embeddings", str(catalogue / "embeddings"), "--output", index, *flags]
        assert index_command.main(argv) == 0
    return index


@pytest.mark.parametrize("kind", [*KINDS, *DISTRIBUTED])
def test_every_index_kind_is_served_and_queried(catalogue, kind):
    if kind in DISTRIBUTED:
        index = build(catalogue, kind, "--index-type", DISTRIBUTED[kind], "--distributed")
    else:
        index = build(catalogue, kind, "--index-type", KINDS[kind])
    manifest = json.loads((live(index) / "manifest.json").read_text())
    assert manifest["index"]["factory"] == {**KINDS, **DISTRIBUTED}[kind] and manifest["count"] == 6000
    if kind == "distributed":  # merged into on-disk lists, served from them
        assert manifest["index"]["lists"] == "on_disk" and (live(index) / "index.ivfdata").exists()
    target = image_id("synthetic://shard2/002345.jpg")
    query = subprocess.run(
        [os.path.join(BIN, "imgembed"), "query", "--index", index, "--id", target, "-k", "5", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert query.returncode == 0, query.stderr[-2000:]
    assert len(json.loads(query.stdout)["results"]) == 5
    with serve(index, "--workers", "1") as url:
        item = httpx.get(f"{url}/v1/items/{target}").json()
        assert item["metadata"] == {
            "key": "002345",
            "caption": f"a {COLOURS[2345 % len(COLOURS)]} thing",
            "url": "https://example.com/2345.jpg",
        }
        assert item["source"] == "synthetic://shard2"
        hits = httpx.get(f"{url}/v1/neighbors/{target}", params={"k": 10}).json()["results"]
        assert len(hits) == 10 and target not in [hit["id"] for hit in hits]
        assert all(hit["metadata"]["url"].startswith("https://example.com/") for hit in hits)
        vector = catalogue_vector(2345)
        found = httpx.post(f"{url}/v1/search", json={"vectors": vector, "k": 3}).json()["results"][0]
        assert found[0]["id"] == target  # an index of these vectors finds each one first


@pytest.mark.parametrize("kind", ["flat", "ivf_sq8", "hnsw", "ivf_hnsw_sq8"])
def test_filters_return_k_matching_items_whenever_k_exist(catalogue, kind):
    index = build(catalogue, kind, "--index-type", KINDS[kind])
    target = image_id("synthetic://shard0/000007.jpg")
    vector = catalogue_vector(7)
    with serve(index, "--workers", "1") as url:
        for caption, k in (("a red thing", 50), ("a blue thing", 50), ("a green thing", 100)):
            body = {"vectors": vector, "k": k, "filter": {"caption": caption}}
            hits = httpx.post(f"{url}/v1/search", json=body).json()["results"][0]
            assert len(hits) == k and {hit["metadata"]["caption"] for hit in hits} == {caption}
            by_id = httpx.get(f"{url}/v1/neighbors/{target}", params={"k": k, "filter": f"caption={caption}"})
            assert {hit["metadata"]["caption"] for hit in by_id.json()["results"]} == {caption}
        shard = httpx.get(
            f"{url}/v1/neighbors/{target}", params={"k": 20, "filter": "source=synthetic://shard4"}
        )
        assert {hit["uri"].rsplit("/", 1)[0] for hit in shard.json()["results"]} == {"synthetic://shard4"}
        nothing = {"vectors": vector, "k": 5, "filter": {"caption": "a purple thing"}}
        assert httpx.post(f"{url}/v1/search", json=nothing).json()["results"] == [[]]


# Run in a fresh interpreter: the first use of Beam's FileSystems happens inside the
# first load, as in a worker.
SWAP_AND_LOOK = """
import gc, sys, weakref
from imgembed.index import command
from imgembed.service.searcher import LiveIndex
index, new = sys.argv[1:]
live = LiveIndex(index, load_image_model=False)
first, first_dir = weakref.ref(live.current), live.current.loaded.directory
assert command.main(["--add", "--embeddings", new, "--output", index]) == 0
assert live.refresh()
gc.collect()
mapped = [line for line in open("/proc/self/maps") if first_dir in line]
print(first() is None, len(mapped))
"""


def test_a_swapped_out_version_is_freed_and_unmapped(catalogue, tmp_path):
    index = build(catalogue, "swap", "--index-type", "IVF32,PQ16x4fs,RFlat")
    write_catalogue(tmp_path / "new", 6000, 200, files=1)
    looked = subprocess.run(
        [sys.executable, "-c", SWAP_AND_LOOK, index, str(tmp_path / "new")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert looked.returncode == 0, looked.stderr[-2000:]
    # Before: Beam's first import kept the frames of the first load, and with them
    # the first version's lists in RAM and its files mapped, however many swaps later.
    assert looked.stdout.splitlines()[-1].split() == ["True", "0"]


def test_an_add_under_load_swaps_versions_without_a_failed_request(catalogue, tmp_path):
    index = str(tmp_path / "live-index")
    assert (
        index_command.main(
            ["--embeddings", str(catalogue / "embeddings"), "--output", index, "--index-type", "IVF32,Flat"]
        )
        == 0
    )
    write_catalogue(tmp_path / "new", 6000, 500, files=1)
    new_id = image_id("synthetic://shard6/006123.jpg")
    known = [image_id(f"synthetic://shard{row // 1000}/{row:06d}.jpg") for row in range(0, 6000, 97)]
    failures, answered, stop = [], [0], threading.Event()
    with serve(index, "--workers", "2", "--reload-seconds", "0.3") as url:

        def load():
            with httpx.Client(base_url=url, timeout=30) as client:
                while not stop.is_set():
                    for image in known:
                        response = client.get(f"/v1/neighbors/{image}", params={"k": 10})
                        answered[0] += 1
                        if response.status_code != 200:
                            failures.append(response.status_code)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        added = subprocess.run(
            [
                os.path.join(BIN, "imgembed"),
                "index",
                "--add",
                "--embeddings",
                str(tmp_path / "new"),
                "--output",
                index,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        # Both workers have switched once /health says so many times in a row.
        seen = 0
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(600):
                seen = seen + 1 if client.get("/health").json()["count"] == 6500 else 0
                if seen >= 20:
                    break
                threading.Event().wait(0.05)
            new_item = client.get(f"/v1/items/{new_id}")
            new_neighbours = client.get(f"/v1/neighbors/{new_id}", params={"k": 5})
        stop.set()
        for thread in threads:
            thread.join()
    assert added.returncode == 0, added.stderr[-2000:]
    assert seen >= 20
    assert not failures and answered[0] > 100, (failures[:10], answered)
    assert new_item.status_code == 200 and new_item.json()["metadata"]["key"] == "006123"
    assert len(new_neighbours.json()["results"]) == 5


@contextlib.contextmanager
def wrk_load(url: str, ids: list[str], folder):
    """32 connections of wrk asking the neighbours of these ids until the block ends;
    yields a dict that then holds wrk's counts of requests and failures."""
    wrk = shutil.which("wrk")
    if wrk is None:
        require_tool(pathlib.Path("/usr/bin/wrk"), "wrk")
    (folder / "ids.txt").write_text("\n".join(ids) + "\n")
    (folder / "by_id.lua").write_text(BY_ID % {"ids": folder / "ids.txt"})  # the load test's own script
    process = subprocess.Popen(
        [wrk, "-t1", "-c32", "-d600s", "-s", str(folder / "by_id.lua"), url],
        stdout=subprocess.PIPE,
        text=True,
    )
    counts: dict = {}
    try:
        time.sleep(1.0)  # the load is on before the block starts
        yield counts
    finally:
        process.send_signal(signal.SIGINT)  # wrk stops and prints what it measured
        text = process.communicate(timeout=60)[0]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    counts["requests"] = int(re.search(r"(\d+) requests in", text).group(1))
    counts["failed"] = (int(bad.group(1)) if bad else 0) + (
        sum(int(n) for n in sockets.groups()) if sockets else 0
    )


def wait_for_count(url: str, count: int) -> int:
    """Times in a row /health said ``count`` (both workers switched once it says so 20 times)."""
    seen = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(1200):
            seen = seen + 1 if client.get("/health").json()["count"] == count else 0
            if seen >= 20:
                break
            time.sleep(0.05)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*KINDS, *DISTRIBUTED])
def test_a_sync_under_wrk_load_mirrors_the_embeddings_without_a_failed_request(catalogue, tmp_path, kind):
    embeddings = tmp_path / "embeddings"
    shutil.copytree(catalogue / "embeddings", embeddings)
    index = str(tmp_path / "index")
    flags = ["--index-type", {**KINDS, **DISTRIBUTED}[kind]]
    flags += ["--distributed"] if kind in DISTRIBUTED else []
    assert index_command.main(["--embeddings", str(embeddings), "--output", index, *flags]) == 0
    # The embeddings change as an embed rerun changes them: the file of a shard whose
    # images were all deleted goes; one whose first 100 images changed is written
    # anew under another name (their rows replaced, its other rows the same); a new
    # shard's file appears.
    os.remove(embeddings / "embeddings-001000.parquet")
    os.remove(embeddings / "embeddings-003000.parquet")
    vectors, uris, metadata = catalogue_rows(3000, 1000)
    vectors[:100] = StructuredVectors(DIM, seed=4).chunk(77_000, 100)  # other images, alike
    write_embeddings(
        str(embeddings),
        vectors,
        uris,
        [f"changed-{n}" for n in range(100)]
        + [hashlib.sha256(uri.encode()).hexdigest() for uri in uris[100:]],
        "embeddings-003000b.parquet",
        metadata=metadata,
    )
    write_catalogue(embeddings, 6000, 500, files=1)
    kept = [image_id(uris_of(row)) for row in [*range(0, 1000, 7), *range(4000, 6000, 7)]]
    with serve(index, "--workers", "2", "--reload-seconds", "0.3") as url:
        with wrk_load(url, kept, tmp_path) as load:
            synced = subprocess.run(
                [os.path.join(BIN, "imgembed"), "index", "--sync", "--embeddings", str(embeddings)]
                + ["--output", index, *(flags[2:])],
                capture_output=True,
                text=True,
                timeout=600,
            )
            seen = wait_for_count(url, 5500)
        with httpx.Client(base_url=url, timeout=30) as client:
            deleted = client.get(f"/v1/items/{image_id(uris_of(1500))}")
            added = client.get(f"/v1/items/{image_id(uris_of(6100))}")
            # A changed image is found by its new vector, as itself.
            changed = client.post("/v1/search", json={"vectors": vectors[:20].tolist(), "k": 1}).json()
            kept_rows = client.post(
                "/v1/search", json={"vectors": catalogue_rows(4000, 1000)[0][:50].tolist(), "k": 1}
            ).json()
    assert synced.returncode == 0, synced.stderr[-2000:]
    assert "500 images added, 100 replaced, 1,000 removed" in synced.stdout, synced.stdout
    assert "900 unchanged rows of rewritten files" in synced.stdout
    assert seen >= 20
    assert load["failed"] == 0 and load["requests"] > 100, load
    assert deleted.status_code == 404 and added.status_code == 200
    found = [hits[0]["id"] for hits in changed["results"]]
    expected = [image_id(uri) for uri in uris[:20]]
    assert sum(a == b for a, b in zip(found, expected, strict=True)) >= 18, (kind, found, expected)
    found = [hits[0]["id"] for hits in kept_rows["results"]]
    expected = [image_id(uris_of(row)) for row in range(4000, 4050)]
    assert sum(a == b for a, b in zip(found, expected, strict=True)) >= 45, kind


def burst_of_health_checks(port: int, count: int = 32, while_stopped: int | None = None) -> dict[int, int]:
    """Opens ``count`` connections at once (as wrk does), each asking /health, and
    returns how many each worker accepted; with ``while_stopped``, that worker is
    stopped while they arrive, as a worker busy with a long request would be."""
    import socket

    if while_stopped:
        os.kill(while_stopped, signal.SIGSTOP)
    try:
        burst = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for connection in burst:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        if while_stopped:
            threading.Timer(0.5, os.kill, (while_stopped, signal.SIGCONT)).start()
    for connection in burst:
        connection.settimeout(60)
        assert connection.recv(65536).startswith(b"HTTP/1.1 200")
    shares = connections_by_process(port)
    for connection in burst:
        connection.close()
    return shares


def test_each_worker_accepts_its_share_of_connections_and_a_dead_one_is_replaced(catalogue, tmp_path):
    """Each worker accepts on its own socket (service/workers.py), and the kernel
    deals connections out between the sockets: a worker busy when a burst arrives
    still gets its share (behind one shared socket the idle worker took them all,
    and kept them: by id 1,500 requests/s under wrk against 2,650). Connections made
    while a killed worker is replaced wait in its socket for the replacement."""
    import urllib.parse

    index = build(catalogue, "flat", "--index-type", "Flat")
    log = tmp_path / "serve.log"
    with serve(index, "--workers", "2", log_path=log) as url:
        port = urllib.parse.urlsplit(url).port
        shares = burst_of_health_checks(port)
        assert len(shares) == 2 and min(shares.values()) >= 4, shares
        busy = min(shares)
        busy_shares = burst_of_health_checks(port, while_stopped=busy)
        assert busy_shares.get(busy, 0) >= 4, busy_shares
        os.kill(busy, signal.SIGKILL)
        statuses = [httpx.get(f"{url}/health", timeout=120).status_code for _ in range(40)]
        replaced = burst_of_health_checks(port)
    assert statuses == [200] * 40
    assert len(replaced) == 2 and busy not in replaced, (shares, replaced)
    assert f"imgembed serve: worker {busy} was killed by SIGKILL; starting another" in log.read_text()


def test_a_worker_that_keeps_dying_as_it_starts_stops_the_service_with_the_reason(catalogue):
    """Replacing a worker that dies again at once would hide the fault behind an
    endless restart; after a few such deaths the service stops, saying why."""

    index = build(catalogue, "flat", "--index-type", "Flat")
    served = subprocess.Popen(
        [os.path.join(BIN, "imgembed"), "serve", "--index", index, "--port", "0", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while served.poll() is None and time.monotonic() < deadline:
            for worker in child_processes(served.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
            time.sleep(0.2)
        _, stderr = served.communicate(timeout=60)
    finally:
        if served.poll() is None:
            served.kill()
    assert served.returncode == 1, stderr[-2000:]
    assert "imgembed serve: a worker died 5 times running within 30 s of starting" in stderr, stderr[-2000:]
    assert "(the last was killed by SIGKILL); stopping" in stderr


def test_a_port_already_in_use_is_one_clear_line(catalogue):
    import socket

    index = build(catalogue, "flat", "--index-type", "Flat")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = subprocess.run(
            [os.path.join(BIN, "imgembed"), "serve", "--index", index, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert served.returncode == 2
    assert (
        served.stderr.strip() == f"imgembed serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.slow
def test_schemathesis_finds_nothing_against_the_openapi_document(catalogue, tmp_path):
    schemathesis = TOOLS / "schemathesis" / "bin" / "schemathesis"
    require_tool(schemathesis, "schemathesis")
    index = build(catalogue, "flat", "--index-type", "Flat")
    with serve(index, "--workers", "1") as url:
        completed = subprocess.run(
            [str(schemathesis), "run", f"{url}/openapi.json", "--checks", "all", "--seed", "1"]
            + ["--max-examples", "40", "--request-timeout", "20", "--no-color"],
            capture_output=True,
            text=True,
            timeout=1200,
            cwd=tmp_path,
        )
    assert completed.returncode == 0, completed.stdout[-6000:]


@pytest.mark.parametrize("kind", ["ivf_sq8", "ivf_pq_rflat", "hnsw"])
def test_searches_batched_together_answer_as_each_alone(catalogue, kind):
    """Concurrent requests of one worker share faiss calls (service/batching.py),
    and each gets the answer it gets alone, whatever else was asked with it."""
    import asyncio

    from imgembed.service.batching import SearchBatcher
    from imgembed.service.searcher import Searcher

    searcher = Searcher.open(build(catalogue, kind, "--index-type", KINDS[kind]), load_image_model=False)
    ids = [row["id"] for row in searcher.items.describe(list(range(0, 6000, 97)), ("id",))]
    queries = [searcher.neighbours_query(image_id, k=5 + n % 3) for n, image_id in enumerate(ids)]
    queries += [searcher.vectors_query(catalogue_vector(row), k=10) for row in range(1, 6000, 301)]
    queries += [searcher.neighbours_query(ids[0], k=5, filters={"source": "synthetic://shard2"})]
    alone = [searcher.answer(query) for query in queries]
    calls = []
    search_all = searcher.search_all
    searcher.search_all = lambda vectors, fetch: calls.append(len(vectors)) or search_all(vectors, fetch)

    async def together():
        batcher = SearchBatcher()
        return await asyncio.gather(*(batcher.answer(searcher, query) for query in queries))

    assert asyncio.run(together()) == alone
    assert sum(calls) == len(queries) - 1 and max(calls) > 1, calls  # the filtered one ran alone

    def broken(vectors, fetch):
        raise RuntimeError("faiss failed")

    searcher.search_all = broken

    async def failing():
        batcher = SearchBatcher()
        return await asyncio.gather(
            *(batcher.answer(searcher, q) for q in queries[:3]), return_exceptions=True
        )

    assert [str(error) for error in asyncio.run(failing())] == ["faiss failed"] * 3


def test_one_scrape_counts_the_requests_of_every_worker_and_a_hung_worker_is_replaced(catalogue, tmp_path):
    import urllib.parse

    index = build(catalogue, "flat", "--index-type", "Flat")
    log = tmp_path / "serve.log"
    ids = [image_id(uris_of(row)) for row in range(0, 6000, 13)]
    with serve(index, "--workers", "2", "--worker-timeout", "3", log_path=log) as url:
        with wrk_load(url, ids, tmp_path) as load:
            time.sleep(4)
        scraped = httpx.get(f"{url}/metrics", timeout=30).text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in scraped.splitlines()
            if line.startswith("imgembed_http_requests_total{") and 'route="/v1/neighbors/{image_id}"' in line
        )
        assert load["failed"] == 0 and counted >= 0.98 * load["requests"], (counted, load)

        port = urllib.parse.urlsplit(url).port
        with httpx.Client(base_url=url) as kept_alive:  # the worker that holds this connection
            kept_alive.get("/health")
            (hung,) = connections_by_process(port)
        os.kill(hung, signal.SIGSTOP)  # alive, its loop stopped: what a stuck worker looks like
        deadline = time.monotonic() + 60
        while f"worker {hung} answered nothing for 3 s; killing it" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        statuses = [httpx.get(f"{url}/health", timeout=60).status_code for _ in range(20)]
    assert statuses == [200] * 20


def test_a_connection_that_sends_no_whole_request_is_closed(catalogue):
    import socket
    import urllib.parse

    from imgembed.service.workers import HEADER_SECONDS

    index = build(catalogue, "flat", "--index-type", "Flat")
    with serve(index, "--workers", "1") as url:
        port = urllib.parse.urlsplit(url).port
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            slow.settimeout(HEADER_SECONDS + 20)
            started = time.monotonic()
            assert slow.recv(100) == b""  # closed by the server
            assert time.monotonic() - started < HEADER_SECONDS + 5
        assert httpx.head(f"{url}/health").status_code == 200
