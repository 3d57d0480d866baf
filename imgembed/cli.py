"""The ``imgembed`` command: one subcommand per stage, each in its own module.

Subcommands are imported only when run, so ``imgembed --help`` does not pay
for importing TensorFlow.
"""

from __future__ import annotations

import importlib
import sys

from imgembed import console

# subcommand: (module with main(argv) -> exit code, one-line help)
COMMANDS = {
    "embed": ("imgembed.pipelines.embed", "embed image files into Parquet with a MobileNet V1 model (Beam)"),
    "index": (
        "imgembed.index.command",
        "build a FAISS index from embeddings (or --add to one), with measured recall",
    ),
    "watch": (
        "imgembed.watch",
        "embed what is new or changed every few seconds and keep an index in step (a growing corpus)",
    ),
    "serve": ("imgembed.service.command", "serve nearest-neighbour search (HTTP + web page) over an index"),
    "query": ("imgembed.service.query", "nearest neighbours from the command line (by id, image or vector)"),
    "quantize": (
        "imgembed.models.quantize",
        "post-training int8 quantization of a model to TFLite, with a fidelity report",
    ),
    "compare": (
        "imgembed.models.compare",
        "compare model variants on the same images: speed, size, kNN agreement, top-1",
    ),
    "models": ("imgembed.models.catalogue", "list the models known by short name"),
}

USAGE = (
    "usage: imgembed <command> [flags] [-v]   (imgembed <command> --help for its flags;\n"
    "       -v/--verbose shows the logs of Beam, TensorFlow and the rest)\n\n"
    + "\n".join(f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items())
)
VERBOSE_FLAGS = ("-v", "--verbose")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], [arg for arg in argv[1:] if arg not in VERBOSE_FLAGS]
    if command not in COMMANDS:
        print(f"imgembed: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    # Before the command's module imports TensorFlow or Beam: their settings are read once.
    console.configure(verbose=len(rest) < len(argv) - 1)
    console.show_progress()
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
