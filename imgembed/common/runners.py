"""Which Beam runner a job gets, and what that implies for it.

Without ``--runner`` a job runs locally on every core (Beam's DirectRunner alone uses
one). Local workers are processes of this machine: they share its disk and its cores.
``--runner=DaskRunner`` names Beam's Dask runner (Beam itself takes only its module
path), on a ``dask.distributed`` cluster given by ``--dask_client_address``.
"""

from __future__ import annotations

import os

DEFAULT_RUNNER_ARGS = [
    "--runner=DirectRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=0",
]
LOCAL_RUNNERS = (None, "DirectRunner", "FnApiRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner")
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def with_default_runner(args: list[str]) -> list[str]:
    """The local runner on every core unless ``--runner`` names one."""
    args = [_full_runner_name(before, arg) for before, arg in _pairs(args)]
    return args if any(arg.startswith("--runner") for arg in args) else [*args, *DEFAULT_RUNNER_ARGS]


def _full_runner_name(before: str | None, arg: str) -> str:
    if arg == "--runner=DaskRunner":
        return f"--runner={DASK_RUNNER}"
    return DASK_RUNNER if before == "--runner" and arg == "DaskRunner" else arg


def _pairs(args: list[str]):
    return zip([None, *args][: len(args)], args, strict=True)


def local_workers(options) -> int | None:
    """Worker processes of the local runner; None for any other runner."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        return None
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return 1
    return (os.cpu_count() or 1) if direct.direct_num_workers == 0 else max(1, direct.direct_num_workers)


def spread_over(args: list[str], parts: int) -> list[str]:
    """Beam flags for a job whose first step creates ``parts`` elements to spread over
    the workers. Runners that shuffle after that step need nothing; Beam's DaskRunner
    does not shuffle (its Reshuffle is a no-op) and makes one task of each of a
    Create's ``--dask_npartitions``: one per element, unless the flag says otherwise."""
    runner = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--runner=")), None)
    runner = runner or next((arg for before, arg in _pairs(args) if before == "--runner"), None)
    if runner != DASK_RUNNER or any(
        arg.startswith(("--dask_npartitions", "--dask_partition_size")) for arg in args
    ):
        return args
    return [*args, f"--dask_npartitions={parts}"]


def close_client(result) -> None:
    """Closes the cluster client a finished job holds (DaskRunner's result keeps one
    open, which then tries to reach the scheduler for as long as the process lives)."""
    client = getattr(result, "client", None)
    if client is not None:
        client.close()
