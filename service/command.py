"""``imgembed serve``: the search service and its web page over an index folder.

imgembed serve --index out/index            # http://127.0.0.1:8000/ (docs at /docs)
"""

from __future__ import annotations

import argparse
import sys

from imgembed.common.units import parse_size
from imgembed.index.vectors import IndexInputError
from imgembed.service.searcher import Limits


def parser() -> argparse.ArgumentParser:
    defaults = Limits()
    p = argparse.ArgumentParser(prog="imgembed serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="Index folder written by `imgembed index`.")
    p.add_argument(
        "--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only)."
    )
    p.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    p.add_argument(
        "--max-k",
        type=int,
        default=defaults.max_k,
        help=f"Most neighbours a request may ask for ({defaults.max_k}).",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help=f"Most vectors in one search ({defaults.max_batch}).",
    )
    p.add_argument("--max-upload-bytes", default="10MiB", help="Largest uploaded image (10MiB).")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help=f"Largest decoded upload ({defaults.max_image_pixels}).",
    )
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import faiss
    import uvicorn

    from imgembed.service.app import create_app
    from imgembed.service.searcher import Searcher

    # Requests already run in parallel threads; faiss's own threads on top of
    # them would oversubscribe the cores and raise tail latency.
    faiss.omp_set_num_threads(1)
    try:
        limits = Limits(args.max_k, args.max_batch, parse_size(args.max_upload_bytes), args.max_image_pixels)
        searcher = Searcher(args.index, limits)
    except (IndexInputError, ValueError) as error:
        print(f"imgembed serve: {error}", file=sys.stderr)
        return 2
    print(
        f"Serving {searcher.count:,} images from {args.index} on http://{args.host}:{args.port}/", flush=True
    )
    uvicorn.run(create_app(searcher), host=args.host, port=args.port, log_level="warning")
    return 0
