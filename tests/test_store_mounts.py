"""A store on a network file system: found from the kernel's mount table, refused with the mount
named and the way out (the database on a local disk, result files on the shared folder)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from nbpipe import Pipeline, StoreError, StoreOnNetworkFS
from nbpipe.store import Store, mounts
from nbpipe.store.mounts import mount_of, network_mount, parse_mounts

NBPIPE = str(Path(sys.executable).parent / "nbpipe")

# Lines as the kernel writes them in /proc/mounts on cluster nodes and laptops (options cut
# to what such lines carry; a space in a path is \040).
REAL_LINES = (Path(__file__).parent / "data" / "proc-mounts.txt").read_text()


@pytest.mark.parametrize(("path", "fstype", "network"), [
    ("/home/ada/project/.nbpipe", "nfs4", True),
    ("/home/ada/local-disk/project/.nbpipe", "xfs", False),  # a local disk mounted inside NFS
    ("/projects/survey/.nbpipe", "nfs", True),
    ("/lustre/scratch/ada/.nbpipe", "lustre", True),
    ("/gpfs/work/ada/.nbpipe", "gpfs", True),
    ("/mnt/beegfs/ada/.nbpipe", "beegfs", True),
    ("/mnt/nas/.nbpipe", "cifs", True),
    ("/mnt/login/project/.nbpipe", "fuse.sshfs", True),
    ("/cephfs/ada/.nbpipe", "ceph", True),
    ("/data/my data/.nbpipe", "nfs4", True),  # \040 in the table
    ("/tmp/ada/.nbpipe", "tmpfs", False),
    ("/var/lib/docker/overlay2/abc/merged/app/.nbpipe", "overlay", False),
    ("/opt/project/.nbpipe", "ext4", False),
    ("/homework/.nbpipe", "ext4", False),  # /home is not a prefix of /homework
    ("/data2/ada/.nbpipe", "nfs4", True),  # automounted: the NFS mount on top of autofs's
])
def test_network_file_systems_are_found_in_a_real_mount_table(path: str, fstype: str, network: bool
                                                              ) -> None:
    table = parse_mounts(REAL_LINES)
    assert mount_of(path, table).fstype == fstype
    assert (network_mount(path, table) is not None) is network


def _findmnt(path: Path) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)],
                          capture_output=True, text=True, check=True).stdout.split()[-1]  # the top one


@pytest.mark.skipif(not Path("/proc/self/mounts").exists() or not shutil.which("findmnt"),
                    reason="needs Linux's /proc/self/mounts and findmnt")
def test_this_machines_mount_table_gives_the_type_findmnt_gives(tmp_path: Path) -> None:
    for path in (tmp_path, Path("/"), Path("/dev/shm"), Path(__file__)):
        assert mount_of(path).fstype == _findmnt(path)


@pytest.mark.skipif(not shutil.which("findmnt") or not os.path.ismount("/dev/shm"),
                    reason="needs a tmpfs at /dev/shm")
def test_a_store_on_a_tmpfs_is_local_and_uses_wal(tmp_path: Path) -> None:
    assert _findmnt(Path("/dev/shm")) == "tmpfs"
    folder = Path("/dev/shm") / f"nbpipe-test-{os.getpid()}-{tmp_path.name}"
    try:
        assert network_mount(folder) is None
        Store(folder / ".nbpipe").pipeline_id("p")
        mode = sqlite3.connect(folder / ".nbpipe" / "nbpipe.sqlite").execute("PRAGMA journal_mode")
        assert mode.fetchone()[0] == "wal"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def nfs_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder the store sees as an NFS mount: the mount table read is this machine's own,
    with an NFS line for the folder added (as the kernel would write it after `mount -t nfs4`)."""
    home = tmp_path / "home"
    home.mkdir()
    table = tmp_path / "mounts"
    table.write_text(Path(mounts.MOUNTS).read_text()
                     + f"10.10.0.5:/export/home {home} nfs4 rw,relatime,vers=4.2,hard,proto=tcp 0 0\n")
    monkeypatch.setattr(mounts, "MOUNTS", str(table))
    monkeypatch.delenv("NBPIPE_DATABASE", raising=False)
    return home


