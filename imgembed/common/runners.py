"""Which Beam runner a job gets, and what that implies for it.

Without ``--runner`` a job runs locally on every core (Beam's DirectRunner alone uses
one). Local workers are processes of this machine: they share its disk and its cores.
``--runner=DaskRunner`` names Beam's Dask runner (Beam itself takes only its module
path), on a ``dask.distributed`` cluster given by ``--dask_client_address``.
"""

from __future__ import annotations

import logging
import os
import sys

DEFAULT_RUNNER_ARGS = [
    "--runner=DirectRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=0",
]
LOCAL_RUNNERS = (None, "DirectRunner", "FnApiRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner")
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
NO_DASK_PROFILER = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"

_log = logging.getLogger(__name__)


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


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``args``."""
    given = next((arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}=")), None)
    return given or next((arg for before, arg in _pairs(args) if before == name), None)


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
    if _flag(args, "--runner") != DASK_RUNNER or any(
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


def warn_of_stalling_dask_workers(args: list[str]) -> None:
    """Warns when the Dask cluster ``args`` name has workers that can stall: Dask's
    statistical profiler calls sys._current_frames() every 10 ms, which on CPython
    3.11 now and then deadlocks the worker (CPython gh-106883; seen with 3.11.7)
    until the scheduler restarts it after worker-ttl (5 minutes). Its tasks then run
    again elsewhere, so nothing is lost but time."""
    address = _flag(args, "--dask_client_address")
    if _flag(args, "--runner") != DASK_RUNNER or not address:
        return
    from distributed import Client

    try:
        with Client(address, timeout=30) as client:
            at_risk = [worker for worker, risky in client.run(profiler_can_deadlock).items() if risky]
    except Exception as error:  # the job's own start says what is wrong with the cluster
        _log.debug("could not ask the Dask workers about their profiler: %s", error)
        return
    if at_risk:
        _log.warning(
            "Dask's statistical profiler runs on %d worker(s) on CPython 3.11, where it can "
            "freeze a worker for minutes (CPython gh-106883): start workers with %s "
            "(scripts/dask_cluster.sh does)",
            len(at_risk),
            NO_DASK_PROFILER,
        )


def profiler_can_deadlock() -> bool:
    """On a Dask worker: whether its profiler runs on a CPython that it can deadlock."""
    import dask

    return sys.version_info[:2] == (3, 11) and bool(dask.config.get("distributed.worker.profile.enabled"))
