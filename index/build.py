"""Build an index from embeddings; measure it; write it. (index/update.py adds to
one, or keeps it in step with its embeddings.)

choose (index/choose.py) -> train on a sample -> add in batches (here, or on
Beam: index/beam_build.py) -> tune nprobe/efSearch on held-out queries ->
measure recall@1/10/100 against exact search -> write (index/store.py)
-> near-duplicate clusters (index/duplicates.py)
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import faiss
import numpy as np
import pyarrow as pa

from imgembed import __version__
from imgembed.common import progress, storage
from imgembed.index import items, mapped_pages, store
from imgembed.index.choose import IndexPlan, choose_index, fallback, ivf_sizing, kind_of_factory
from imgembed.index.duplicates import write_duplicates
from imgembed.index.evaluate import QuerySet, exact_neighbours, latency, recall, recall_report, tune
from imgembed.index.faiss_index import (
    add_vectors,
    exact_assignment,
    has_on_disk_lists,
    new_index,
    search_param_grid,
    set_search_params,
    train_index,
    training_steps,
)
from imgembed.index.reader import EmbeddingSource
from imgembed.index.refine_file import RefineVectors
from imgembed.index.vectors import Metric, prepare
from imgembed.transforms.embedding_transform import TransformOptions, check_runner

_log = logging.getLogger(__name__)

RECALL_K = 10
# Tuning aims this far above the target so the held-out measurement clears it.
TUNING_MARGIN = 0.01
# Recall on new queries this far below the build's measurement advises a retrain.
RETRAIN_DRIFT = 0.02

# add(index, source, metric, refine, folder): fills a trained index with every row
# of source (an IndexRefine's raw vectors into refine, on disk, when it is given;
# what else may go to disk, into folder, when it is given).
AddFunction = Callable[[faiss.Index, EmbeddingSource, Metric, RefineVectors | None, str | None], None]


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    metric: Metric = Metric.COSINE
    max_memory: int = 4 * 10**9
    recall_target: float = 0.95
    factory: str | None = None  # an index_factory string that overrides the choice
    tune_queries: int = 500
    eval_queries: int = 1000
    dedup_threshold: float | None = 0.95  # cosine similarity; None skips near duplicates
    seed: int = 0
    transform: TransformOptions | None = None  # a tf.Transform stage before indexing
    compare_raw: bool = True  # with a transform, also measure a raw-vector index
    beam_args: tuple[str, ...] = ()  # runner flags of the tf.Transform job

    def __post_init__(self):
        object.__setattr__(self, "metric", Metric.parse(self.metric))
        if self.transform is not None:
            check_runner(self.beam_args)
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"--recall-target must be in (0, 1], got {self.recall_target}")
        if self.dedup_threshold is not None and not -1 <= self.dedup_threshold <= 1:
            raise ValueError(
                f"--dedup-threshold is a cosine similarity in [-1, 1], got {self.dedup_threshold}"
            )


def add_locally(
    index: faiss.Index,
    source: EmbeddingSource,
    metric: Metric,
    refine: RefineVectors | None = None,
    folder: str | None = None,
) -> None:
    for first_id, vectors in source.vector_batches():
        add_vectors(
            index, prepare(vectors, metric, f"embeddings from id {first_id}"), first_id, refine=refine
        )


def filled(index: faiss.Index, source: EmbeddingSource, config: IndexConfig, add: AddFunction, folder: str):
    """``index`` with every row of ``source`` added, and the path of its file when
    it was written on the way: an IndexRefineFlat's raw vectors go to disk as they
    are added, and it comes back read from ``folder``, vectors memory-mapped."""
    concrete = faiss.downcast_index(index)
    if not isinstance(concrete, faiss.IndexRefine):
        with exact_assignment(index):
            add(index, source, config.metric, None, folder)
        if has_on_disk_lists(index):
            mapped_pages.watch(store.path(folder, store.ON_DISK_LISTS_FILE))
        return index, None
    refine = RefineVectors(index, folder)
    with exact_assignment(index):
        add(index, source, config.metric, refine, None)
    path = store.path(folder, store.INDEX_FILE)
    refine.write_index(concrete.base_index, concrete.k_factor, path)
    mapped_pages.watch(path)
    return faiss.read_index(path, store.MAPPED), path


def plan_for(source: EmbeddingSource, config: IndexConfig) -> IndexPlan:
    if config.factory is None:
        return choose_index(source.count, source.dim, config.max_memory)
    needs_training = not faiss.index_factory(
        source.dim, config.factory, config.metric.faiss_metric
    ).is_trained
    train = ivf_sizing(source.count, source.dim, config.max_memory).train_size if needs_training else 0
    kind = kind_of_factory(config.factory)
    return IndexPlan(kind, config.factory, 0, train, f"--index-type {config.factory} given")


def train(plan: IndexPlan, source: EmbeddingSource, config: IndexConfig, phase=None) -> faiss.Index:
    """An empty index of the plan's type, trained on a uniform sample of the corpus;
    ``phase`` advances when the sample is read, then per training step."""
    index = new_index(plan, source.dim, config.metric)
    if plan.needs_training:
        if phase is not None:
            phase.set_total(1 + training_steps(index))
        sample_ids = source.sample_ids(plan.train_size, np.random.default_rng(config.seed))
        sample = prepare(source.take(sample_ids), config.metric, "training sample")
        if phase is not None:
            phase.advance(1)
        train_index(index, sample, config.seed, phase)
    return index


def held_out_queries(source: EmbeddingSource, config: IndexConfig, among: EmbeddingSource | None = None):
    """Disjoint tuning and evaluation queries with their exact neighbours in ``source``.
    Queries are drawn from ``among`` (default: the whole source)."""
    among = among or source
    rng = np.random.default_rng(config.seed + 1)
    ids = among.sample_ids(config.tune_queries + config.eval_queries, rng)
    rng.shuffle(ids)
    k = min(max(100, RECALL_K), source.count - 1)
    queries = exact_neighbours(source, config.metric, ids, k)
    rows = np.arange(len(ids))
    if len(ids) < config.tune_queries + config.eval_queries:
        # A small corpus has too few rows for two sets: tune and measure on all.
        return queries, queries, True
    return queries.subset(rows[: config.tune_queries]), queries.subset(rows[config.tune_queries :]), False


def _new_version(index_dir: str, overwrite: bool):
    if store.exists(index_dir) and not overwrite:
        raise ValueError(f"{index_dir} already holds an index; pass --overwrite to replace it")
    return store.new_version(index_dir)


class _Phases:
    """The phases of a build, one after the other: their seconds for the report, and
    their progress while they run (imgembed/common/progress.py)."""

    def __init__(self, label: str = "index"):
        self.seconds: dict[str, float] = {}
        self._label = label
        self._current: tuple[str, float, progress.Phase] | None = None

    def begin(self, name: str, total: int | None = None, unit: str = "vectors") -> progress.Phase:
        """Ends the phase running, if any, and starts ``name``."""
        self.end()
        phase = progress.start(f"{self._label}: {name}", total, unit)
        self._current = (name, time.perf_counter(), phase)
        return phase

    def end(self) -> None:
        if self._current is not None:
            name, started, phase = self._current
            progress.finish(phase)
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 3)
            self._current = None


@dataclasses.dataclass
class FittedIndex:
    """A trained, filled and tuned index, before it is written anywhere."""

    plan: IndexPlan
    index: faiss.Index
    search_params: dict
    report: dict
    eval_set: QuerySet | None
    path: str | None  # its file, when it was written while it was filled
    query_sets: tuple | None  # (tune, evaluate, same set) with their exact neighbours


def fit(
    source: EmbeddingSource,
    config: IndexConfig,
    add: AddFunction,
    clock: _Phases,
    folder: str,
    plan: IndexPlan | None = None,
    query_sets: tuple | None = None,
) -> FittedIndex:
    """Choose (unless ``plan`` is given), train, add, then tune and measure on
    held-out queries (``query_sets``: those of an earlier fit of the same source);
    ``folder`` takes what does not stay in RAM."""
    plan = plan or plan_for(source, config)
    index = train(plan, source, config, clock.begin("train", unit="steps"))
    index, path = filled(index, source.reporting(clock.begin("add", source.count)), config, add, folder)
    clock.end()
    report = {"index": dataclasses.asdict(plan), "count": source.count, "dimension": source.dim}
    if source.count < 2:
        report |= {"recall": {}, "meets_target": True, "note": "one vector: nothing to measure"}
        return FittedIndex(plan, index, {}, report, None, path, None)
    k = min(RECALL_K, source.count - 1)  # a tiny corpus has fewer than 10 neighbours
    if query_sets is None:
        query_sets = held_out_queries(source.reporting(clock.begin("exact_search", source.count)), config)
    tune_set, eval_set, shared = query_sets
    target = min(1.0, config.recall_target + TUNING_MARGIN)
    grid = search_param_grid(plan, index)
    clock.begin("tune", len(grid), "settings")
    params, tuned_recall, met = tune(index, grid, tune_set, k, target, set_search_params)
    clock.begin("evaluate")
    report |= {
        "recall": recall_report(index, eval_set, source.count),
        "latency": latency(index, eval_set, k),
        "queries": {"tune": len(tune_set.ids), "evaluate": len(eval_set.ids), "same_set": shared},
        f"tuned_recall@{k}": round(tuned_recall, 4),
    }
    report["meets_target"] = bool(met and report["recall"][f"recall@{k}"] >= config.recall_target)
    clock.end()
    return FittedIndex(plan, index, params, report, eval_set, path, query_sets)


def fit_or_fall_back(
    source: EmbeddingSource, config: IndexConfig, add: AddFunction, clock: _Phases, folder: str
) -> FittedIndex:
    """The chosen kind, or when it misses the recall target the next kinds that fit
    the budget (index/choose.py ``fallback``), until one meets it; else the best.
    The report lists every kind tried."""
    fitted = fit(source, config, add, clock, folder)
    tried = []
    while not fitted.report["meets_target"] and config.factory is None:
        next_plan = fallback(fitted.plan, source.count, source.dim, config.max_memory)
        if next_plan is None:
            break
        k = min(RECALL_K, source.count - 1)
        tried.append(
            {
                "kind": fitted.plan.kind,
                "factory": fitted.plan.factory,
                f"recall@{k}": fitted.report["recall"][f"recall@{k}"],
            }
        )
        _log.info("%s missed the recall target; trying %s", fitted.plan.factory, next_plan.factory)
        candidate = fit(source, config, add, clock, folder, next_plan, fitted.query_sets)
        if candidate.report["recall"][f"recall@{k}"] >= fitted.report["recall"][f"recall@{k}"]:
            fitted = candidate
        else:
            break
    if tried:
        fitted.report["tried"] = tried
    return fitted


def build(
    source: EmbeddingSource,
    index_dir: str,
    config: IndexConfig,
    add: AddFunction = add_locally,
    overwrite: bool = False,
) -> dict:
    """Builds, tunes, measures and writes an index of every row in ``source``
    (through the tf.Transform graph first when ``config.transform`` asks for one)."""
    if config.factory is None:  # a budget no index fits is refused before anything is written
        dims = (
            config.transform.dims
            if config.transform is not None and config.transform.dims
            else source.raw_dim
        )
        choose_index(source.count, dims, config.max_memory)
    with _new_version(index_dir, overwrite) as version:
        local = version.local_dir
        clock = _Phases()
        raw = source
        transform_info = None
        if config.transform is not None:
            clock.begin("transform_analysis", raw.count)
            source, transform_info = attach_transform(raw, local, config)
            clock.end()
        fitted = fit_or_fall_back(source, config, add, clock, local)
        report = fitted.report | {
            "recall_target": config.recall_target,
            "search_params": fitted.search_params,
            "metric": config.metric.value,
        }
        clock.begin("write", source.count)
        if fitted.path is None:
            faiss.write_index(fitted.index, store.path(local, store.INDEX_FILE))
        filter_fields = items.write_items([source], local)
        clock.end()
        manifest = {
            "format_version": store.FORMAT_VERSION,
            "imgembed_version": __version__,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": source.metadata.get("model"),
            "preprocessing": source.metadata.get("preprocessing"),
            # What ran the model (tflite, tensorflow; int8 is another precision): the
            # service embeds uploads the same way, and updates must match it.
            "backend": source.metadata.get("backend"),
            "precision": source.metadata.get("precision", "fp32"),
            "fidelity": source.metadata.get("fidelity"),
            "runtime_model": keep_runtime_model(source, local),
            "runtime_source": source.metadata.get("runtime"),
            "embedding_dimension": source.raw_dim,
            "dimension": source.dim,
            "metric": config.metric.value,
            # --add and --sync keep these, as they keep the training.
            "dedup_threshold": config.dedup_threshold,
            "recall_target": config.recall_target,
            "transform": transform_info,
            "count": source.count,
            "index": {"kind": fitted.plan.kind, "factory": fitted.plan.factory}
            | ({"lists": store.ON_DISK} if has_on_disk_lists(fitted.index) else {}),
            "search_params": fitted.search_params,
            "recall_at_build": report["recall"],
            "parts": [manifest_part(source)],
        } | filter_fields
        store.write_json(local, store.MANIFEST_FILE, manifest)
        # Without a transform, the evaluation queries' exact neighbours are raw cosine
        # neighbours too: they measure the duplicate pass for free.
        truth = fitted.eval_set if transform_info is None else None
        report["duplicates"] = duplicate_clusters(
            local,
            fitted.index,
            source,
            config,
            truth,
            clock.begin("duplicates", 3 * source.count, "row passes"),
        )
        clock.end()
        index_bytes = os.path.getsize(store.path(local, store.INDEX_FILE))
        if transform_info is not None:
            report["transform"] = dict(transform_info)
            if config.compare_raw and source.count > 1:
                clock.begin("raw_comparison")
                report["transform"] |= compare_with_raw(raw, source, fitted, index_bytes, config)
                clock.end()
        report |= {"seconds": clock.seconds, "index_bytes": index_bytes, "version": version.name}
        store.write_json(local, store.REPORT_FILE, report)
    return report


def keep_runtime_model(source: EmbeddingSource, version_dir: str) -> str | None:
    """A copy in the version of the model file the corpus was embedded with, when it
    is not the model itself (an int8 quantization of it): the service embeds uploads
    with it, wherever the embeddings go later. Its name in the version, or None."""
    runtime = source.metadata.get("runtime")
    if not runtime:
        return None
    storage.copy_file(runtime, store.path(version_dir, store.RUNTIME_MODEL_FILE))
    return store.RUNTIME_MODEL_FILE


def attach_transform(
    raw: EmbeddingSource, version_dir: str, config: IndexConfig
) -> tuple[EmbeddingSource, dict]:
    """Runs the tf.Transform full pass next to the embeddings, copies the graph into
    the index folder, and returns the source seen through it."""
    from imgembed.transforms.embedding_transform import EmbeddingTransform, analyze

    options = config.transform
    next_to_embeddings = storage.join(storage.parent(raw.files[0].path), options.folder_name)
    own = store.path(version_dir, store.TRANSFORM_DIR)
    analyze([f.path for f in raw.files], raw.raw_dim, options, next_to_embeddings, config.beam_args, own)
    # The version's own copy: another analysis may replace the one next to the
    # embeddings meanwhile (a distributed add stages this copy for its workers).
    transform = EmbeddingTransform(own)
    info = {
        "options": options.to_metadata(),
        "directory": store.TRANSFORM_DIR,
        "analyzed_at": next_to_embeddings,
        "input_dim": transform.input_dim,
        "output_dim": transform.output_dim,
        "explained_variance": round(transform.explained_variance(), 6),
    }
    return raw.with_transform(transform), info


def compare_with_raw(
    raw: EmbeddingSource,
    transformed: EmbeddingSource,
    fitted: FittedIndex,
    index_bytes: int,
    config: IndexConfig,
) -> dict:
    """recall@10 against exact search on the raw vectors, and index bytes, for the
    transformed index ("after") and an index of the raw vectors built the same
    way under the same budget ("before")."""
    raw_config = dataclasses.replace(config, transform=None)
    folder = tempfile.mkdtemp(prefix="imgembed-raw-index-")
    raw_fit = fit(raw, raw_config, add_locally, _Phases("raw-vector index"), folder)
    raw_bytes = (
        os.path.getsize(raw_fit.path) if raw_fit.path else int(faiss.serialize_index(raw_fit.index).nbytes)
    )
    shutil.rmtree(folder, ignore_errors=True)  # a mapped file stays readable until unmapped
    k = min(RECALL_K, raw.count - 1)
    truth = raw_fit.eval_set  # exact neighbours in the raw space
    seen_through_transform = dataclasses.replace(
        truth, vectors=prepare(transformed.take(truth.ids), config.metric, "queries")
    )
    return {
        "before": {
            "index": raw_fit.plan.factory,
            "dimension": raw.raw_dim,
            "index_bytes": raw_bytes,
            f"recall@{k}": round(recall(raw_fit.index, truth, k), 4),
        },
        "after": {
            "index": fitted.plan.factory,
            "dimension": transformed.dim,
            "index_bytes": index_bytes,
            f"recall@{k}": round(recall(fitted.index, seen_through_transform, k), 4),
            f"recall@{k}_in_transformed_space": fitted.report["recall"].get(f"recall@{k}"),
        },
        "recall_measured_against": "exact search on the raw (L2-normalised for cosine) embeddings",
    }


def manifest_part(source: EmbeddingSource) -> dict:
    return {"files": [dataclasses.asdict(file) for file in source.files]}


def duplicate_clusters(
    version_dir: str,
    index: faiss.Index,
    indexed: EmbeddingSource,
    config: IndexConfig,
    truth: QuerySet | None = None,
    phase=None,
) -> dict:
    table = pa.ipc.open_file(pa.memory_map(store.path(version_dir, items.ITEMS_FILE))).read_all()
    # The threshold is a cosine: for an l2 index, exact copies only.
    threshold = config.dedup_threshold if config.metric is Metric.COSINE else None
    path = store.path(version_dir, store.DUPLICATES_FILE)
    index_path = store.path(version_dir, store.INDEX_FILE)
    summary, cluster_of = write_duplicates(index, indexed, table, threshold, path, index_path, truth, phase)
    items.write_clusters(version_dir, cluster_of)
    return summary
