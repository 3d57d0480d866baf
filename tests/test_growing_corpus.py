"""A corpus that grows: a rerun embeds only what is new or changed and retracts what
was deleted, whatever the path's spelling; ``index --sync`` makes the index mirror
the embeddings."""

from __future__ import annotations

import glob
import hashlib
import os

import pytest

from fixtures.images import jpeg_bytes, photo_like
from imgembed.common.embedding_files import image_id
from imgembed.index import command as index_command
from imgembed.pipelines import embed, outputs
from imgembed.pipelines.plan import plan_run
from imgembed.pipelines.shards import FILES, InputFile, InputShard, shard_key
from imgembed.service.searcher import QueryError, Searcher
from tests.test_embed_pipeline import IN_PROCESS, embeddings, errors

MODEL = "tiny_mobilenet_64"

# --- the plan, on its own -----------------------------------------------------------


def listed(*names: str, stamp: str = "1@1.0") -> dict[str, InputFile]:
    return {f"/c/{name}": InputFile(f"/c/{name}", FILES, 1, stamp) for name in names}


def committed_shards(listing: dict[str, InputFile], files_per_shard: int) -> dict[str, dict]:
    """The markers a first run over ``listing`` commits."""
    plan = plan_run({}, listing, files_per_shard, "s")
    return {key: {"shard": shard.inputs()} for key, shard in plan.todo.items()}


def test_a_new_file_that_sorts_first_makes_a_new_shard_and_moves_no_other():
    before = listed(*(f"{n:02d}.jpg" for n in range(10)))
    committed = committed_shards(before, 4)
    plan = plan_run(committed, before | listed("00a_first.jpg"), 4, "s")
    assert plan.kept.keys() == committed.keys() and not plan.retracted
    ((key, shard),) = plan.todo.items()
    assert shard.paths == ("/c/00a_first.jpg",) and shard.rewrites is None
    assert (plan.changes.new, plan.changes.changed, plan.changes.deleted) == (1, 0, 0)


def test_deleted_and_changed_files_rewrite_their_shards_from_their_own_rows():
    before = listed(*(f"{n:02d}.jpg" for n in range(12)))
    committed = committed_shards(before, 4)
    now = dict(before)
    del now["/c/05.jpg"]  # from the second shard
    now["/c/09.jpg"] = InputFile("/c/09.jpg", FILES, 1, "1@2.0")  # the third: same size, touched later
    for name in ("08.jpg", "10.jpg", "11.jpg"):  # the rest of the third goes too but 09
        del now[f"/c/{name}"]
    plan = plan_run(committed, now, 4, "s")
    assert len(plan.kept) == 1 and not plan.retracted
    rewritten = sorted(plan.todo.values(), key=lambda shard: shard.paths)
    assert [shard.paths for shard in rewritten] == [("/c/04.jpg", "/c/06.jpg", "/c/07.jpg"), ("/c/09.jpg",)]
    assert rewritten[0].reused == rewritten[0].paths and rewritten[1].reused == ()
    assert all(shard.rewrites in committed for shard in rewritten)
    assert (plan.changes.new, plan.changes.changed, plan.changes.deleted) == (0, 1, 4)


def test_a_shard_whose_inputs_are_all_gone_is_retracted_and_a_replaced_one_superseded():
    before = listed("a.jpg", "b.jpg", "c.jpg", "d.jpg")
    committed = committed_shards(before, 2)
    first, second = sorted(committed, key=lambda key: committed[key]["shard"]["paths"])
    now = {path: file for path, file in before.items() if path.endswith(("c.jpg", "d.jpg"))}
    assert plan_run(committed, now, 2, "s").retracted == [first]

    # A rewrite of the second shard committed, its old files not yet deleted (a kill):
    rewrite = InputShard.of(FILES, [before["/c/c.jpg"]], rewrites=second, reused=["/c/c.jpg"])
    committed[shard_key(rewrite, "s")] = {"shard": rewrite.inputs(), "replaces": [second]}
    plan = plan_run(committed, {"/c/c.jpg": before["/c/c.jpg"]}, 2, "s")
    assert plan.superseded == [second] and plan.retracted == [first]
    assert list(plan.kept) == [shard_key(rewrite, "s")] and not plan.todo


# --- whole runs ------------------------------------------------------------------------


def output_files(output) -> dict[str, int]:
    """Every Parquet file of the output, with its time of last change (ns)."""
    return {path: os.stat(path).st_mtime_ns for path in glob.glob(f"{output}/**/*.parquet", recursive=True)}


