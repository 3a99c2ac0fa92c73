"""Result files: large values written without a copy, every kind of damage caught, and the files
(and recorded checksums) of the nbpipe before still read and verified.

Real files throughout: ``write_result``/``read_result`` on a temporary store folder, pipelines
run as scripts on local clusters, ``nbpipe doctor`` as a command, and the nbpipe of the last
commit that wrote the previous format, taken from git.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sqlite3
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
from helpers import nbpipe_as_of, write
from test_dataloss import _nbpipe, _result_files
from test_reliability import _env, _query

from nbpipe.errors import ResultCorrupt
from nbpipe.results import (
    ALIGN,
    MAGIC,
    MAGIC_1,
    checksum_of,
    locate,
    read_result,
    read_verified,
    result_path,
    unpack,
    write_result,
)

KEY = "ab" * 32


def _same(a: Any, b: Any) -> bool:
    """Equal values, arrays compared element by element with their dtype and order."""
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f")))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _arrays(value: Any) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    if isinstance(value, list | tuple):
        return [a for v in value for a in _arrays(v)]
    return []


rng = np.random.default_rng(0)
VALUES = {  # the kinds of value a task returns, with and without out-of-band buffers
    "float64 array": rng.normal(size=300_000),
    "int8 array of odd length": np.arange(100_003, dtype=np.int8),
    "Fortran-ordered 2-d array": np.asfortranarray(rng.normal(size=(300, 200))),
    "non-contiguous slice": rng.normal(size=(400, 300))[::3, ::2],
    "0-d array": np.array(3.5),
    "empty array": np.zeros((0, 5)),
    "structured dtype": np.array([(1, 2.0), (3, 4.0)] * 5000, dtype=[("a", "i4"), ("b", "f8")]),
    "object array (pickled in band)": np.array([{"x": 1}, None, "s"] * 1000, dtype=object),
    "dict of arrays and scalars": {"x": rng.normal(size=50_000), "y": np.arange(7),
                                   "n": 3, "name": "run"},
    "list of many arrays": [np.full(1000 + i, float(i)) for i in range(200)],
    "bytes": bytes(range(256)) * 400,
    "bytearray": bytearray(b"xyz" * 30_000),
    "plain data": {"a": [1, 2.5, "three", None], "b": (True, b"\x00\xff")},
}


@pytest.mark.parametrize("name", list(VALUES))
def test_every_kind_of_value_reads_back_equal_and_its_arrays_writable(tmp_path: Path,
                                                                      name: str) -> None:
    value = VALUES[name]
    (path, checksum, size), data = write_result(tmp_path, KEY, value)
    assert data is None and path == f"results/{KEY[:2]}/{KEY}.pkl"
    file = Path(locate(tmp_path, path))
    assert file.stat().st_size == size
    assert file.read_bytes().startswith(MAGIC)
    for read in (read_result(file, checksum), read_result(file)):  # recorded, or the header's
        assert _same(value, read)
        for array in _arrays(read):
            assert array.flags.writeable and array.flags.aligned
            if array.size:
                array.flat[0] = array.flat[-1]  # users may change what they read
    assert read_verified(file) == (checksum, size)
    assert checksum_of(unpack(file.read_bytes())[0], like=checksum) == checksum  # as doctor checks


@pytest.mark.parametrize("name", list(VALUES))
def test_small_values_are_kept_inline_as_one_self_contained_pickle(tmp_path: Path,
                                                                   name: str) -> None:
    value = VALUES[name]
    (path, checksum, size), data = write_result(tmp_path, KEY, value, inline=10**9)
    assert path == "" and data is not None and len(data) == size
    assert not (tmp_path / "results").exists()
    assert _same(value, pickle.loads(data))  # no out-of-band buffers needed to read it
    assert _same(value, read_result("", checksum, data))


def test_a_large_array_is_written_from_its_own_memory_without_a_copy(tmp_path: Path) -> None:
    big = np.full(4_000_000, 1.5)  # 32 MB
    tracemalloc.start()
    try:
        write_result(tmp_path, KEY, big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"writing a 32 MB array allocated {peak:,} bytes"
    file = result_path(tmp_path, KEY)
    assert file.stat().st_size < big.nbytes + 2 * ALIGN + 1000  # the data once, no second copy
    raw = file.read_bytes()
    header = raw.split(b"\n", 1)[0] + b"\n"
    assert len(header) % ALIGN == 0  # the pickle starts aligned, so the buffers can too
    offset = raw.index(big.tobytes()[:64], len(header))
    assert offset % ALIGN == 0


def _damages(raw: bytes) -> dict[str, bytes]:
    """Every kind of damage a result file can take, at places that cover its parts: the
    header's marker, checksum and layout, the padding, the pickle, the buffers, its end."""
    header = raw.index(b"\n") + 1
    out = {}
    for at in [*range(header), header, header + 1, len(raw) // 3, len(raw) // 2,
               len(raw) - ALIGN - 1, len(raw) - 1]:
        flipped = bytearray(raw)
        flipped[at] ^= 0x01
        out[f"bit flipped at {at}"] = bytes(flipped)
    out.update({"truncated by 10 bytes": raw[:-10], "cut in its header": raw[: header // 2],
                "cut after its header": raw[:header], "a byte appended": raw + b"\x00",
                "empty": b"", "header removed": raw[header:]})
    return out


@pytest.mark.parametrize("name", ["float64 array", "list of many arrays", "bytes"])
def test_every_damage_to_a_result_file_is_caught_never_served(tmp_path: Path, name: str) -> None:
    value = VALUES[name]
    (_, checksum, _), _ = write_result(tmp_path, KEY, value)
    file = result_path(tmp_path, KEY)
    raw = file.read_bytes()
    for damage, bad in _damages(raw).items():
        file.write_bytes(bad)
        assert read_verified(file) is None, damage  # never adopted
        with pytest.raises(ResultCorrupt):  # against its record
            read_result(file, checksum)
        try:  # against its own header (what a file alone can say)
            again = read_result(file)
        except ResultCorrupt:
            continue
        assert damage == "header removed" and name == "bytes" and again == value, damage
    file.write_bytes(raw)
    assert _same(value, read_result(file, checksum))


# -- the previous format ---------------------------------------------------------------------------


def _v1_file(path: Path, value: Any) -> str:
    """A result file as nbpipe wrote it before (one in-band pickle, BLAKE2b-128 header);
    the checksum that nbpipe recorded for it."""
    data = cloudpickle.dumps(value, protocol=5)
    checksum = hashlib.blake2b(data, digest_size=16).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC_1 + checksum.encode() + b"\n" + data)
    return checksum


