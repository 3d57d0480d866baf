"""Keep an index in step with its embeddings without retraining it: ``--add`` the
embedding files of a folder of new images, or ``--sync`` the index with folders
whose files changed since (an embed rerun over a grown corpus replaces the files
of the shards whose inputs changed, and deletes those of retracted shards).

Both work file by file, as the embed job writes them (a file's name is a hash of
its shard's inputs, so a file never changes under its name):

    kept     files the index holds and still present: their rows stay
    removed  (sync only) files the index holds, under a synced folder, now gone:
             their rows leave the index
    new      files present that the index does not hold: their rows are added

Rows are numbered densely, as a build numbers them: kept files in their order,
numbered down past the removed rows (``faiss_index.remove_rows``: faiss's
``remove_ids``, then each list's ids renumbered in place; an HNSW graph or
fast-scan PQ lists, which faiss cannot remove from, are refilled from the kept
files' vectors, their training kept), then the new files. Items,
thumbnails, filters and near-duplicate clusters are written anew for the version,
which is published like a build's (index/store.py), so a running service swaps to
it. Rows of a rewritten shard whose image did not change leave with the old file
and come back with the new one, unchanged: the report tells them apart from the
images added, replaced (same id, other content) and removed.

>>> sync_index("out/index", ["out/mobilenet_v1_100_224_embedded"], IndexConfig())
{'added': 1, 'replaced': 1, 'removed': 1, 'unchanged': 98, ...}
"""

from __future__ import annotations

import dataclasses
import shutil
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgembed.common import storage
from imgembed.common.embedding_files import embeddings_glob, made_with
from imgembed.index import items, mapped_pages, store
from imgembed.index.build import (
    RECALL_K,
    RETRAIN_DRIFT,
    AddFunction,
    IndexConfig,
    add_locally,
    build,
    duplicate_clusters,
    held_out_queries,
    manifest_part,
)
from imgembed.index.evaluate import recall
from imgembed.index.faiss_index import (
    can_remove_rows,
    empty_copy,
    exact_assignment,
    has_on_disk_lists,
    is_ivf,
    native_stdout_silenced,
    remove_rows,
    set_search_params,
)
from imgembed.index.reader import EmbeddingFile, EmbeddingSource
from imgembed.index.refine_file import RefineVectors
from imgembed.index.vectors import IndexInputError


def add_to_index(
    index_dir: str, folders: list[str], config: IndexConfig, add: AddFunction = add_locally
) -> dict:
    """Adds the rows of embedding files not yet in the index; rows already indexed
    (the same image embedded into another folder) are refused."""
    return update_index(index_dir, folders, config, add, mirror=False)


def sync_index(
    index_dir: str, folders: list[str], config: IndexConfig, add: AddFunction = add_locally
) -> dict:
    """Makes the index mirror ``folders``: rows of files gone removed, rows of new
    files added. Builds the index when there is none yet."""
    if not store.exists(index_dir):
        return build(EmbeddingSource(folders), index_dir, config, add)
    return update_index(index_dir, folders, config, add, mirror=True)


@dataclasses.dataclass
class _Update:
    """The files of the live version, set against the folders' files now."""

    kept: list[EmbeddingFile]  # numbered as they are in the live version
    removed: list[EmbeddingFile]
    new: list[str]

    @classmethod
    def of(cls, manifest: dict, folders: list[str], mirror: bool) -> _Update:
        indexed = [EmbeddingFile(**file) for part in manifest["parts"] for file in part["files"]]
        present = {path for folder in folders for path in storage.list_files(embeddings_glob(folder))}
        if mirror and not present:
            raise IndexInputError(
                f"no embeddings files under {', '.join(folders)}: a sync would empty the index "
                "(is that the folder it was built from?)"
            )
        gone = {
            file.path
            for file in indexed
            if mirror and storage.parent(file.path) in folders and file.path not in present
        }
        known = {file.path for file in indexed}
        return cls(
            kept=[file for file in indexed if file.path not in gone],
            removed=[file for file in indexed if file.path in gone],
            new=sorted(present - known),
        )

    def removed_rows(self) -> np.ndarray:
        if not self.removed:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(f.first_id, f.first_id + f.num_rows) for f in self.removed])

    def kept_ranges(self) -> list[tuple[int, int]]:
        return [(file.first_id, file.first_id + file.num_rows) for file in self.kept]

    def renumbered_kept(self) -> list[EmbeddingFile]:
        """The kept files numbered densely from 0, in their order."""
        files, next_id = [], 0
        for file in self.kept:
            files.append(dataclasses.replace(file, first_id=next_id))
            next_id += file.num_rows
        return files


