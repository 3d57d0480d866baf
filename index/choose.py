"""Which FAISS index fits a corpus: from its size, dimension and a memory budget.

The budget is the RAM a loaded index may use (autofaiss's "max index memory").
From the most exact to the most compressed, the first kind that fits wins:

| kind | factory | RAM bytes per vector | when |
|---|---|---|---|
| flat | ``Flat`` | 4d | up to FLAT_MAX_VECTORS: exact, no training |
| hnsw | ``HNSW32`` | 4d + 2*32*4 | up to HNSW_MAX_VECTORS: fastest queries, no training |
| ivf_flat | ``IVF{nlist},Flat`` | 4d + 8 | raw vectors fit in RAM |
| ivf_sq8 | ``IVF{nlist},SQ8`` | d + 8 | 8-bit codes fit: recall ~0.98 with enough lists probed |
| ivf_pq_rflat | ``IVF{nlist},PQ{m}x4fs,RFlat`` | m/2 + 8 | 4-bit product codes in RAM find candidates; the raw vectors stay on disk (memory-mapped) and re-rank them |

When the chosen kind misses the recall target, ``fallback`` names the next to try
(``ivf_sq8`` -> ``ivf_sq8_rflat``: the same codes, re-ranked from disk).

>>> choose_index(100_000, 256, parse_size("50M")).kind
'ivf_sq8'
"""

from __future__ import annotations

import dataclasses
import math

from imgembed.common.units import format_size

FLAT_MAX_VECTORS = 100_000
HNSW_MAX_VECTORS = 1_000_000
HNSW_M = 32
# Room for the quantiser, list headers and allocator slack on top of the codes.
OVERHEAD = 1.10
ID_BYTES = 8
# faiss warns below 39 training points per centroid; 64 gives stable centroids.
MIN_POINTS_PER_CENTROID = 39
POINTS_PER_CENTROID = 64
MAX_LISTS = 2**18
# The training sample may take this share of the memory budget (the index being
# built takes the rest); a budget too small for 39 points a list gets fewer lists.
TRAIN_SHARE_OF_BUDGET = 0.5
# From this many lists, the coarse quantizer is an HNSW graph over the centroids.
# The service searches queries in batches, where a flat quantizer is one matrix
# product: per query, 128 at a time, one thread, 8 lists out of 2,048 x 1024-d cost
# 0.04 ms flat against 0.18 ms HNSW32 (efSearch 32); at 8,192 x 256-d, 0.31 against
# 0.08 (choosing among that many centroids dominates). 4,096 is about where they cross.
HNSW_QUANTIZER_MIN_LISTS = 4096


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    kind: str
    factory: str
    estimated_bytes: int
    train_size: int
    reason: str

    @property
    def needs_training(self) -> bool:
        return self.train_size > 0

    @property
    def is_ivf(self) -> bool:
        return self.kind.startswith("ivf")


def kind_of_factory(factory: str) -> str:
    """The kind (as in the table above) an index_factory string builds, or "custom"."""
    if factory == "Flat":
        return "flat"
    if factory.startswith("HNSW"):
        return "hnsw"
    if factory.startswith("IVF"):
        for suffix, kind in (
            (",Flat", "ivf_flat"),
            (",SQ8", "ivf_sq8"),
            (",SQ8,RFlat", "ivf_sq8_rflat"),
            ("fs,RFlat", "ivf_pq_rflat"),
        ):
            if factory.endswith(suffix):
                return kind
        return "ivf_custom"
    return "custom"


