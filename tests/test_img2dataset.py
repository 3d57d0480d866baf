"""Real img2dataset output, end to end: its WebDataset shards (and the side files it
writes beside them) are embedded, indexed and served, and every hit carries the
caption and url img2dataset recorded."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from fixtures.images import photo_like
from imgembed.index import command as index_command
from imgembed.pipelines import embed
from tests.conftest import require_tool
from tests.gcs import TOOLS
from tests.servers import serve

IMG2DATASET = TOOLS / "img2dataset" / "bin" / "python"
# img2dataset's processes re-run the main module: it must be a file with a main guard.
DOWNLOAD = """
import sys
from img2dataset import download

if __name__ == "__main__":
    download(
        url_list=sys.argv[1],
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=sys.argv[2],
        processes_count=1,
        thread_count=4,
        image_size=128,
        number_sample_per_shard=10,
        save_additional_columns=["label"],
        disable_all_reencoding=False,
    )
"""


def test_img2dataset_shards_keep_their_captions_and_urls_through_search(tiny_model_dir, tmp_path):
    require_tool(IMG2DATASET, "img2dataset")
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    for number in range(25):
        path = photos / f"{number:02d}.jpg"
        photo_like(100 + number, 200, 150).save(path, "JPEG", quality=90)
        rows.append({"url": f"file://{path}", "caption": f"photo number {number}", "label": number % 3})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    script = tmp_path / "download.py"
    script.write_text(DOWNLOAD)
    shards = tmp_path / "shards"
    done = subprocess.run(
        [str(IMG2DATASET), str(script), str(tmp_path / "urls.parquet"), str(shards)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(os.listdir(shards))
    assert any(name.endswith(".tar") for name in names) and any(
        name.endswith("_stats.json") for name in names
    )
    assert any(name.endswith(".parquet") for name in names)  # its metadata beside each tar

    out = tmp_path / "out"
    summary = embed.run(
        [f"--input={shards}", f"--output={out}", f"--model={tiny_model_dir}", "--runner=DirectRunner"]
    )
    # Only the images: no error row for the stats or the metadata Parquet files.
    assert summary.inputs == summary.models[0].rows == 25 and summary.errors_total == 0
    assert (
        index_command.main(["--embeddings", str(out / "tiny_mobilenet_64"), "--output", str(out / "index")])
        == 0
    )
    with serve(out / "index", "--workers", "1") as url:
        with open(photos / "07.jpg", "rb") as image:
            hits = httpx.post(f"{url}/v1/search/image", files={"image": image}, params={"k": 5}).json()[
                "results"
            ]
        assert len(hits) == 5
        by_url = {row["url"]: row["caption"] for row in rows}
        for hit in hits:
            assert by_url[hit["metadata"]["url"]] == hit["metadata"]["caption"]
            assert hit["metadata"]["key"]
        top = hits[0]["metadata"]
        assert top["url"] == f"file://{photos / '07.jpg'}" and top["caption"] == "photo number 7"
        item = httpx.get(f"{url}/v1/items/{hits[0]['id']}").json()
        assert item["source"].endswith(".tar") and json.dumps(item["metadata"])
