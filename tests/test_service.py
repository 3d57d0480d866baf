"""The search service started for real (`imgembed serve` on a loopback port) over
the default corpus embedded with the real weights; requests through an HTTP
client, the page through headless Chromium."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgembed.index import command as index_command
from imgembed.models.registry import EMBEDDED_MODEL_NAME
from imgembed.pipelines import embed
from imgembed.pipelines.default_corpus import default_corpus_patterns
from tests.conftest import live
from tests.servers import serve

BIN = os.path.dirname(sys.executable)
CORPUS = sorted(path for pattern in default_corpus_patterns() for path in glob.glob(pattern))
# A worker's peak resident memory under a burst of uploads (README: the service's limits).
MAX_WORKER_RSS = 1536 * 2**20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default corpus embedded (with thumbnails) and indexed, as run_local.sh does."""
    out = tmp_path_factory.mktemp("out")
    embed.run([f"--output={out}", "--thumbnail-size=96", "--runner=DirectRunner"])
    assert (
        index_command.main(["--embeddings", str(out / EMBEDDED_MODEL_NAME), "--output", str(out / "index")])
        == 0
    )
    return out


@pytest.fixture(scope="module")
def server(built):
    with serve(built / "index") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        yield http


def corpus_rows(built) -> list[dict]:
    tables = [pq.read_table(path) for path in glob.glob(str(built / EMBEDDED_MODEL_NAME / "*.parquet"))]
    return pa.concat_tables(tables).select(["id", "uri", "embedding"]).to_pylist()


def test_health_says_what_is_served(client, built):
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "count": len(CORPUS),
        "model": EMBEDDED_MODEL_NAME,
        "metric": "cosine",
        "dimension": 1024,
        "image_search": True,
        "version": live(built / "index").name,
        "filter_fields": ["source"],
    }


@pytest.mark.parametrize("path", CORPUS, ids=os.path.basename)
def test_an_uploaded_corpus_image_finds_itself_first(client, path):
    with open(path, "rb") as file:
        response = client.post("/v1/search/image", files={"image": file}, params={"k": 3})
    assert response.status_code == 200, response.text
    top = response.json()["results"][0]
    identical = {p for p in CORPUS if pathlib.Path(p).read_bytes() == pathlib.Path(path).read_bytes()}
    if os.path.basename(path).startswith("chessboard"):  # GRAY and RGB decode to the same pixels
        identical |= {p for p in CORPUS if "chessboard" in p}
    assert top["uri"] in identical and top["score"] >= 0.999


def test_vector_search_and_neighbours_and_items(client, built):
    rows = corpus_rows(built)
    vectors = [row["embedding"] for row in rows[:3]]
    results = client.post("/v1/search", json={"vectors": vectors, "k": 5}).json()["results"]
    assert [hits[0]["id"] for hits in results] == [row["id"] for row in rows[:3]]
    assert all(len(hits) == 5 for hits in results)

    target = rows[5]
    neighbours = client.get(f"/v1/neighbors/{target['id']}", params={"k": 4}).json()["results"]
    assert len(neighbours) == 4 and target["id"] not in [hit["id"] for hit in neighbours]
    scores = [hit["score"] for hit in neighbours]
    assert scores == sorted(scores, reverse=True)

    item = client.get(f"/v1/items/{target['id']}").json()
    assert item["uri"] == target["uri"] and item["width"] > 0 and item["height"] > 0
    thumbnail = client.get(f"/v1/items/{target['id']}/thumbnail")
    assert thumbnail.headers["content-type"] == "image/jpeg" and thumbnail.content[:2] == b"\xff\xd8"


