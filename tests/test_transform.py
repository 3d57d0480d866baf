"""The tf.Transform stage: one full pass over the embeddings (tft_beam over Parquet
RecordBatches), one graph used by the index, the service and the query command."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures.synthetic_vectors import write_synthetic_embeddings
from imgembed.index import store
from imgembed.index.reader import EmbeddingSource, vectors_of
from imgembed.models.registry import EMBEDDED_MODEL_NAME
from imgembed.pipelines import embed
from imgembed.transforms.embedding_transform import EmbeddingTransform, TransformOptions, analyze
from tests.conftest import live
from tests.servers import serve

BIN = os.path.dirname(sys.executable)
IN_PROCESS = ["--runner=DirectRunner"]


def numpy_reference(vectors: np.ndarray, dims: int | None, whiten: bool) -> np.ndarray:
    """Centre, PCA and whitening written out in numpy, to check the graph against."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    centred = unit - unit.mean(axis=0)
    if dims is None:
        return centred
    covariance = centred.T @ centred / len(centred)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    top = np.argsort(eigenvalues)[::-1][:dims]
    projected = centred @ eigenvectors[:, top]
    return projected / np.sqrt(eigenvalues[top]) if whiten else projected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_embeddings(str(folder / "emb"), count=4000, dim=48, files=3)
    files = sorted(glob.glob(str(folder / "emb" / "*.parquet")))
    return folder, files, vectors_of(pa.concat_tables(pq.read_table(f) for f in files))


@pytest.mark.parametrize(
    "options",
    [TransformOptions(), TransformOptions(dims=12), TransformOptions(dims=12, whiten=True)],
    ids=str,
)
def test_the_graph_equals_a_numpy_reference(corpus, options):
    folder, files, vectors = corpus
    out = analyze(files, 48, options, str(folder / options.folder_name), IN_PROCESS)
    transform = EmbeddingTransform(out)
    assert os.path.isdir(os.path.join(out, "transform_fn"))
    got = transform(vectors)
    expected = numpy_reference(vectors.astype(np.float64), options.dims, options.whiten)
    # Principal components are defined up to sign.
    signs = np.sign(np.sum(got * expected, axis=0))
    np.testing.assert_allclose(got, expected * signs, atol=2e-4, rtol=1e-3)
    if options.dims:
        centred = numpy_reference(vectors.astype(np.float64), None, False)
        eigenvalues = np.sort(np.linalg.eigvalsh(centred.T @ centred / len(centred)))[::-1]
        share = eigenvalues[: options.dims].sum() / eigenvalues.sum()
        assert transform.explained_variance() == pytest.approx(share, rel=1e-3)
    else:
        assert transform.explained_variance() == 1.0


def test_whitening_needs_dims_and_dims_cannot_exceed_the_input():
    with pytest.raises(ValueError, match="--whiten needs --dims"):
        TransformOptions(whiten=True)
    from imgembed.transforms.embedding_transform import preprocessing_fn_for

    with pytest.raises(ValueError, match="more than the 48 dimensions"):
        preprocessing_fn_for(TransformOptions(dims=64), 48)


def test_distributed_index_through_the_transform_matches_the_local_one(corpus, tmp_path):
    from imgembed.index import command

    folder, _, _ = corpus
    common = [
        "--embeddings",
        str(folder / "emb"),
        "--dims",
        "16",
        "--index-type",
        "IVF16,Flat",
        "--runner=DirectRunner",
    ]
    assert command.main(common + ["--output", str(tmp_path / "local")]) == 0
    assert command.main(common + ["--output", str(tmp_path / "beam"), "--distributed"]) == 0
    local, beam = store.load(str(tmp_path / "local")), store.load(str(tmp_path / "beam"))
    queries = next(beam.sources()[0].vector_batches())[1][:50]
    from imgembed.index.vectors import prepare

    queries = prepare(queries, beam.metric)
    for loaded in (local, beam):
        loaded.index.nprobe = 16
    np.testing.assert_array_equal(
        np.sort(local.index.search(queries, 10)[1], axis=1),
        np.sort(beam.index.search(queries, 10)[1], axis=1),
    )
    assert beam.manifest["transform"]["output_dim"] == 16 and beam.manifest["dimension"] == 16
    assert beam.manifest["embedding_dimension"] == 48