def test_a_store_on_nfs_is_refused_naming_the_mount_and_the_way_out(nfs_home: Path) -> None:
    with pytest.raises(StoreOnNetworkFS) as caught:
        Pipeline("survey", store=nfs_home / "project" / ".nbpipe")
    message = str(caught.value)
    assert f"nfs4 10.10.0.5:/export/home mounted on {nfs_home}" in message
    assert "write-ahead log does not work across hosts" in message
    assert "NBPIPE_DATABASE=/tmp/$USER/project.sqlite" in message
    assert "database:` in nbpipe.yaml" in message and "docs/store.md" in message
    assert not (nfs_home / "project").exists()  # refused before anything was created


def test_an_existing_database_on_nfs_is_told_how_to_move(nfs_home: Path, monkeypatch) -> None:
    monkeypatch.setattr(mounts, "MOUNTS", "/proc/self/mounts")  # made before it was NFS
    Store(nfs_home / ".nbpipe").pipeline_id("kept")
    monkeypatch.undo()
    monkeypatch.setattr(mounts, "MOUNTS", str(nfs_home.parent / "mounts"))
    with pytest.raises(StoreOnNetworkFS, match=r"move the existing nbpipe.sqlite there first, with no nbpipe "
                                                r"process using the store: `mv "):
        Store(nfs_home / ".nbpipe")
    assert (nfs_home / ".nbpipe" / "nbpipe.sqlite").exists()  # untouched