def test_the_same_folder_typed_three_ways_is_one_corpus(photo_dir, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(photo_dir.parent)
    model = [f"--model={tiny_model_dir}"] + IN_PROCESS
    spellings = ["photos", str(photo_dir), f"file://{photo_dir}"]
    ids = []
    for number, spelling in enumerate(spellings):
        summary = embed.run([f"--input={spelling}", f"--output=out{number}"] + model)
        assert summary.models[0].rows == 6
        ids.append(sorted(embeddings(tmp_path / f"out{number}", MODEL)["id"].to_pylist()))
    assert ids[0] == ids[1] == ids[2]
    assert ids[0] == sorted(image_id(str(path)) for path in photo_dir.iterdir())

    assert index_command.main(["--embeddings", f"out0/{MODEL}", "--output", "index"]) == 0
    written = output_files(tmp_path / "out0")
    for spelling in spellings[1:]:
        again = embed.run([f"--input={spelling}", f"--output={tmp_path / 'out0'}"] + model)
        assert (again.run.shards_written, again.run.shards_kept, again.models[0].rows) == (0, 1, 6)
    assert output_files(tmp_path / "out0") == written
    version = (tmp_path / "index" / "CURRENT").read_text()
    assert (
        index_command.main(["--sync", "--embeddings", f"{tmp_path}/out0/{MODEL}/", "--output", "index"]) == 0
    )
    assert (tmp_path / "index" / "CURRENT").read_text() == version  # nothing changed: no new version


def test_other_bytes_of_the_same_size_are_embedded_again(tiny_model_dir, tmp_path):
    folder = tmp_path / "bitmaps"
    folder.mkdir()
    for seed in range(4):  # a BMP's size depends on its dimensions alone
        photo_like(seed, 40, 30).save(folder / f"{seed}.bmp")
    args = [f"--input={folder}", f"--output={tmp_path / 'out'}", f"--model={tiny_model_dir}"] + IN_PROCESS
    embed.run(args)
    changed = folder / "2.bmp"
    size, when = changed.stat().st_size, changed.stat().st_mtime
    photo_like(99, 40, 30).save(changed)
    os.utime(changed, (when + 5, when + 5))  # a filesystem with coarse times still sees a change
    assert changed.stat().st_size == size
    summary = embed.run(args)
    assert (summary.run.changed_inputs, summary.models[0].embedded, summary.run.rows_reused) == (1, 1, 3)
    rows = {row["uri"]: row for row in embeddings(tmp_path / "out", MODEL).to_pylist()}
    assert len(rows) == 4 and rows[str(changed)]["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()


def test_a_link_to_nothing_is_an_error_row_until_it_points_at_an_image(tiny_model_dir, tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        photo_like(seed, 40, 30).save(folder / f"{seed}.jpg")
    link = folder / "3.jpg"
    link.symlink_to(tmp_path / "not_yet.jpg")
    (tmp_path / "album").mkdir()
    (folder / "album").symlink_to(tmp_path / "album")
    args = [f"--input={folder}", f"--output={tmp_path / 'out'}", f"--model={tiny_model_dir}"] + IN_PROCESS
    summary = embed.run(args)
    assert (summary.inputs, summary.models[0].rows) == (4, 3)
    (error,) = errors(tmp_path / "out").to_pylist()
    assert (error["uri"], error["reason"]) == (str(link), "not_found")
    assert error["message"] == f"{link} is a symbolic link to nothing (-> {tmp_path}/not_yet.jpg)"
    assert (
        f"1 symbolic link(s) to folders, e.g. {folder}/album -> {tmp_path}/album: not followed" in caplog.text
    )

    photo_like(9, 40, 30).save(tmp_path / "not_yet.jpg")  # the link is mended
    summary = embed.run(args)
    assert (summary.run.changed_inputs, summary.models[0].embedded, summary.run.rows_reused) == (1, 1, 3)
    assert sorted(embeddings(tmp_path / "out", MODEL)["uri"].to_pylist()) == [
        str(folder / f"{number}.jpg") for number in range(4)
    ]
    assert errors(tmp_path / "out").num_rows == 0


def test_a_rewrite_killed_before_it_deleted_the_shard_it_replaces_leaves_no_duplicate(
    photo_dir, tiny_model_dir, tmp_path, monkeypatch
):
    args = [
        f"--input={photo_dir}",
        f"--output={tmp_path}",
        f"--model={tiny_model_dir}",
        "--files-per-shard=3",
    ]
    embed.run(args + IN_PROCESS)
    (photo_dir / "photo_0.jpg").unlink()
    with monkeypatch.context() as patched:  # the worker dies between its marker and the deletion
        patched.setattr(outputs, "delete_shards", lambda *args: None)
        embed.run(args + IN_PROCESS)
    uris = embeddings(tmp_path, MODEL)["uri"].to_pylist()
    assert len(uris) == 8 and len(set(uris)) == 6  # the shard and its rewrite: photo_0 and two rows twice

    summary = embed.run(args + IN_PROCESS)
    uris = embeddings(tmp_path, MODEL)["uri"].to_pylist()
    assert len(uris) == len(set(uris)) == 5 == summary.inputs and summary.run.shards_written == 0


@pytest.mark.slow
def test_a_grown_corpus_reruns_only_what_changed_and_the_synced_index_mirrors_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    # 2,600 images: two copies of 1,300 photos, 100 files a shard.
    corpus = tmp_path / "corpus"
    photos = [jpeg_bytes(seed, 96, 72) for seed in range(1300)]
    for copy in ("a", "b"):
        (corpus / copy).mkdir(parents=True)
        for number, data in enumerate(photos):
            (corpus / copy / f"p{number:04d}.jpg").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    args = [f"--model={tiny_model_dir}", "--files-per-shard=100", "--thumbnail-size=32"] + IN_PROCESS
    first = embed.run(["--input=corpus", "--output=out"] + args)  # relative paths first
    assert (first.run.shards_written, first.models[0].rows) == (26, 2600)
    # The seeded model's vectors are all alike: exact copies only.
    assert (
        index_command.main(["--embeddings", f"out/{MODEL}", "--output", "index", "--no-near-duplicates"]) == 0
    )
    before = output_files(tmp_path / "out")

    added = corpus / "a" / "a0000.jpg"  # sorts before every other file
    added.write_bytes(jpeg_bytes(5000, 96, 72))
    deleted = corpus / "a" / "p0650.jpg"
    deleted.unlink()
    changed = corpus / "b" / "p0100.jpg"
    old_bytes = changed.read_bytes()
    changed.write_bytes(jpeg_bytes(6000, 96, 72))
    second = embed.run([f"--input={corpus}", f"--output={tmp_path / 'out'}"] + args)  # absolute now

    assert (second.run.new_inputs, second.run.changed_inputs, second.run.deleted_inputs) == (1, 1, 1)
    assert second.models[0].embedded == second.run.inputs_read == 2
    assert (second.run.shards_written, second.run.shards_rewritten, second.run.rows_reused) == (3, 2, 198)
    after = output_files(tmp_path / "out")
    assert len(before.keys() - after.keys()) == 4  # the two rewritten shards' embeddings and errors
    assert all(after[path] == written for path, written in before.items() if path in after)
    table = embeddings(tmp_path / "out", MODEL)
    existing = sorted(str(path) for path in corpus.rglob("*.jpg"))
    assert sorted(table["uri"].to_pylist()) == existing and len(existing) == 2600
    assert second.inputs == 2600 and second.balanced

    assert index_command.main(["--sync", "--embeddings", f"out/{MODEL}", "--output", "index"]) == 0
    searcher = Searcher.open(str(tmp_path / "index"))
    assert searcher.count == 2600
    assert {row["id"] for row in searcher.items.describe(list(range(2600)), ("id",))} == set(
        table["id"].to_pylist()
    )
    with pytest.raises(QueryError) as gone:
        searcher.item(image_id(str(deleted)))
    assert gone.value.status == 404
    hits = searcher.search_image(old_bytes, k=5)
    assert hits[0]["id"] == image_id(str(corpus / "a" / "p0100.jpg")) and hits[0]["score"] > 0.999
    assert all(hit["id"] != image_id(str(changed)) or hit["score"] < 0.999 for hit in hits)
    item = searcher.item(image_id(str(changed)))
    assert item["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert searcher.thumbnail(image_id(str(added)))[:2] == b"\xff\xd8"  # a JPEG, read from the version
    # Near-duplicate clusters follow: the two copies of a photo are one cluster, unless one changed.
    copies = [searcher.item(image_id(str(corpus / copy / "p0200.jpg"))) for copy in ("a", "b")]
    assert copies[0]["cluster_id"] == copies[1]["cluster_id"] and copies[0]["cluster_size"] == 2
    assert searcher.item(image_id(str(corpus / "a" / "p0100.jpg")))["cluster_size"] == 1


@pytest.mark.slow
def test_watch_makes_each_upload_searchable_and_a_killed_watcher_loses_nothing(gcs, tmp_path, monkeypatch):
    from bench.watch_latency import trial
    from fixtures import tiny_models

    monkeypatch.setenv("IMGEMBED_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_models.save_tflite(str(tmp_path / "tiny.tflite"))
    figures = trial(gcs, tmp_path, model, rate=2, seconds=30, kill=True, interval=3)
    assert figures["watcher_killed"] == 1
    assert figures["searchable"] == figures["polled"] > 50, figures
    assert figures["uploads"] == figures["rows"] == figures["index_count"], figures
    assert figures["duplicate_rows"] == 0 and figures["responses_5xx"] == 0, figures
    assert figures["latency_p95_s"] < 60, figures
