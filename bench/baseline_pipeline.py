"""The straightforward Beam pipeline the throughput benchmark compares against:
what a Beam user writes first with the stock pieces. Not used by imgembed.

Files -> PIL full decode, RGB, centred square crop, bilinear resize -> Beam's
stock TFModelHandlerNumpy on a SavedModel (TF_USE_LEGACY_KERAS=1, as Beam's
handler needs tf.keras 2) -> dict rows -> WriteToParquet, on the local runner with
one worker process per core, as imgembed runs (Beam's DirectRunner alone would use
one process, and the comparison would not be like with like).

    python bench/baseline_pipeline.py INPUT_GLOB OUTPUT_PREFIX SAVED_MODEL_DIR SIZE
"""

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"


def decode(readable_file, size):
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(readable_file.read())).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    return readable_file.metadata.path, np.asarray(image, np.float32) / 255.0


def main(pattern: str, output: str, saved_model: str, size: int) -> None:
    import apache_beam as beam
    import numpy as np
    import pyarrow as pa
    from apache_beam.io import fileio
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy
    from apache_beam.options.pipeline_options import PipelineOptions

    schema = pa.schema([("uri", pa.string()), ("embedding", pa.list_(pa.float32()))])
    every_core = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=0"]
    with beam.Pipeline(options=PipelineOptions(every_core)) as pipeline:
        _ = (
            pipeline
            | fileio.MatchFiles(pattern)
            | fileio.ReadMatches()
            | beam.Map(decode, size)
            | RunInference(KeyedModelHandler(TFModelHandlerNumpy(saved_model)))
            | beam.MapTuple(
                lambda uri, result: {"uri": uri, "embedding": np.asarray(result.inference).tolist()}
            )
            | beam.io.WriteToParquet(output, schema, file_name_suffix=".parquet")
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