@pytest.fixture(scope="module")
def pca_index(tmp_path_factory):
    """The default corpus embedded with the real 1.0_224 weights, indexed with --dims 256."""
    out = tmp_path_factory.mktemp("pca")
    embed.run([f"--output={out}"] + IN_PROCESS)
    completed = subprocess.run(
        [os.path.join(BIN, "imgembed"), "index", "--embeddings", str(out / EMBEDDED_MODEL_NAME)]
        + ["--output", str(out / "index"), "--dims", "256"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    # A tf.Transform pipeline run at module level crashes at exit (rc 139); ours runs in functions.
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tf.Transform: 1024 -> 256 dims" in completed.stdout
    return out


def test_the_transform_sits_next_to_the_embeddings_and_in_the_index(pca_index):
    assert os.path.isdir(pca_index / EMBEDDED_MODEL_NAME / "transform_pca256" / "transform_fn")
    manifest = json.loads((live(pca_index / "index") / "manifest.json").read_text())
    assert manifest["transform"]["directory"] == "transform" and manifest["dimension"] == 256
    assert os.path.isdir(live(pca_index / "index") / "transform" / "transform_fn")
    report = json.loads((live(pca_index / "index") / "report.json").read_text())
    assert set(report["transform"]["before"]) >= {"index_bytes", "recall@10"}
    assert report["transform"]["after"]["index_bytes"] < report["transform"]["before"]["index_bytes"]


def test_image_queries_through_the_service_match_the_offline_transformed_vectors(pca_index):
    rows = pa.concat_tables(
        pq.read_table(p) for p in glob.glob(str(pca_index / EMBEDDED_MODEL_NAME / "embeddings-*.parquet"))
    ).to_pylist()
    transform = EmbeddingTransform(str(pca_index / EMBEDDED_MODEL_NAME / "transform_pca256"))
    offline = transform(np.stack([row["embedding"] for row in rows]))
    offline /= np.linalg.norm(offline, axis=1, keepdims=True)

    with serve(pca_index / "index") as url:
        for number in range(0, len(rows), 3):
            with open(rows[number]["uri"], "rb") as file:
                answer = httpx.post(
                    f"{url}/v1/search/image", files={"image": file}, params={"k": 5}, timeout=60
                )
            assert answer.status_code == 200, answer.text
            hits = answer.json()["results"]
            scores = offline @ offline[number]
            best = np.sort(scores)[::-1]
            np.testing.assert_allclose([hit["score"] for hit in hits], best[:5], atol=2e-3)
            ranked = [rows[i]["id"] for i in np.argsort(-scores, kind="stable")[:5]]
            tied = np.isclose(best[:5], best[1:6], atol=1e-4).any()  # identical images may swap places
            assert [hit["id"] for hit in hits] == ranked or tied, (rows[number]["uri"], hits, ranked)


@pytest.mark.slow
def test_pca_report_on_the_imagenet_subset(imagenet_dir, tmp_path):
    from imgembed.index import command

    embed.run([f"--input={imagenet_dir}/*.JPEG", f"--output={tmp_path}"] + IN_PROCESS)
    folder = str(tmp_path / EMBEDDED_MODEL_NAME)
    assert command.main(["--embeddings", folder, "--output", str(tmp_path / "index"), "--dims", "256"]) == 0
    report = json.loads((live(tmp_path / "index") / "report.json").read_text())["transform"]
    assert 0.5 < report["explained_variance"] < 1.0
    assert report["before"]["dimension"] == 1024 and report["after"]["dimension"] == 256
    assert report["after"]["index_bytes"] < report["before"]["index_bytes"] / 3
    assert 0.5 < report["after"]["recall@10"] <= 1.0 and report["before"]["recall@10"] >= 0.95
    assert EmbeddingSource(folder).count == 1300


@pytest.mark.parametrize("options", [TransformOptions(dims=16), TransformOptions()], ids=["dims16", "center"])
def test_add_through_the_transform_recalls_the_new_rows_as_a_rebuild_does(tmp_path, options):
    from imgembed.index.build import IndexConfig, build, held_out_queries
    from imgembed.index.evaluate import recall
    from imgembed.index.update import add_to_index

    write_synthetic_embeddings(str(tmp_path / "all"), count=8000, dim=48, files=4, seed=3)
    first = tmp_path / "first"
    first.mkdir()
    for path in sorted(glob.glob(str(tmp_path / "all" / "*.parquet")))[:3]:
        os.symlink(path, first / os.path.basename(path))
    later = tmp_path / "later"
    later.mkdir()
    os.symlink(sorted(glob.glob(str(tmp_path / "all" / "*.parquet")))[3], later / "embeddings-00003.parquet")
    config = IndexConfig(factory="IVF32,Flat", transform=options, compare_raw=False, beam_args=IN_PROCESS)

    build(EmbeddingSource(str(first)), str(tmp_path / "added"), config)
    report = add_to_index(str(tmp_path / "added"), [str(later)], config)
    assert report["added"] == 2000

    build(EmbeddingSource(str(tmp_path / "all")), str(tmp_path / "rebuilt"), config)
    rebuilt = store.load(str(tmp_path / "rebuilt"))
    rebuilt.index.nprobe = store.load(str(tmp_path / "added")).index.nprobe
    # The same queries among the new rows (ids 6000 on), in the rebuilt index's space.
    transformed = EmbeddingSource(str(tmp_path / "all")).with_transform(rebuilt.transform())
    new_rows = EmbeddingSource(str(later), first_id=6000).with_transform(rebuilt.transform())
    _, queries, _ = held_out_queries(transformed, config, among=new_rows)
    rebuilt_recall = recall(rebuilt.index, queries, 10)
    assert report["recall@10_on_new_rows"] >= rebuilt_recall - 0.02, (report, rebuilt_recall)
    assert report["recall@10_on_new_rows"] > 0.9
    assert not report["retrain_advised"], report["why"]
