"""Pipelines on a real Slurm (started by `.ci/slurm-up`): workers are batch jobs.

Skipped where no Slurm answers; CI (CI=true) turns those skips into failures.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import pytest
from conftest import wait_for
from distributed import Client

from nbpipe import Pipeline, State, context


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "alloc"))


pytestmark = [
    pytest.mark.ci_required,
    pytest.mark.skipif(not _slurm_answers(), reason="no Slurm answers here (start one: sudo .ci/slurm-up)"),
]


def _queue() -> dict[str, str]:
    """This user's jobs in the Slurm queue: job id -> state."""
    out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %T"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _spec(**extra: object) -> dict:
    return {"kind": "slurm", "cores": 1, "memory": "1GB", "walltime": "00:10:00", "max_jobs": 2,
            "idle_timeout": "5s", **extra}


@pytest.fixture
def slurm_pipe(request: pytest.FixtureRequest, store: Path):
    """A pipeline named after the test whose workers are Slurm jobs; closed after the test."""
    made: list[Pipeline] = []

    def make(**extra: object) -> Pipeline:
        p = Pipeline(request.node.name[:60], store=store, cluster=_spec(**extra))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _where() -> dict:
    """What a task sees of the batch job it runs in."""
    from distributed import get_worker

    return {"job": context().job_id, "env_job": os.environ.get("SLURM_JOB_ID"),
            "cpus": int(os.environ.get("SLURM_CPUS_PER_TASK", "0")),
            "job_name": os.environ.get("SLURM_JOB_NAME"), "threads": get_worker().state.nthreads}


def test_pipeline_runs_on_slurm_workers_over_tls_and_leaves_no_job(slurm_pipe) -> None:
    pipe = slurm_pipe()

    @pipe.task
    def where(i: int) -> dict:
        time.sleep(0.5)
        return _where()

    refs = [where(i) for i in range(4)]
    summary = pipe.run(check=True, timeout=120)
    assert summary.executed == 4
    seen = [r.result() for r in refs]
    assert all(s["job"] and s["job"] == s["env_job"] for s in seen), seen
    jobs = pipe.store.jobs(pipe.pipeline_id)
    assert {s["job"] for s in seen} <= {j["job_id"] for j in jobs}
    # the store records the job id of every attempt
    attempts = [a for r in refs for a in pipe.store.attempts(pipe.pipeline_id, r.key)]
    assert sorted(a["job_id"] for a in attempts) == sorted(s["job"] for s in seen)

    # TLS is on: the scheduler speaks tls://, and a client without the certificates is refused
    address = pipe.client.scheduler.address
    assert address.startswith("tls://")
    with pytest.raises((OSError, TimeoutError)):
        Client(address.replace("tls://", "tcp://"), timeout="3s")
    with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
        Client(address, timeout="3s")

    pipe.close()
    ids = {j["job_id"] for j in jobs}
    wait_for(lambda: not ids & set(_queue()), timeout=60)
    assert all(j["ended"] for j in pipe.store.jobs(pipe.pipeline_id))