def test_collapsing_duplicates_keeps_one_image_per_cluster(client):
    gray = next(p for p in CORPUS if p.endswith("chessboard_GRAY.png"))
    with open(gray, "rb") as file:
        data = file.read()
    plain = client.post("/v1/search/image", files={"image": data}, params={"k": 5}).json()["results"]
    collapsed = client.post(
        "/v1/search/image", files={"image": data}, params={"k": 5, "collapse_duplicates": "true"}
    ).json()["results"]
    assert {os.path.basename(hit["uri"]) for hit in plain[:2]} == {
        "chessboard_GRAY.png",
        "chessboard_RGB.png",
    }
    assert len({hit["cluster_id"] for hit in collapsed}) == len(collapsed) == 5
    assert sum("chessboard" in hit["uri"] for hit in collapsed) == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_uploads_queued_together_answer_as_each_alone(built, threads):
    """Image queries waiting together are embedded one by one and searched in one faiss
    call (service/batching.py); each gets the answer it gets alone, and a bad upload
    only its own error."""
    import asyncio

    from imgembed.service.batching import ImageBatcher
    from imgembed.service.searcher import ImageQuery, QueryError, Searcher

    searcher = Searcher.open(str(built / "index"), image_threads=threads)
    source = searcher.items.describe([0], ("source",))[0]["source"]
    uploads = [ImageQuery(pathlib.Path(path).read_bytes(), 3 + n % 4) for n, path in enumerate(CORPUS[:9])]
    uploads[2] = ImageQuery(uploads[2].data, 5, collapse=True)
    uploads[4] = ImageQuery(uploads[4].data, 4, filters={"source": source})
    uploads[6] = ImageQuery(b"just text, not an image", 3)
    uploads.append(ImageQuery(uploads[0].data, 0))

    def outcome(answer):
        if isinstance(answer, QueryError):
            return (answer.status, answer.code)
        return (500, type(answer).__name__) if isinstance(answer, Exception) else answer

    def alone(upload):
        try:
            return searcher.search_image(upload.data, upload.k, upload.collapse, upload.filters)
        except QueryError as error:
            return outcome(error)

    expected = [alone(upload) for upload in uploads]
    assert expected[6] == (400, "not_an_image") and expected[-1] == (400, "bad_k")
    uploads.append(ImageQuery(b"a decoder bug", 3))  # whatever an upload raises fails it alone
    expected.append((500, "ZeroDivisionError"))
    pixels = searcher.images.pixels
    searcher.images.pixels = lambda data: pixels(data) if data != b"a decoder bug" else 1 / 0
    calls = []
    search_all = searcher.search_all
    searcher.search_all = lambda vectors, fetch: calls.append(len(vectors)) or search_all(vectors, fetch)

    async def together():
        images = ImageBatcher(threads)
        answers = await asyncio.gather(
            *(images.answer(searcher, upload) for upload in uploads), return_exceptions=True
        )
        return [outcome(answer) for answer in answers]

    assert asyncio.run(together()) == expected
    assert sum(calls) == 7 and max(calls) > 1, calls  # the filtered one ran alone


def truncated_multipart() -> tuple[bytes, dict]:
    body = b'--XYZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff'
    return body, {"content-type": "multipart/form-data; boundary=XYZ"}


