"""The side output every DoFn sends its failed inputs to, counted by reason.

Library code raises; DoFns catch at their edge and emit one error row here, so
an input never vanishes and the job never dies for one bad file.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from imgembed.pipelines.records import error_row

ERRORS = "errors"
METRICS_NAMESPACE = "imgembed"


def dead_letter(uri: str, stage: str, reason: str, message: str) -> beam.pvalue.TaggedOutput:
    Metrics.counter(METRICS_NAMESPACE, f"errors_{reason}").inc()
    return beam.pvalue.TaggedOutput(ERRORS, error_row(uri, stage, reason, message))


def keyed_dead_letter(
    shard: str, uri: str, stage: str, reason: str, message: str
) -> beam.pvalue.TaggedOutput:
    """A dead letter of an input of an input shard: (shard key, error row)."""
    tagged = dead_letter(uri, stage, reason, message)
    return beam.pvalue.TaggedOutput(ERRORS, (shard, tagged.value))