def test_database_on_a_local_disk_with_results_on_the_shared_folder(
    nfs_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client
) -> None:
    local = tmp_path / "local" / "survey.sqlite"
    monkeypatch.setenv("NBPIPE_DATABASE", str(local))
    store = nfs_home / ".nbpipe"
    def define(pipe: Pipeline) -> list:
        @pipe.task
        def big(i: int) -> bytes:
            return bytes(20_000 + i)  # a result file, not inline

        return [big(i) for i in range(3)]

    pipe = Pipeline("survey", store=store, cluster=client)
    refs = define(pipe)
    assert pipe.run().executed == 3
    assert sorted(len(r.result()) for r in refs) == [20_000, 20_001, 20_002]
    pipe.close()
    assert local.is_file() and not (store / "nbpipe.sqlite").exists()
    assert len(list((store / "results").rglob("*.pkl"))) == 3
    assert json.loads((store / "database.json").read_text())["path"] == str(local)

    # The command line, given only the folder (no setting), finds the database.
    env = {k: v for k, v in os.environ.items() if k != "NBPIPE_DATABASE"}
    out = subprocess.run([NBPIPE, "--store", str(store), "tasks", "survey"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("SUCCEEDED") == 3

    # So does the next session without the setting: nothing runs again.
    monkeypatch.delenv("NBPIPE_DATABASE")
    again = Pipeline("survey", store=store, cluster=client)
    define(again)
    assert again.run().executed == 0
    again.close()


def test_another_host_is_told_where_the_database_lives(nfs_home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to give a process another host name")
    local = tmp_path / "local" / "db.sqlite"
    Store(nfs_home / ".nbpipe", database=local).pipeline_id("survey")
    # Another host: a process in its own UTS namespace, with a host name of its own.
    script = (f"hostname node-b && {NBPIPE} --store {nfs_home / '.nbpipe'} "
              "tasks survey")
    out = subprocess.run(["unshare", "--uts", "sh", "-c", script], capture_output=True, text=True,
                         timeout=120)
    if "unshare failed" in out.stderr or "Operation not permitted" in out.stderr:
        pytest.skip(f"unshare refused here: {out.stderr.strip()}")
    assert out.returncode != 0
    assert "keeps its database on the local disk of host" in out.stderr
    assert "this is host 'node-b'" in out.stderr and str(local) in out.stderr
    assert not (nfs_home / ".nbpipe" / "nbpipe.sqlite").exists()  # no empty database made


def test_a_database_setting_that_disagrees_with_the_store_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / ".nbpipe", database=tmp_path / "a.sqlite").pipeline_id("p")
    with pytest.raises(StoreError, match=r"keeps its database at .*a\.sqlite, not at .*b\.sqlite"):
        Store(tmp_path / ".nbpipe", database=tmp_path / "b.sqlite")
    assert Store(tmp_path / ".nbpipe").pipeline_id("p", create=False)  # found by its record


def test_result_files_on_a_network_file_system_are_fsynced_with_their_folder(
    nfs_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbpipe import results

    results._shared.cache_clear()
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        results.write_result(nfs_home / ".nbpipe", "ab" * 32, b"x" * 100)
        local = nfs_home.parent / "local-store"
        results.write_result(local, "cd" * 32, b"y" * 100)
    finally:
        results._shared.cache_clear()
    folder = nfs_home / ".nbpipe" / "results" / "ab"
    assert [Path(p).parent for p in synced] == [folder, folder.parent]  # the file, then its folder
    assert Path(synced[0]).name.endswith(".tmp") and Path(synced[1]) == folder
    assert not list(folder.glob(".*.tmp"))
    assert (local / "results" / "cd").is_dir()  # written, with no fsync on a local disk


def test_a_damaged_database_kept_elsewhere_is_named_with_its_own_path(tmp_path: Path) -> None:
    from nbpipe import StoreDamaged

    local = tmp_path / "local" / "survey.sqlite"
    Store(tmp_path / ".nbpipe", database=local).close()
    local.write_bytes(b"not a database, just bytes" * 200)
    with pytest.raises(StoreDamaged) as caught:
        Store(tmp_path / ".nbpipe")
    message = str(caught.value)
    assert f"cannot read its database {local}" in message
    assert f"cp -a {local} {local}.damaged" in message
    assert f"sqlite3 {local}.damaged .recover | sqlite3 {local}" in message


def test_two_stores_cannot_share_one_database_through_one_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "local" / "db.sqlite"
    monkeypatch.setenv("NBPIPE_DATABASE", str(shared))  # in a shell profile, for every project
    Store(tmp_path / "first" / ".nbpipe").pipeline_id("one")
    with pytest.raises(StoreError, match=r"belongs to the store .*first/\.nbpipe; give the store "
                                         r".*second/\.nbpipe a database of its own"):
        Store(tmp_path / "second" / ".nbpipe")
    monkeypatch.delenv("NBPIPE_DATABASE")
    assert [p["name"] for p in Store(tmp_path / "first" / ".nbpipe").pipelines()] == ["one"]


def test_a_database_moved_out_of_its_folder_by_hand_is_taken_up(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project" / ".nbpipe"
    store = Store(folder)
    store.pipeline_id("kept")
    store.close()  # the last connection: SQLite folds the write-ahead log into the file
    local = tmp_path / "local" / "project.sqlite"
    local.parent.mkdir()
    (folder / "nbpipe.sqlite").rename(local)  # as the refusal on NFS says to do
    monkeypatch.setenv("NBPIPE_DATABASE", str(local))
    assert Store(folder).pipeline_id("kept", create=False)
    monkeypatch.delenv("NBPIPE_DATABASE")
    assert Store(folder).db_path == local  # remembered


def test_a_store_reached_through_a_symlink_into_nfs_is_refused(nfs_home: Path, tmp_path: Path) -> None:
    (nfs_home / "project").mkdir()
    link = tmp_path / "project-link"  # on the local disk, pointing into the NFS mount
    link.symlink_to(nfs_home / "project")
    with pytest.raises(StoreOnNetworkFS, match=r"nfs4 10\.10\.0\.5:/export/home"):
        Store(link / ".nbpipe")


def test_the_command_line_on_nfs_prints_the_refusal_and_exits_2(nfs_home: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from nbpipe.cli import main

    monkeypatch.setattr(mounts, "MOUNTS", "/proc/self/mounts")
    Store(nfs_home / ".nbpipe").close()  # made before the folder was NFS
    monkeypatch.setattr(mounts, "MOUNTS", str(nfs_home.parent / "mounts"))
    result = CliRunner().invoke(main, ["--store", str(nfs_home / ".nbpipe"), "pipelines"])
    assert result.exit_code == 2
    assert "would lie on a network file system (nfs4" in result.output
    assert "NBPIPE_DATABASE=" in result.output and "Traceback" not in result.output


def test_a_database_setting_that_points_into_nfs_too_is_refused(nfs_home: Path) -> None:
    with pytest.raises(StoreOnNetworkFS, match=r"database .*/home/db\.sqlite would lie on a network"):
        Store(nfs_home.parent / "local" / ".nbpipe", database=nfs_home / "db.sqlite")


@pytest.mark.parametrize("name", ["mysql://ada:secret@db.example.org/survey", "sqlite:///x.db"])
def test_a_url_nbpipe_cannot_open_is_refused_not_made_a_folder(tmp_path: Path, monkeypatch,
                                                              name: str) -> None:
    from nbpipe import InvalidArgument

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument, match=r"is a URL nbpipe cannot open: a store is a folder "
                       r"\(store='.nbpipe'\) or a PostgreSQL database") as caught:
        Pipeline("survey", store=name)
    assert "secret" not in str(caught.value)  # a password in the URL is not repeated
    monkeypatch.setenv("NBPIPE_STORE", name)
    with pytest.raises(InvalidArgument, match="is a URL"):
        Store()
    assert list(tmp_path.iterdir()) == []


def test_a_postgresql_url_opens_a_database_not_a_folder(tmp_path: Path, monkeypatch) -> None:
    from nbpipe import StoreUnreachable

    monkeypatch.chdir(tmp_path)
    name = "postgresql://ada:secret@127.0.0.1:9/survey"  # nothing listens on port 9
    with pytest.raises(StoreUnreachable, match=r"postgresql://ada@127\.0\.0\.1:9/survey cannot be "
                       "used") as caught:
        Pipeline("survey", store=name, results=tmp_path / "results")
    assert "secret" not in str(caught.value)
    monkeypatch.setenv("NBPIPE_STORE", name)
    with pytest.raises(StoreUnreachable):
        Store()
    assert list(tmp_path.iterdir()) == []  # no folder named after the URL, no results folder


def test_the_database_setting_of_nbpipe_yaml_places_a_pipelines_database(
    nfs_home: Path, tmp_path: Path
) -> None:
    import dask

    local = tmp_path / "node-disk" / "survey.sqlite"
    with dask.config.set({"nbpipe.database": str(local)}):  # as `database:` in nbpipe.yaml sets it
        Pipeline("survey", store=nfs_home / ".nbpipe").close()
    assert local.is_file() and not (nfs_home / ".nbpipe" / "nbpipe.sqlite").exists()
    assert Store(nfs_home / ".nbpipe").db_path == local  # then found without the setting


def test_a_database_setting_never_hides_the_records_of_a_store_in_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / ".nbpipe"
    Store(folder).pipeline_id("kept")
    with pytest.raises(StoreError, match=r"keeps its database in its folder \(nbpipe.sqlite\)"):
        Store(folder, database=tmp_path / "elsewhere.sqlite")
    assert not (tmp_path / "elsewhere.sqlite").exists() and not (folder / "database.json").exists()
    assert Store(folder).pipeline_id("kept", create=False)