UNKNOWN_ID = "0" * 32
VECTOR = [0.0] * 1024
BAD_REQUESTS = [
    ("GET", f"/v1/neighbors/{UNKNOWN_ID}", {}, 404),
    ("GET", f"/v1/items/{UNKNOWN_ID}", {}, 404),
    ("GET", "/v1/neighbors/no-such-id", {}, 422),  # not an id, by the document's pattern
    ("GET", "/v1/neighbors/../../etc/passwd", {}, 404),
    ("GET", "/v1/items/%00%ff", {}, 422),
    ("GET", f"/v1/neighbors/{UNKNOWN_ID}?k=abc", {}, 422),
    ("GET", f"/v1/neighbors/{UNKNOWN_ID}?k=1000000000", {}, 422),
    ("GET", f"/v1/neighbors/{UNKNOWN_ID}?k=-1", {}, 422),
    ("GET", f"/v1/neighbors/{UNKNOWN_ID}?filter=nofield=1", {}, 422),
    ("POST", "/v1/search", {"json": {"vectors": [[1.0, 2.0]]}}, 422),
    ("POST", "/v1/search", {"json": {"vectors": "not a list"}}, 422),
    ("POST", "/v1/search", {"json": {"vectors": []}}, 422),
    ("POST", "/v1/search", {"json": {"vectors": [VECTOR], "k": 0}}, 422),
    ("POST", "/v1/search", {"json": {"vectors": [VECTOR], "k": 10**12}}, 422),
    ("POST", "/v1/search", {"json": {"vectors": [VECTOR] * 65}}, 422),
    ("POST", "/v1/search", {"json": {"vectors": [VECTOR], "filter": {"nofield": 1}}}, 422),
    ("POST", "/v1/search", {"json": {"k": 3}}, 422),
    ("POST", "/v1/search", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    (
        "POST",
        "/v1/search",
        {"content": b'{"vectors": [[0.0]]}', "headers": {"content-type": "text/plain"}},
        415,
    ),
    (
        "POST",
        "/v1/search",
        {
            "content": b'{"vectors": [[NaN' + b", 0.0" * 1023 + b"]]}",
            "headers": {"content-type": "application/json"},
        },
        422,  # not JSON; and not a float32 either
    ),
    (
        "POST",
        "/v1/search",
        {"content": b"x" * (3 * 2**20), "headers": {"content-type": "application/json"}},
        413,
    ),
    ("POST", "/v1/search/image", {"files": {"image": b""}}, 400),
    ("POST", "/v1/search/image", {"files": {"image": b"just text, not an image"}}, 400),
    ("POST", "/v1/search/image", {"files": {"image": b"<svg xmlns='http://www.w3.org/2000/svg'/>"}}, 400),
    ("POST", "/v1/search/image", {"files": {"other": b"x"}}, 422),
    ("POST", "/v1/search/image", {"files": {"image": b"\xff" * (11 * 2**20)}}, 413),
    (
        "POST",
        "/v1/search/image",
        {"content": truncated_multipart()[0], "headers": truncated_multipart()[1]},
        422,  # python-multipart drops the cut-off part: the image field is missing
    ),
    ("POST", "/v1/search/image", {"json": {"image": "base64?"}}, 415),
    ("DELETE", "/v1/search", {}, 405),
    ("GET", "/v2/nothing", {}, 404),
]


@pytest.mark.parametrize(("method", "path", "options", "status"), BAD_REQUESTS, ids=lambda v: str(v)[:40])
def test_bad_requests_get_a_4xx_json_error(client, method, path, options, status):
    response = client.request(method, path, **options)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and error["message"]
    if status == 405:
        assert response.headers["allow"] == "POST"


def test_fuzzed_requests_never_get_a_5xx_and_the_server_stays_up(client):
    rng = random.Random(1234)
    junk = [b"", b"\x00" * 100, os.urandom(2000), b"{}", b"[]", b'{"vectors": [[1e309]]}', "ü€𝄞".encode()]
    paths = ["/v1/search", "/v1/search/image", "/v1/neighbors/abc", "/v1/items/abc", "/health", "/metrics"]
    statuses = []
    for _ in range(300):
        method = rng.choice(["GET", "POST", "PUT"])
        path = rng.choice(paths) + rng.choice(["", "?k=" + rng.choice(["5", "-3", "x", "1e9", ""])])
        headers = {
            "content-type": rng.choice(["application/json", "multipart/form-data; boundary=b", "text/plain"])
        }
        response = client.request(method, path, content=rng.choice(junk), headers=headers)
        statuses.append(response.status_code)
    assert all(status < 500 for status in statuses), sorted(set(statuses))
    assert client.get("/health").status_code == 200


def test_metrics_and_openapi(client):
    client.get("/health")
    metrics = client.get("/metrics").text
    assert 'imgembed_http_requests_total{method="GET",route="/health",status="200"}' in metrics
    assert "imgembed_http_request_seconds_bucket" in metrics and "imgembed_http_errors_total" in metrics
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/search/image", "/v1/neighbors/{image_id}", "/v1/items/{image_id}"} <= set(
        paths
    )


