"""Choosing a cluster, worker pools and the job scripts of every batch scheduler (no scheduler runs).

The Slurm path is run for real in test_slurm.py; PBS, SGE, LSF and HTCondor are checked through
the job scripts dask-jobqueue would submit.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import dask
import pytest

from nbpipe import ClusterError, ConfigError, Pipeline, ResourceError, TaskDefinitionError, task
from nbpipe import config as nbconfig
from nbpipe.cluster import parse_words, resolve_spec, validate
from nbpipe.pools import PoolCluster, cluster_class, default_lifetime, parse_pools
from nbpipe.store import SCHEMA_VERSION, Store

cluster_class("slurm")  # dask-jobqueue's defaults join dask.config before clean_config saves it


@pytest.fixture(autouse=True)
def clean_config():
    """nbpipe.yaml files merge into the global dask.config: put it back after each test."""
    saved = copy.deepcopy(dask.config.config)
    loaded = set(nbconfig._loaded)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)
    nbconfig._loaded.clear()
    nbconfig._loaded.update(loaded)


def test_command_line_words_become_a_cluster_spec() -> None:
    spec = parse_words(["slurm", "cores=4", "memory=16GB", "max_jobs=3", "queue=short",
                        "pools={big: {cores: 8, memory: 64GB}}", "job-script-prologue=[module load x]"])
    assert spec == {"kind": "slurm", "cores": 4, "memory": "16GB", "max_jobs": 3, "queue": "short",
                    "pools": {"big": {"cores": 8, "memory": "64GB"}},
                    "job_script_prologue": ["module load x"]}
    assert parse_words(["tcp://127.0.0.1:8786"]) == "tcp://127.0.0.1:8786"
    assert parse_words([]) is None
    with pytest.raises(ClusterError, match="KEY=VALUE"):
        parse_words(["slurm", "cores"])
    with pytest.raises(ClusterError, match="takes no options"):
        parse_words(["tcp://127.0.0.1:8786", "cores=1"])
    with pytest.raises(ClusterError, match="need a kind first"):
        parse_words(["cores=1"])


@pytest.mark.parametrize(("cluster", "message"), [
    ("slurmm", "not something nbpipe can run on.*slurm, pbs, sge, lsf, htcondor"),
    ({"kind": "torque"}, "needs a 'kind'"),
    ({"kind": "slurm"}, "say how many cores and how much memory"),
    ({"kind": "slurm", "cores": 1, "memory": "lots"}, "memory='lots' is not a size"),
    ({"kind": "slurm", "cores": 0, "memory": "1GB"}, "cores=0 must be an integer >= 1"),
    ({"kind": "slurm", "cores": 1, "memory": "1GB", "processes": 2}, "one worker per job"),
    ({"kind": "slurm", "cores": 1, "memory": "1GB", "walltime": "soon"}, "walltime='soon' is not a duration"),
    ({"kind": "slurm", "cores": 1, "memory": "1GB", "min_jobs": 3, "max_jobs": 2}, "min_jobs=3 is more"),
    ({"kind": "slurm", "cores": 1, "memory": "1GB", "pools": {"a b": {}}}, "pool name 'a b'"),
    ({"kind": "slurm", "cores": 1, "memory": "1GB", "pools": {"x": {"kind": "pbs"}}}, "one batch scheduler"),
    ({"kind": "slurm", "cores": 1, "memory": "1GB", "idle_timeout": "never"}, "idle_timeout='never'"),
    ({"kind": "slurm", "cores": 1, "memory": "1GB", "parallel_environment": "smp"}, "for SGE only"),
    ({"kind": "local", "cores": 2}, "takes only 'workers'"),
    ({"kind": "local", "workers": 0}, "workers=0 must be an integer >= 1"),
])
def test_bad_cluster_values_are_refused_when_the_pipeline_is_made(tmp_path: Path, cluster, message) -> None:
    with pytest.raises(ClusterError, match=message):
        Pipeline("bad", store=tmp_path / ".nbpipe", cluster=cluster)


def test_nbpipe_yaml_beside_the_project_configures_the_cluster(tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "project"
    (project / "analysis").mkdir(parents=True)
    (project / "nbpipe.yaml").write_text(
        "cluster:\n  kind: pbs\n  cores: 4\n  memory: 16GB\n  queue: short\n  max_jobs: 3\n"
    )
    monkeypatch.chdir(project / "analysis")  # found from a subdirectory too
    spec = validate("pbs")
    assert spec == {"kind": "pbs", "cores": 4, "memory": "16GB", "queue": "short", "max_jobs": 3}
    assert validate({"kind": "pbs", "queue": "long"})["queue"] == "long"  # arguments win
    assert validate(None)["kind"] == "pbs"  # the configured cluster is the default
    with dask.config.set({"nbpipe.cluster": "local"}):  # dask.config.set wins over the file
        assert validate(None) == {"kind": "local"}
    assert resolve_spec("slurm") == {"kind": "slurm"}  # another kind takes nothing from it


def test_a_broken_nbpipe_yaml_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "nbpipe.yaml").write_text("cluster: [unclosed\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="nbpipe.yaml: cannot read it as YAML"):
        validate(None)
    (tmp_path / "nbpipe.yaml").write_text("- just\n- a list\n")
    nbconfig._loaded.clear()
    with pytest.raises(ConfigError, match="must hold a mapping"):
        validate(None)


def test_pools_inherit_the_top_level_options() -> None:
    pools = parse_pools({"kind": "slurm", "cores": 1, "memory": "2GB", "walltime": "02:00:00",
                         "queue": "short", "max_jobs": 4,
                         "pools": {"bigmem": {"cores": 4, "memory": "64GB", "max_jobs": 2},
                                   "gpu": {"cores": 8, "memory": "32GB", "gpus": 1}}})
    default, bigmem, gpu = pools
    assert (default.cores, default.memory, default.max_jobs) == (1, 2_000_000_000, 4)
    assert (bigmem.cores, bigmem.memory, bigmem.max_jobs) == (4, 64_000_000_000, 2)
    assert bigmem.job_kwargs["queue"] == "short" and bigmem.walltime == 7200
    assert gpu.gpus == 1 and "--gres=gpu:1" in gpu.job_kwargs["job_extra_directives"]
    assert "pool-bigmem=4" in " ".join(bigmem.job_kwargs["worker_extra_args"])
    # workers retire before the walltime, a little apart
    lifetime, stagger = default_lifetime(7200)
    assert lifetime == 7200 - 300 and stagger == 75
    assert "--lifetime 6900s" in " ".join(default.job_kwargs["worker_extra_args"])


JOB_OPTIONS = {
    "slurm": ({"queue": "short", "account": "astro", "walltime": "01:30:00",
               "job_extra_directives": ["--constraint=haswell"]},
              ["#SBATCH -p short", "#SBATCH -A astro", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=4G",
               "#SBATCH -t 01:30:00", "#SBATCH --gres=gpu:1", "#SBATCH --constraint=haswell"]),
    "pbs": ({"queue": "short", "account": "astro", "walltime": "01:30:00",
             "job_extra_directives": ["-m abe"]},
            ["#PBS -q short", "#PBS -A astro", "#PBS -l select=1:ncpus=2:mem=3815MB",
             "#PBS -l walltime=01:30:00", "#PBS -l ngpus=1", "#PBS -m abe"]),
    "sge": ({"queue": "short", "project": "astro", "walltime": "01:30:00", "resource_spec": "h_vmem=4G",
             "parallel_environment": "smp"},
            ["#$ -q short", "#$ -P astro", "#$ -l h_vmem=4G", "#$ -l h_rt=01:30:00", "#$ -pe smp 2"]),
    "lsf": ({"queue": "short", "project": "astro", "walltime": "01:30"},
            ["#BSUB -q short", '#BSUB -P "astro"', "#BSUB -n 2", "#BSUB -M 4000000", "#BSUB -W 01:30",
             '#BSUB -gpu "num=1"']),
    "htcondor": ({"disk": "1GB", "walltime": "01:30:00"},
                 ["MY.DaskWorkerCores = 2", "MY.DaskWorkerMemory = 4000000000", "request_gpus = 1"]),
}


@pytest.mark.parametrize("kind", sorted(JOB_OPTIONS))
def test_job_scripts_carry_the_requested_resources_and_options(kind: str, tmp_path: Path) -> None:
    options, expected = JOB_OPTIONS[kind]
    spec = {"kind": kind, "cores": 2, "memory": "4GB", "gpus": 1,
            "job_script_prologue": ["module load python/3.11"], **options}
    pools = parse_pools(spec, tmp_path)
    cluster = PoolCluster(pools, store_dir=tmp_path)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in expected:
        assert line in script, f"{line!r} missing from the {kind} job script:\n{script}"
    assert "module load python/3.11" in script
    assert "--resources cores=2,memory=4e+09,pool-default=2,gpus=1" in script
    assert "--lifetime 5100s --lifetime-stagger 75s" in script  # 90 min less a margin of 5 min
    assert "tls://" in script and "--tls-key" in script  # TLS by default
    assert "--nthreads 2" in script  # one worker per job, with all its cores
    assert str(tmp_path / "tls") in script  # certificates on the store's (shared) file system


def test_tls_can_be_turned_off(tmp_path: Path) -> None:
    cluster = PoolCluster(parse_pools({"kind": "pbs", "cores": 1, "memory": "1GB"}), security=False)
    try:
        assert cluster.address.startswith("tcp://")
        assert "--tls" not in cluster.job_script()
    finally:
        cluster.close()


def test_a_task_no_pool_can_hold_fails_before_anything_is_submitted(tmp_path: Path) -> None:
    pipe = Pipeline("too-big", store=tmp_path / ".nbpipe",
                    cluster={"kind": "pbs", "cores": 2, "memory": "4GB", "walltime": "01:00:00",
                             "pools": {"bigmem": {"cores": 4, "memory": "64GB"}}})

    @pipe.task(cores=8)
    def huge() -> int:
        return 1

    @pipe.task(memory="8GB", pool="default")
    def pinned() -> int:
        return 2

    @pipe.task(pool="gpu")
    def nowhere() -> int:
        return 3

    @pipe.task(walltime="02:00:00")
    def too_long() -> int:
        return 4

    try:
        refs = [huge(), pinned(), nowhere(), too_long()]
        with pytest.raises(ResourceError, match=r"task 'huge' needs cores=8, more than the largest pool "
                                                r"bigmem: pbs jobs of 4 cores"):
            pipe.run(refs[0])
        with pytest.raises(ResourceError, match=r"task 'pinned' needs .*memory=7.45 GiB.*more than pool "
                                                r"default: pbs jobs of 2 cores"):
            pipe.run(refs[1])
        with pytest.raises(ResourceError, match=r"task 'nowhere': pool='gpu' is not a pool of this "
                                                r"cluster; its pools are default, bigmem"):
            pipe.run(refs[2])
        with pytest.raises(ResourceError, match=r"task 'too_long' needs .*walltime=02:00:00.*lifetime "
                                                r"00:55:00"):
            pipe.run(refs[3])
        assert all(r.state.value == "WAITING" and r.attempts == 0 for r in refs)
        assert pipe.store.jobs(pipe.pipeline_id) == []
    finally:
        pipe.close()


def test_retry_memory_factor_is_validated() -> None:
    with pytest.raises(TaskDefinitionError, match="retry_memory_factor=0.5 must be a number >= 1"):
        task(retry_memory_factor=0.5)(lambda: 1)
    assert task(retry_memory_factor=1.5)(lambda: 1).opts.retry_memory_factor == 1.5


def test_stores_of_schema_1_gain_job_ids_and_the_jobs_table(tmp_path: Path) -> None:
    path = tmp_path / ".nbpipe"
    path.mkdir()
    conn = sqlite3.connect(path / "nbpipe.sqlite")
    conn.executescript("""
        CREATE TABLE attempts (pipeline_id INTEGER, key TEXT, number INTEGER, slurm_job_id TEXT);
        INSERT INTO attempts VALUES (1, 'k', 1, '4242');
        PRAGMA user_version = 1;
    """)
    conn.close()
    store = Store(path)
    row = store.connect().execute("SELECT job_id FROM attempts").fetchone()
    assert row[0] == "4242"
    assert store.connect().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.add_jobs(1, "slurm", [("7", "default", "default-1")])
    store.end_jobs(1, "slurm", [("7", "TIMEOUT")])
    assert [tuple(r)[2:] for r in store.jobs(1)][0][-1] == "TIMEOUT"
    assert not store.jobs(1, open_only=True)


def test_nbpipe_cluster_previews_job_scripts_without_submitting(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nbpipe.cli", "cluster", "pbs", "cores=2", "memory=4GB", "queue=short",
         "pools={big: {cores: 8, memory: 64GB}}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "# pool default: pbs jobs of 2 cores" in out.stdout and "# pool big: pbs jobs of 8" in out.stdout
    assert out.stdout.count("#PBS -q short") == 2
    assert not list(tmp_path.iterdir())  # no certificate files left in the working directory
    bad = subprocess.run([sys.executable, "-m", "nbpipe.cli", "cluster", "pbs", "cores=2"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "how much memory" in bad.stderr


def test_nbpipe_show_without_a_task_shows_the_pipelines_jobs(tmp_path: Path) -> None:
    store = Store(tmp_path / ".nbpipe")
    pid = store.pipeline_id("jobs")
    store.add_jobs(pid, "pbs", [("11.server", "default", "default-1"), ("12.server", "big", "big-1")])
    store.end_jobs(pid, "pbs", [("11.server", "COMPLETED")])
    out = subprocess.run([sys.executable, "-m", "nbpipe.cli", "--store", str(store.path), "show", "jobs",
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    detail = json.loads(out.stdout)
    assert [(j["job_id"], j["pool"], j["state"]) for j in detail["jobs"]] == [
        ("11.server", "default", "COMPLETED"), ("12.server", "big", "SUBMITTED")]
    text = subprocess.run([sys.executable, "-m", "nbpipe.cli", "--store", str(store.path), "show", "jobs"],
                          capture_output=True, text=True, timeout=60).stdout
    assert "12.server" in text and "no runner attached" in text


def test_starting_a_batch_cluster_keeps_the_interrupt_handler(tmp_path: Path) -> None:
    """dask-jobqueue replaces SIGINT's handler when imported; a kernel's Ctrl-C must survive."""
    import signal

    subprocess.run([sys.executable, "-c", """
import signal
from nbpipe.pools import cluster_class
before = signal.getsignal(signal.SIGINT)
cluster_class("slurm")
assert signal.getsignal(signal.SIGINT) is before, signal.getsignal(signal.SIGINT)
"""], check=True, timeout=60)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