def update_index(
    index_dir: str, folders: list[str], config: IndexConfig, add: AddFunction, mirror: bool
) -> dict:
    started = time.perf_counter()
    loaded = store.load(index_dir)
    manifest = loaded.manifest
    config = dataclasses.replace(  # the index's own settings, as at its build
        config,
        metric=loaded.metric,
        dedup_threshold=manifest.get("dedup_threshold", config.dedup_threshold),
        recall_target=manifest.get("recall_target", config.recall_target),
    )
    folders = [storage.canonical(folder.rstrip("/")) for folder in folders]
    update = _Update.of(manifest, folders, mirror)
    if not update.new and not update.removed:
        note = (
            "the index mirrors the embeddings already"
            if mirror
            else "every embedding file given is in the index"
        )
        return {"added": 0, "replaced": 0, "removed": 0, "unchanged": 0, "count": loaded.count, "note": note}
    transform = loaded.transform()  # new rows go through the index's own transform, as its rows did
    kept = EmbeddingSource.from_files(update.renumbered_kept()).with_transform(transform)
    new = EmbeddingSource.from_paths(update.new, first_id=kept.count).with_transform(transform)
    removed = update.removed_rows()
    if new.count:
        _check_compatible(manifest, new)
        _check_new_ids(loaded.items, removed, new)
    report = _changes(loaded.items, removed, new) | {
        "files": {"kept": len(update.kept), "removed": len(update.removed), "added": len(update.new)}
    }
    sources = [source for source in (kept, new) if source.count]
    if not sources:
        raise IndexInputError("every row of the index would be removed: rebuild it instead")

    with store.new_version(index_dir) as version:
        local = version.local_dir
        before = _imbalance(loaded.index)
        index, written = _updated(loaded, update, kept, new, config, add, local)
        combined = EmbeddingSource.from_files([*update.renumbered_kept(), *new.files]).with_transform(
            transform
        )
        report |= {
            "count": int(index.ntotal),
            "imbalance_factor": {"before": before, "after": _imbalance(index)},
        }
        report |= _recall_on_new_rows(index, combined, new, manifest, config)
        if manifest.get("transform"):
            shutil.copytree(
                store.path(loaded.directory, store.TRANSFORM_DIR), store.path(local, store.TRANSFORM_DIR)
            )
        if manifest.get("runtime_model"):  # the int8 model uploads are embedded with
            shutil.copy(store.path(loaded.directory, manifest["runtime_model"]), local)
        if written is None:
            faiss.write_index(index, store.path(local, store.INDEX_FILE))
        manifest |= items.write_items(sources, local)
        manifest["parts"] = [manifest_part(source) for source in sources]
        manifest["count"] = int(index.ntotal)
        store.write_json(local, store.MANIFEST_FILE, manifest)
        report["duplicates"] = duplicate_clusters(local, index, combined, config)
        report["seconds"] = round(time.perf_counter() - started, 3)
        full_report = store.read_json(loaded.directory, store.REPORT_FILE)
        full_report.setdefault("updates", []).append(report)
        full_report["version"] = report["version"] = version.name
        store.write_json(local, store.REPORT_FILE, full_report)
    return report