def test_jobs_are_recorded_before_run_returns_and_a_crash_right_after_still_reaps_them(
        store: Path, tmp_path: Path) -> None:
    """The queue is polled every few seconds; quick tasks can all end between two polls. The
    jobs must be in the store when run() returns anyway (the poll is made hourly here, so only
    the record made when a worker reports its job counts), and a driver killed right after
    leaves nothing the next runner cannot reap."""
    script = tmp_path / "quick.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sqlite3
        import nbpipe, nbpipe.runner
        nbpipe.runner.JOB_POLL = 3600.0
        pipe = nbpipe.Pipeline("quick", store={str(store)!r}, cluster={_spec()!r})

        def quick(i: int) -> int:
            return i

        refs = [pipe.task(quick)(i) for i in range(3)]
        pipe.run(check=True, timeout=300)
        jobs = sqlite3.connect({str(store / "nbpipe.sqlite")!r}).execute(
            "SELECT job_id FROM jobs WHERE ended IS NULL").fetchall()
        print("jobs", " ".join(j for (j,) in jobs), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # a crash right after run() returned
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr
    recorded = done.stdout.split("jobs", 1)[1].split()
    assert recorded, done.stdout  # before the fix: none (the poll had not seen them)
    # The next runner of the pipeline cancels what the dead one left.
    again = Pipeline("quick", store=store, cluster=_spec())
    again.task(_where)()
    again.run(check=True, timeout=300)
    rows = {r["job_id"]: r for r in again.store.jobs(again.pipeline_id)}
    assert all(rows[j]["ended"] and rows[j]["state"] == "CANCELLED" for j in recorded), rows
    again.close()
    wait_for(lambda: not set(recorded) & set(_queue()), timeout=60)


def test_tasks_go_to_pools_large_enough(slurm_pipe) -> None:
    pipe = slurm_pipe(pools={"big": {"cores": 2, "memory": "2GB", "max_jobs": 1}})

    @pipe.task
    def small(i: int) -> dict:
        time.sleep(0.3)
        return _where()

    @pipe.task(cores=2)
    def wide(i: int) -> dict:
        time.sleep(0.4)  # not the same code as small: tasks are content-addressed
        return _where()

    smalls = [small(i) for i in range(4)]
    wides = [wide(i) for i in range(3)]
    pipe.run(check=True, timeout=180)
    for r in wides:  # a cores=2 task never runs on a 1-core worker
        seen = r.result()
        assert seen["cpus"] == 2 and seen["threads"] == 2 and seen["job_name"] == "nbpipe-big", seen
    for r in smalls:
        seen = r.result()
        assert seen["cpus"] == 1 and seen["job_name"] == "nbpipe-default", seen
    pools = {j["pool"] for j in pipe.store.jobs(pipe.pipeline_id)}
    assert pools == {"default", "big"}


def test_scancel_of_a_worker_job_mid_run_and_the_pipeline_completes(slurm_pipe) -> None:
    pipe = slurm_pipe(max_jobs=2)

    @pipe.task
    def slow(i: int) -> str:
        time.sleep(3)
        return context().job_id

    refs = [slow(i) for i in range(6)]
    pipe.run(wait=False)
    wait_for(lambda: any(r.state is State.RUNNING for r in refs), timeout=60)
    running = next(r for r in refs if r.state is State.RUNNING)
    wait_for(lambda: pipe.store.jobs(pipe.pipeline_id), timeout=120)
    victim = pipe.store.jobs(pipe.pipeline_id)[0]["job_id"]
    subprocess.run(["scancel", victim], check=True)
    summary = pipe.run(check=True, timeout=180)
    assert summary.ok and summary.counts == {"SUCCEEDED": 6}
    # the scancel cost no attempt: Dask ran the lost task again on another worker
    assert running.state is State.SUCCEEDED and all(r.attempts == 1 for r in refs)
    wait_for(lambda: any(j["job_id"] == victim and j["ended"] for j in pipe.store.jobs(pipe.pipeline_id)))


def test_worker_lifetime_moves_tasks_instead_of_failing_them(slurm_pipe) -> None:
    pipe = slurm_pipe(max_jobs=2, lifetime="10s")

    @pipe.task
    def slow(i: int) -> str:
        time.sleep(3)
        return context().job_id

    refs = [slow(i) for i in range(8)]  # about 12 s of work per worker: more than a lifetime
    summary = pipe.run(check=True, timeout=240)
    assert summary.ok and summary.counts == {"SUCCEEDED": 8}
    assert all(r.state is State.SUCCEEDED for r in refs)
    assert len({r.result() for r in refs}) >= 3  # workers retired and new jobs took over
    assert len(pipe.store.jobs(pipe.pipeline_id)) >= 3


def test_a_task_that_kills_its_worker_fails_with_the_memory_it_had_then_grows(slurm_pipe) -> None:
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        pipe = slurm_pipe(pools={"big": {"memory": "3GB", "max_jobs": 1}})

        @pipe.task(memory="500MB")
        def hog() -> int:
            block = bytearray(1_400_000_000)  # more than the 1 GB job it is placed in
            time.sleep(2)
            return len(block)

        @pipe.task(memory="500MB", retries=2, retry_memory_factor=3)
        def grows() -> int:
            block = bytearray(1_400_000_000)
            time.sleep(1)
            return len(block)

        bad, good = hog(), grows()
        pipe.run(timeout=240)
    assert bad.state is State.FAILED
    assert "worker running it died" in bad.error and "memory limit of" in bad.error, bad.error
    assert good.state is State.SUCCEEDED, good.error
    assert good.result() == 1_400_000_000
    attempts = pipe.store.attempts(pipe.pipeline_id, good.key)
    assert good.attempts == 2, [dict(a) for a in attempts]


REAPED = """
import sys, time
from nbpipe import Pipeline
pipe = Pipeline("reap", store=sys.argv[1], cluster={"kind": "slurm", "cores": 1, "memory": "1GB",
                "walltime": "00:10:00", "max_jobs": 2})

@pipe.task
def forever(i):
    time.sleep(600)

for i in range(2):
    forever(i)
pipe.run(wait=False)
while len(pipe.store.jobs(pipe.pipeline_id)) < 2:
    time.sleep(0.2)
print("jobs recorded", flush=True)
time.sleep(600)
"""


def test_a_new_runner_cancels_the_jobs_a_killed_kernel_left(store: Path, tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(textwrap.dedent(REAPED))
    proc = subprocess.Popen([sys.executable, str(script), str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "jobs recorded" in proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    probe = Pipeline("reap", store=store, cluster=_spec())
    left = {j["job_id"] for j in probe.store.jobs(probe.pipeline_id, open_only=True)}
    assert len(left) == 2 and left <= set(_queue())  # orphans: still in the queue

    @probe.task
    def quick() -> int:
        return 1

    quick()
    try:
        probe.run(check=True, timeout=120)
    finally:
        probe.close()
    wait_for(lambda: not left & set(_queue()))
    assert not probe.store.jobs(probe.pipeline_id, open_only=True)


def test_the_slurm_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    source = Path(__file__).resolve().parent.parent / "nb" / "slurm.ipynb"
    path = tmp_path / "slurm.ipynb"
    shutil.copy(source, path)
    monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    monkeypatch.setenv("NBPIPE_WIDGETS", "0")
    for name in ("NBPIPE_STORE", "NBPIPE_PIPELINE", "DASK_NBPIPE__CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.get('ename')}: {out.get('evalue')}"
            text.append(out.get("text") or out.get("data", {}).get("text/plain", ""))
    text = "\n".join(text)
    assert "#SBATCH --cpus-per-task=2" in text and "pool big: slurm jobs of 2 cores" in text
    assert "where: nbpipe-default 1 cpu(s)" in text and "wide:  nbpipe-big 2 cpu(s)" in text, text
    assert "batch job(s)" in text
    wait_for(lambda: not _queue(), timeout=60)  # the kernel is gone: so are its jobs

    # its export runs on Slurm too (`%pipeline cluster ...` became cluster=) and finds all done
    out = subprocess.run([sys.executable, "-m", "nbpipe.cli", "export", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    script = path.with_suffix(".py")
    assert "cluster={'kind': 'slurm'" in script.read_text()
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "where: nbpipe-default 1 cpu(s)" in ran.stdout and "0 executed, 2 already done" in ran.stdout


@pytest.mark.parametrize("inside", [False, True], ids=["worker-jobs", "inside-allocation"])
def test_an_exported_sbatch_script_runs_on_slurm_and_its_results_show(tmp_path: Path, inside: bool) -> None:
    import json

    import nbformat

    (tmp_path / "nbpipe.yaml").write_text(
        "cluster:\n  kind: slurm\n  cores: 1\n  memory: 1GB\n  walltime: '00:10:00'\n  max_jobs: 2\n"
        "  idle_timeout: 5s\n")
    cells = ["%load_ext nbpipe", "%%task numbers\nnumbers = list(range(6))",
             "from nbpipe import context, task\n\n\n@task\ndef where(n: int) -> str:\n"
             "    return context().job_id\n\n\njobs = [where(n) for n in range(3)]",
             "%%task total\ntotal = sum(numbers)"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbformat.write(nb, tmp_path / "batch.ipynb")
    command = [sys.executable, "-m", "nbpipe.cli", "export", "batch.ipynb", "--sbatch", "job.sh"]
    out = subprocess.run(command + (["--inside-allocation"] if inside else []), capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    job = (tmp_path / "job.sh").read_text()
    assert "#SBATCH --time=00:10:00" in job and "nbpipe.cli run batch.py" in job
    assert ("#SBATCH --ntasks=4" in job and "srun" in job) if inside else "srun" not in job
    done = subprocess.run(["sbatch", "--wait", "job.sh"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=400)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("nbpipe-batch-*.out"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    assert "all tasks succeeded" in logs
    listing = subprocess.run([sys.executable, "-m", "nbpipe.cli", "--store", str(tmp_path / ".nbpipe"),
                              "tasks", "batch", "--json"], capture_output=True, text=True, timeout=60)
    tasks = json.loads(listing.stdout)
    assert len(tasks) == 5 and {t["state"] for t in tasks} == {"SUCCEEDED"}
    from nbpipe.store import Store

    store = Store(tmp_path / ".nbpipe")
    pid = store.pipeline_id("batch", create=False)
    workers = [a["job_id"] for t in tasks for a in store.attempts(pid, t["key"])]
    driver = re.search(r"Submitted batch job (\d+)", done.stdout).group(1)
    if inside:  # scheduler, driver and workers were the one job's tasks
        assert set(workers) == {driver}
    else:  # the tasks ran in worker jobs, not the driver's
        assert all(w and w != driver for w in workers)