def nlist_for(count: int) -> int:
    """About 4 sqrt(n) lists (a power of two), with at least 39 points to train each."""
    target = 4 * math.sqrt(count)
    nlist = 2 ** round(math.log2(max(target, 1)))
    return int(max(16, min(nlist, MAX_LISTS, count // MIN_POINTS_PER_CENTROID)))


@dataclasses.dataclass(frozen=True)
class IvfSizing:
    nlist: int
    train_size: int
    quantizer: str  # "" (flat) or "_HNSW32", as index_factory spells it
    reason: str


def ivf_sizing(count: int, dim: int, max_memory: int) -> IvfSizing:
    """Lists and training sample: 64 points a list where the sample fits its share of
    the budget, at least 39 (faiss's minimum), and fewer lists when even that does
    not fit, so the sample always trains every centroid."""
    nlist = nlist_for(count)
    wanted = nlist
    affordable = int(max_memory * TRAIN_SHARE_OF_BUDGET / (dim * 4))
    while nlist > 16 and min(count, nlist * MIN_POINTS_PER_CENTROID) > affordable:
        nlist //= 2
    train = min(count, nlist * POINTS_PER_CENTROID, max(affordable, nlist * MIN_POINTS_PER_CENTROID))
    quantizer = f"_HNSW{HNSW_M}" if nlist >= HNSW_QUANTIZER_MIN_LISTS else ""
    reason = f"{nlist:,} lists trained on {train:,} vectors ({train // nlist} a list)"
    if nlist < wanted:
        reason += f"; {wanted:,} lists would need a sample over half the budget"
    if quantizer:
        reason += "; an HNSW graph finds the lists to probe"
    return IvfSizing(nlist, train, quantizer, reason)


def choose_index(count: int, dim: int, max_memory: int) -> IndexPlan:
    raw = count * dim * 4
    budget = f"{format_size(max_memory)} budget"

    def fits(bytes_per_vector: float) -> bool:
        return count * bytes_per_vector * OVERHEAD <= max_memory

    def plan(kind: str, factory: str, bytes_per_vector: float, train: int, why: str) -> IndexPlan:
        return IndexPlan(kind, factory, int(count * bytes_per_vector * OVERHEAD), train, why)

    if count <= FLAT_MAX_VECTORS and fits(4 * dim):
        return plan(
            "flat",
            "Flat",
            4 * dim,
            0,
            f"{count:,} vectors: exact search is fast at this size and needs no training; "
            f"the raw vectors ({format_size(raw)}) fit the {budget}",
        )
    hnsw_bytes = 4 * dim + 2 * HNSW_M * 4
    if count <= HNSW_MAX_VECTORS and fits(hnsw_bytes):
        return plan(
            "hnsw",
            f"HNSW{HNSW_M}",
            hnsw_bytes,
            0,
            f"{count:,} vectors: too many for fast exact search, few enough for an HNSW graph "
            f"(fastest queries) over raw vectors, which fit the {budget}",
        )
    sizing = ivf_sizing(count, dim, max_memory)
    if sizing.train_size < sizing.nlist * MIN_POINTS_PER_CENTROID:
        # Fewer than faiss's 39 points a list: lists of a few points each, not an index.
        flat = count * 4 * dim * OVERHEAD
        sample = sizing.nlist * MIN_POINTS_PER_CENTROID * dim * 4 / TRAIN_SHARE_OF_BUDGET
        need = flat if count < sizing.nlist * MIN_POINTS_PER_CENTROID else sample
        raise ValueError(
            f"--max-memory {format_size(max_memory)} is too small for an index of {count:,} vectors of "
            f"{dim} dimensions (it could not even train {sizing.nlist} lists on 39 points each); "
            f"give it at least {format_size(need)}"
        )
    ivf_train, lists = sizing.train_size, f"IVF{sizing.nlist}{sizing.quantizer}"

    def ivf_plan(kind: str, factory: str, bytes_per_vector: float, why: str) -> IndexPlan:
        return plan(kind, factory, bytes_per_vector, ivf_train, f"{why}; {sizing.reason}")

    if fits(4 * dim + ID_BYTES):
        return ivf_plan(
            "ivf_flat",
            f"{lists},Flat",
            4 * dim + ID_BYTES,
            f"{count:,} vectors: too many for an HNSW graph to build quickly; the raw vectors "
            f"({format_size(raw)}) fit the {budget}: inverted lists of exact vectors",
        )
    if fits(dim + ID_BYTES):
        return ivf_plan(
            "ivf_sq8",
            f"{lists},SQ8",
            dim + ID_BYTES,
            f"{count:,} vectors: raw vectors ({format_size(raw)}) exceed the {budget}; "
            f"8-bit scalar codes ({dim} bytes a vector) keep recall close to exact",
        )
    for m in _pq_subquantizers(dim):
        if fits(m / 2 + ID_BYTES):
            return ivf_plan(
                "ivf_pq_rflat",
                f"{lists},PQ{m}x4fs,RFlat",
                m / 2 + ID_BYTES,
                f"{count:,} vectors: even 8-bit codes exceed the {budget}; {m // 2}-byte product codes "
                f"in RAM find candidates and the raw vectors, memory-mapped from disk "
                f"({format_size(raw)}), re-rank them",
            )
    need = count * (2 + ID_BYTES) * OVERHEAD
    raise ValueError(
        f"--max-memory {max_memory:,} bytes cannot hold {count:,} vectors in any index; "
        f"at least {need / 1e6:,.0f} MB is needed"
    )


def fallback(plan: IndexPlan, count: int, dim: int, max_memory: int) -> IndexPlan | None:
    """The kind to try when ``plan`` missed the recall target under its budget, or
    None. IVF,Flat and the re-ranked kinds reach exact search at their last
    setting (every list probed, raw vectors re-ranking), so only approximate
    distances can miss: SQ8 codes between near-ties are re-ranked with the raw
    vectors from disk at no RAM cost, and an HNSW graph gives way to exact lists."""
    sizing = ivf_sizing(count, dim, max_memory)
    lists = f"IVF{sizing.nlist}{sizing.quantizer}"
    if plan.kind == "ivf_sq8":
        return IndexPlan(
            "ivf_sq8_rflat",
            f"{lists},SQ8,RFlat",
            plan.estimated_bytes,
            sizing.train_size,
            "ivf_sq8 missed the recall target: the same 8-bit codes in RAM find candidates and the raw "
            "vectors, memory-mapped from disk, re-rank them",
        )
    if plan.kind == "hnsw" and count * (4 * dim + ID_BYTES) * OVERHEAD <= max_memory:
        return IndexPlan(
            "ivf_flat",
            f"{lists},Flat",
            int(count * (4 * dim + ID_BYTES) * OVERHEAD),
            sizing.train_size,
            f"hnsw missed the recall target: inverted lists of exact vectors; {sizing.reason}",
        )
    return None


def _pq_subquantizers(dim: int) -> list[int]:
    """Even sub-quantizer counts dividing d for 4-bit fast-scan PQ, largest first,
    from d/4 (4 dims each, 2 bits a dim) down to 4."""
    return [m for m in range(dim // 4, 3, -1) if dim % m == 0 and m % 2 == 0]