def _updated(
    loaded: store.LoadedIndex,
    update: _Update,
    kept: EmbeddingSource,
    new: EmbeddingSource,
    config: IndexConfig,
    add: AddFunction,
    folder: str,
):
    """The live index without the removed rows, numbered densely, with the rows of
    ``new`` added; and its file when it was written on the way (a re-ranked index,
    whose raw vectors are carried over on disk). An index faiss cannot remove rows
    from is refilled instead: its training kept, the kept rows added again from
    their embeddings files."""
    removed = update.removed_rows()
    refill = len(removed) > 0 and not can_remove_rows(loaded.index)
    concrete = faiss.downcast_index(loaded.index)
    if has_on_disk_lists(loaded.index):  # read-only: change a copy of its lists in the new version
        for name in (store.INDEX_FILE, store.ON_DISK_LISTS_FILE):
            shutil.copy(store.path(loaded.directory, name), store.path(folder, name))
        with native_stdout_silenced():
            index = faiss.read_index(store.path(folder, store.INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
        set_search_params(index, loaded.manifest["search_params"])
        remove_rows(index, removed)
        _add(index, new, config, add)
        return index, None
    if isinstance(concrete, faiss.IndexRefine):  # mapped: grow a copy of its base
        base = empty_copy(concrete.base_index) if refill else faiss.clone_index(concrete.base_index)
        remove_rows(base, np.zeros(0, np.int64) if refill else removed)
        # A refine part that only counts: the raw vectors are in the refine file.
        placeholder = faiss.IndexFlat(base.d, base.metric_type)
        placeholder.ntotal = base.ntotal
        growing = faiss.IndexRefine(base, placeholder)
        refine = RefineVectors(growing, folder)
        if refill:
            _add(growing, kept, config, add, refine)
        else:
            refine.append_from(
                store.path(loaded.directory, store.INDEX_FILE), loaded.count, update.kept_ranges()
            )
            growing.ntotal = refine.ntotal
        _add(growing, new, config, add, refine)
        path = store.path(folder, store.INDEX_FILE)
        refine.write_index(base, concrete.k_factor, path)
        mapped_pages.watch(path)
        index = faiss.read_index(path, store.MAPPED)
        set_search_params(index, loaded.manifest["search_params"])
        return index, path
    index = loaded.index
    if refill:
        index = empty_copy(index)
        set_search_params(index, loaded.manifest["search_params"])
        _add(index, kept, config, add)
    else:
        remove_rows(index, removed)
    _add(index, new, config, add)
    return index, None


def _add(index, source: EmbeddingSource, config: IndexConfig, add: AddFunction, refine=None) -> None:
    if source.count:
        with exact_assignment(index):
            add(index, source, config.metric, refine, None)


def _changes(indexed: items.Items, removed: np.ndarray, new: EmbeddingSource) -> dict:
    """Images added, replaced (same id, other bytes), removed, and unchanged (rows of
    a rewritten shard that left with its old file and came back with the new one)."""
    before = dict(
        zip(
            indexed.table.column("id").take(removed).to_pylist(),
            indexed.table.column("sha256").take(removed).to_pylist(),
            strict=True,
        )
    )
    after = {}
    for source_batch in _columns(new, ("id", "sha256")):
        after.update(zip(*[column.to_pylist() for column in source_batch], strict=True))
    both = before.keys() & after.keys()
    unchanged = sum(1 for image in both if before[image] == after[image] and before[image] is not None)
    replaced = len(both) - unchanged
    return {
        "added": len(after) - len(both),
        "replaced": replaced,
        "removed": len(before) - len(both),
        "unchanged": unchanged,
    }


def _columns(source: EmbeddingSource, names: tuple[str, ...]):
    """Batches of these columns of every file of ``source`` (a missing one empty)."""
    present = [name for name in names if name in source.columns]
    if not source.count:
        return
    for _, batch in source.record_batches(present):
        yield [batch.column(name) if name in present else pa.nulls(batch.num_rows) for name in names]


def _recall_on_new_rows(
    index: faiss.Index, combined: EmbeddingSource, new: EmbeddingSource, manifest: dict, config: IndexConfig
) -> dict:
    """recall@10 on queries among the new rows, and whether the trained lists still fit."""
    at_build = manifest["recall_at_build"].get(f"recall@{RECALL_K}", 1.0)
    if not new.count or combined.count < 2:
        return {"retrain_advised": False, "why": "no new rows to measure"}
    _, queries, _ = held_out_queries(combined, config, among=new)
    new_recall = recall(index, queries, min(RECALL_K, combined.count - 1))
    advise = new_recall < config.recall_target or at_build - new_recall > RETRAIN_DRIFT
    return {
        f"recall@{RECALL_K}_on_new_rows": round(new_recall, 4),
        f"recall@{RECALL_K}_at_build": at_build,
        "retrain_advised": advise,
        "why": (
            f"recall@{RECALL_K} on queries among the new rows is {new_recall:.3f} "
            f"(build: {at_build:.3f}, target {config.recall_target}): "
            + ("the trained quantiser no longer fits the data; rebuild the index" if advise else "no drift")
        ),
    }


def _check_compatible(manifest: dict, new: EmbeddingSource) -> None:
    """New rows must come from the model and preprocessing the index holds: the
    service embeds every upload with those."""
    model = (new.metadata.get("model") or {}).get("name")
    if new.raw_dim != manifest.get("embedding_dimension", manifest["dimension"]) or model != (
        manifest.get("model") or {}
    ).get("name"):
        raise IndexInputError(
            f"the new embeddings ({model}, {new.raw_dim}-d) do not match the index "
            f"({manifest['model']['name']}, {manifest.get('embedding_dimension', manifest['dimension'])}-d)"
        )
    indexed = made_with(manifest | {"runtime": manifest.get("runtime_source")})
    for what, value in made_with(new.metadata).items():
        if value != indexed[what]:
            raise IndexInputError(
                f"the new embeddings were made with another {what} ({value}) than the index's "
                f"({indexed[what]}); embed them as the index's were (--resize, --central-fraction, "
                "--backend, --precision), into the same output for int8"
            )


def _check_new_ids(indexed: items.Items, removed: np.ndarray, new: EmbeddingSource) -> None:
    """No image twice: a new row's id is neither among the rows that stay nor in
    another new row."""
    ids = pa.chunked_array([batch[0] for batch in _columns(new, ("id", "uri"))])
    uris = pa.chunked_array([batch[1] for batch in _columns(new, ("id", "uri"))])
    if pc.count_distinct(ids).as_py() != len(ids):
        raise IndexInputError(
            "the embeddings hold two rows of one image: is an embed run still writing them? "
            "Sync once it has finished"
        )
    staying = np.ones(len(indexed), bool)
    staying[removed] = False
    seen = pc.is_in(ids, value_set=indexed.table.column("id").filter(pa.array(staying)).combine_chunks())
    if pc.any(seen).as_py():
        first = uris[pc.index(seen, True).as_py()].as_py()
        raise IndexInputError(
            f"{pc.sum(seen).as_py()} new row(s) are already in the index (e.g. {first}); "
            "--add only embeddings of new images, or --sync the folder the index was built from"
        )


def _imbalance(index: faiss.Index) -> float | None:
    if not is_ivf(index):
        return None
    return round(float(faiss.extract_index_ivf(index).invlists.imbalance_factor()), 3)
