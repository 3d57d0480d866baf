"""``imgembed query``: nearest neighbours from the command line, without a server.

imgembed query --index out/index --image cat.jpg -k 5
imgembed query --index out/index --id 3f1c... --json
imgembed query --index out/index --vector '[0.1, 0.2, ...]'
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from imgembed.index.vectors import IndexInputError
from imgembed.service.searcher import Limits, QueryError, Searcher, describe_hits


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgembed query", description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="Index folder written by `imgembed index`.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--id", help="Neighbours of an indexed image, by its id.")
    what.add_argument("--image", help="Neighbours of an image file, embedded like the corpus.")
    what.add_argument("--vector", help="Neighbours of a vector: a JSON list, or @file.json / @file.npy.")
    p.add_argument("-k", type=int, default=10, help="How many neighbours (default 10).")
    p.add_argument(
        "--collapse-duplicates", action="store_true", help="One result per near-duplicate cluster."
    )
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        help="field=value: only items whose metadata field (or `source`) has this value; repeatable.",
    )
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    return p


def read_vector(text: str):
    if text.startswith("@"):
        path = pathlib.Path(text[1:])
        if path.suffix == ".npy":
            import numpy as np

            return np.load(path).reshape(1, -1)
        text = path.read_text()
    return [json.loads(text)]


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        searcher = Searcher.open(
            args.index, Limits(max_k=max(args.k, 1)), load_image_model=args.image is not None
        )
        filters = dict(pair.split("=", 1) if "=" in pair else (pair, "") for pair in args.filter)
        if args.id:
            hits = searcher.neighbours(args.id, args.k, args.collapse_duplicates, filters)
        elif args.image:
            hits = searcher.search_image(
                pathlib.Path(args.image).read_bytes(), args.k, args.collapse_duplicates, filters
            )
        else:
            hits = searcher.search_vectors(
                read_vector(args.vector), args.k, args.collapse_duplicates, filters
            )[0]
    except QueryError as error:
        print(f"imgembed query: {error.code}: {error.message}", file=sys.stderr)
        return 2
    except (IndexInputError, OSError, ValueError) as error:
        print(f"imgembed query: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"metric": searcher.metric.value, "results": hits}, indent=2))
    else:
        print(describe_hits(hits, searcher.metric.value))
    return 0
