"""Schedulers as data: one record per kind drives pools, job scripts, job ids and queue queries;
nbpipe's defaults come from its packaged nbpipe.yaml through dask.config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import pytest

from nbpipe.config import DEFAULTS, DEFAULTS_PATH
from nbpipe.errors import ConfigError
from nbpipe.pools import KINDS, parse_pools
from nbpipe.schedulers import BATCH_KINDS, SCHEDULERS

BASE = {"cores": 2, "memory": "2GB"}


def test_every_batch_kind_has_a_record_and_a_dask_jobqueue_class() -> None:
    import dask_jobqueue

    assert set(KINDS) == set(BATCH_KINDS) == {"slurm", "pbs", "sge", "lsf", "htcondor"}
    for kind, name in BATCH_KINDS.items():
        assert hasattr(dask_jobqueue, name), kind
    assert not SCHEDULERS["local"].batch


@pytest.mark.parametrize("kind", sorted(BATCH_KINDS))
def test_gpus_are_asked_for_as_the_kinds_record_says(kind: str) -> None:
    record = SCHEDULERS[kind]
    directives = parse_pools({"kind": kind, **BASE, "gpus": 2})[0].job_kwargs["job_extra_directives"]
    if record.gpu_key:
        assert directives[record.gpu_key] == "2"
    elif record.gpu_directive:
        assert record.gpu_directive.format(gpus=2) in directives
    else:  # no one way on this kind (SGE): nothing invented
        assert not any("gpu" in str(d) for d in directives)


@pytest.mark.parametrize("kind", sorted(BATCH_KINDS))
def test_walltimes_are_written_and_read_in_the_kinds_format(kind: str) -> None:
    record = SCHEDULERS[kind]
    pool = parse_pools({"kind": kind, **BASE, "walltime": 5400})[0]
    assert pool.walltime == 5400
    if record.has_walltime:
        assert pool.job_kwargs["walltime"] == ("01:30" if record.walltime_minutes else "01:30:00")
    else:
        assert "walltime" not in pool.job_kwargs
    if record.walltime_minutes:  # its own short form is understood
        assert parse_pools({"kind": kind, **BASE, "walltime": "2:15"})[0].walltime == 8100


@pytest.mark.parametrize("kind", sorted(BATCH_KINDS))
def test_a_parallel_environment_is_taken_only_where_the_record_has_one(kind: str) -> None:
    spec = {"kind": kind, **BASE, "parallel_environment": "smp"}
    if SCHEDULERS[kind].parallel_environment:
        assert "-pe smp 2" in parse_pools(spec)[0].job_kwargs["job_extra_directives"]
    else:
        with pytest.raises(Exception, match="parallel_environment='smp' is for SGE only"):
            parse_pools(spec)


@pytest.mark.parametrize("kind", sorted(BATCH_KINDS))
def test_a_task_knows_its_batch_job_id_on_every_kind(kind: str) -> None:
    variable = SCHEDULERS[kind].job_id_variable
    env = {k: v for k, v in os.environ.items()
           if k not in {s.job_id_variable for s in SCHEDULERS.values()}}
    env[variable] = "4242"
    out = subprocess.run([sys.executable, "-c", "from nbpipe.context import batch_job_id; "
                          "print(batch_job_id())"], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "4242"


def test_only_kinds_with_a_queue_query_are_queried() -> None:
    from nbpipe.jobs import queue_states

    for kind, record in SCHEDULERS.items():
        if record.queue_query is None:
            assert queue_states(kind, ["1"]) is None, kind


def test_defaults_come_from_the_packaged_nbpipe_yaml_through_dask_config() -> None:
    assert DEFAULTS_PATH.name == "nbpipe.yaml" and DEFAULTS_PATH.parent.name == "nbpipe"
    shown = subprocess.run([sys.executable, "-c", "import nbpipe, dask; "
                            "print(dask.config.get('nbpipe.max-jobs'), "
                            "dask.config.get('nbpipe.idle-timeout'))"],
                           capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert shown == [str(DEFAULTS["max-jobs"]), DEFAULTS["idle-timeout"]]
    assert parse_pools({"kind": "slurm", **BASE})[0].max_jobs == DEFAULTS["max-jobs"]


def test_a_setting_changes_a_default_and_is_checked(tmp_path: Path) -> None:
    with dask.config.set({"nbpipe.max-jobs": 3, "nbpipe.min-jobs": 1}):
        pool = parse_pools({"kind": "slurm", **BASE})[0]
        assert (pool.max_jobs, pool.min_jobs) == (3, 1)
        assert parse_pools({"kind": "slurm", **BASE, "max_jobs": 5})[0].max_jobs == 5  # spec wins
    with dask.config.set({"nbpipe.max-jobs": 0}), pytest.raises(ConfigError, match="max-jobs=0"):
        parse_pools({"kind": "slurm", **BASE})