@pytest.mark.parametrize("name", ["float64 array", "dict of arrays and scalars", "bytes"])
def test_files_and_checksums_of_the_previous_format_are_read_and_verified(tmp_path: Path,
                                                                         name: str) -> None:
    value = VALUES[name]
    file = result_path(tmp_path, KEY)
    checksum = _v1_file(file, value)
    assert _same(value, read_result(file, checksum))
    assert _same(value, read_result(file))
    assert read_verified(file) == (checksum, file.stat().st_size)  # adopted as it is
    raw = file.read_bytes()
    for damage, bad in _damages(raw).items():
        file.write_bytes(bad)
        assert read_verified(file) is None, damage
        if damage == "header removed":  # a file of nbpipe before headers: its pickle, recorded
            assert _same(value, read_result(file, checksum))
            continue
        with pytest.raises(ResultCorrupt):
            read_result(file, checksum)
    data = cloudpickle.dumps(value, protocol=5)  # an inline result recorded before
    old = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert _same(value, read_result("", old, data))
    with pytest.raises(ResultCorrupt):
        read_result("", old, data[:-1] + bytes([data[-1] ^ 1]))


ARRAYS = """
import sys
import numpy as np
from nbpipe import Pipeline

pipe = Pipeline("arrays", store=sys.argv[1], cluster={"kind": "local", "workers": 2})


@pipe.task
def make(i: int):
    return {"values": np.full(200_000, float(i)), "i": i, "grid": np.ones((50, 40), order="F") * i}


@pipe.task
def total(parts: list) -> float:
    return float(sum(p["values"].sum() + p["grid"].sum() for p in parts))


if __name__ == "__main__":
    parts = [make(i) for i in range(6)]
    end = total(parts)
    summary = pipe.run()
    right = end.result() == sum(i * (200_000 + 2000) for i in range(6))
    right &= all(p.result()["values"][0] == i for i, p in enumerate(parts))
    print("SUMMARY", summary.executed, summary.ok, right, flush=True)
"""


def _run_arrays(script: Path, store: Path, pythonpath: Path | None = None) -> int:
    env = _env() if pythonpath is None else {**_env(), "PYTHONPATH": str(pythonpath)}
    proc = subprocess.run([sys.executable, str(script), str(store)], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed, ok, right = proc.stdout.split("SUMMARY")[1].split()
    assert ok == "True" and right == "True", proc.stdout
    return int(executed)


def test_a_pipeline_of_arrays_writes_the_new_format_and_resumes_from_it(tmp_path: Path) -> None:
    script = write(tmp_path / "arrays.py", ARRAYS)
    store = tmp_path / ".nbpipe"
    assert _run_arrays(script, store) == 7
    files = _result_files(store / "nbpipe.sqlite", "make(%")
    assert len(files) == 6 and all(p.read_bytes().startswith(MAGIC) for _, p in files)
    assert _run_arrays(script, store) == 0
    assert json.loads(_nbpipe(store, "doctor", "--json").stdout)["ok"]


def _nbpipe_of_the_previous_format(into: Path) -> Path:
    """The nbpipe of the last commit whose result files had the ``nbpipe-result 1`` header."""
    return nbpipe_as_of(into, "nbpipe/results.py", 'MAGIC = b"nbpipe-result 1 "', 50,
                        "no commit with the previous result format in the history at hand")


def test_a_store_written_by_the_previous_format_resumes_adopts_and_checks_clean(
    tmp_path: Path,
) -> None:
    old = _nbpipe_of_the_previous_format(tmp_path / "old-nbpipe")
    script = write(tmp_path / "arrays.py", ARRAYS)
    store = tmp_path / ".nbpipe"
    db = store / "nbpipe.sqlite"
    assert _run_arrays(script, store, pythonpath=old) == 7
    files = _result_files(db, "make(%")
    assert len(files) == 6 and all(p.read_bytes().startswith(MAGIC_1) for _, p in files)
    assert json.loads(_nbpipe(store, "doctor", "--json").stdout)["ok"]  # old checksums verify
    assert _run_arrays(script, store) == 0  # read with their recorded BLAKE2b checksums
    with sqlite3.connect(db) as conn:  # a runner died before recording them: found, verified
        conn.execute("DELETE FROM results WHERE path != ''")
    conn.close()
    damaged = files[0][1]
    raw = bytearray(damaged.read_bytes())
    raw[-50] ^= 0x01
    damaged.write_bytes(bytes(raw))
    assert _run_arrays(script, store) == 1  # the damaged one runs again, the rest is adopted
    assert json.loads(_nbpipe(store, "doctor", "--json").stdout)["ok"]
    assert _query(db, "SELECT COUNT(*) FROM results WHERE checksum LIKE 'xxh3:%'") == [(1,)]
    assert damaged.read_bytes().startswith(MAGIC)