def test_query_command_prints_a_table_and_json(built):
    query = [os.path.join(BIN, "imgembed"), "query", "--index", str(built / "index")]
    coffee = next(p for p in CORPUS if p.endswith("coffee.png"))
    table = subprocess.run(
        query + ["--image", coffee, "-k", "3"], capture_output=True, text=True, timeout=300
    )
    assert table.returncode == 0, table.stderr[-2000:]
    assert "coffee.png" in table.stdout.splitlines()[1]
    top_id = json.loads(
        subprocess.run(
            query + ["--image", coffee, "--json"], capture_output=True, text=True, timeout=300
        ).stdout
    )["results"][0]["id"]
    by_id = subprocess.run(query + ["--id", top_id, "--json"], capture_output=True, text=True, timeout=300)
    assert top_id not in [hit["id"] for hit in json.loads(by_id.stdout)["results"]]
    missing = subprocess.run(query + ["--id", "nope"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "unknown_id" in missing.stderr


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_uploads_an_image_and_shows_the_neighbour_grid(server):
    browser_path = chromium_path()
    if browser_path is None:
        if os.environ.get("IMGEMBED_REQUIRE_BROWSER"):
            pytest.fail("IMGEMBED_REQUIRE_BROWSER is set but Debian's chromium is not installed")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    coffee = next(p for p in CORPUS if p.endswith("coffee.png"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=browser_path,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        page = browser.new_page()
        page.goto(server)
        page.wait_for_function("document.getElementById('status').textContent.includes('images')")
        page.set_input_files("#file", coffee)
        page.wait_for_selector(".hit")
        cards = page.locator(".hit")
        assert cards.count() == 12
        assert cards.first.locator(".name").text_content() == "coffee.png"
        # The thumbnail arrives after its card: wait for it (a broken one never loads and times out).
        page.wait_for_function(
            "(() => { const img = document.querySelector('.hit').querySelector('img');"
            " return img !== null && img.complete && img.naturalWidth > 0; })()",
            timeout=30_000,
        )
        second = cards.nth(1).locator(".name").text_content()
        cards.nth(1).click()
        page.wait_for_function(
            f"document.getElementById('query').textContent.includes({json.dumps('Images like ' + second)})"
        )
        page.wait_for_selector(".hit")  # the grid empties when a query starts
        assert cards.count() == 12
        assert second not in page.locator(".hit .name").all_text_contents()  # neighbours exclude the query
        assert page.text_content("#error") == ""
        browser.close()


def test_an_index_without_a_loadable_model_still_serves_vectors(built, tmp_path):
    from imgembed.service.searcher import QueryError, Searcher

    index_dir = tmp_path / "index"
    shutil.copytree(built / "index", index_dir)
    manifest_file = live(index_dir) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["model"]["source"] = str(tmp_path / "gone")
    manifest_file.write_text(json.dumps(manifest))
    searcher = Searcher.open(str(index_dir))
    assert searcher.images.model is None
    with pytest.raises(QueryError) as caught:
        searcher.search_image(b"...", 3)
    assert caught.value.status == 503
    vector = np.asarray([corpus_rows(built)[0]["embedding"]])
    assert len(searcher.search_vectors(vector, 3)[0]) == 3


def test_every_cut_of_every_format_is_a_4xx_with_the_reason_the_pipeline_writes(client, tmp_path):
    from tests.test_decode import truncation_sweep

    folder = tmp_path / "cuts"
    folder.mkdir()
    answered = {}
    for name, cut, data in truncation_sweep():
        file_name = f"{name.lower()}-{cut:02d}.{name.lower()}"
        (folder / file_name).write_bytes(data)
        response = client.post("/v1/search/image", files={"image": (file_name, data)}, params={"k": 1})
        assert response.status_code < 500, (file_name, response.text)
        answered[file_name] = "ok" if response.status_code == 200 else response.json()["error"]["code"]
    summary = embed.run([f"--input={folder}", f"--output={tmp_path / 'out'}", "--runner=DirectRunner"])
    assert summary.inputs == len(answered) == 6 * 17
    errors = pq.read_table(glob.glob(str(tmp_path / "out" / "errors-*.parquet"))[0]).to_pylist()
    written = {os.path.basename(row["uri"]): row["reason"] for row in errors}
    assert {name: written.get(name, "ok") for name in answered} == answered


def worker_pids(url: str, workers: int = 2) -> set[int]:
    """The worker processes of a service, found by the connections they hold."""
    import urllib.parse

    from tests.servers import connections_by_process

    port = urllib.parse.urlsplit(url).port
    clients = [httpx.Client(base_url=url) for _ in range(16)]
    try:
        for client in clients:
            client.get("/health")
        return set(connections_by_process(port))
    finally:
        for client in clients:
            client.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_a_burst_of_200_uploads_of_5mb_is_answered_or_told_to_retry_and_memory_stays_bounded(built, tmp_path):
    import asyncio
    import io
    import threading

    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (1800, 2400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=97)
    upload = buffer.getvalue()
    assert 5e6 <= len(upload) <= 10 * 2**20, len(upload)
    log = tmp_path / "serve.log"
    with serve(built / "index", "--workers", "2", log_path=log) as url:
        pids = worker_pids(url)
        peak = dict.fromkeys(pids, 0)
        done = threading.Event()

        def watch_memory():
            while not done.is_set():
                for pid in pids:
                    peak[pid] = max(peak[pid], rss_bytes(pid))
                time.sleep(0.05)

        async def burst():
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
                responses = await asyncio.gather(
                    *(
                        client.post("/v1/search/image", files={"image": ("big.jpg", upload)}, params={"k": 1})
                        for _ in range(200)
                    )
                )
            return responses

        watcher = threading.Thread(target=watch_memory)
        watcher.start()
        try:
            responses = asyncio.run(burst())
        finally:
            done.set()
            watcher.join()
        assert worker_pids(url) == pids  # no worker died
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 16, statuses
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
    assert max(peak.values()) < MAX_WORKER_RSS, {
        pid: f"{value / 2**20:.0f} MiB" for pid, value in peak.items()
    }
    assert "died" not in log.read_text() and "killing" not in log.read_text()
