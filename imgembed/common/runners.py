"""Which Beam runner a job gets, and what that implies for it.

Without ``--runner`` a job runs locally on every core (Beam's DirectRunner alone uses
one). Local workers are processes of this machine: they share its disk and its cores.
"""

from __future__ import annotations

import os

DEFAULT_RUNNER_ARGS = [
    "--runner=DirectRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=0",
]
LOCAL_RUNNERS = (None, "DirectRunner", "FnApiRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner")


def with_default_runner(args: list[str]) -> list[str]:
    return args if any(arg.startswith("--runner") for arg in args) else [*args, *DEFAULT_RUNNER_ARGS]


def local_workers(options) -> int | None:
    """Worker processes of the local runner; None for any other runner."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        return None
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return 1
    return (os.cpu_count() or 1) if direct.direct_num_workers == 0 else max(1, direct.direct_num_workers)
