"""The store's schema: every table in one commented place (documented in ``docs/store.md``).

Bump :data:`SCHEMA_VERSION` with every change, and add the step from the previous version to
the migrations in :meth:`nbpipe.store.Store._migrate`.
"""

from __future__ import annotations

__all__ = ["SCHEMA", "SCHEMA_VERSION"]

SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL UNIQUE,
    created   REAL NOT NULL,
    paused    INTEGER NOT NULL DEFAULT 0,
    runner    TEXT,              -- JSON: pid, host, started, cluster, dashboard of the runner
    source    TEXT               -- the script or notebook that defines the pipeline
);
CREATE TABLE IF NOT EXISTS tasks (
    pipeline_id INTEGER NOT NULL REFERENCES pipelines(id),
    key         TEXT NOT NULL,   -- content identity (see docs/identity.md)
    name        TEXT NOT NULL,   -- function or cell name
    label       TEXT NOT NULL,   -- name plus distinguishing arguments, e.g. fraction(seed=3)
    kind        TEXT NOT NULL,   -- python | bash
    state       TEXT NOT NULL,
    active      INTEGER NOT NULL DEFAULT 1,  -- 0 once a newer task took its label
    attempts    INTEGER NOT NULL DEFAULT 0,
    components  TEXT NOT NULL,   -- JSON: the parts of the key
    reason      TEXT,            -- why it (re-)ran
    resources   TEXT,            -- JSON: cores, memory, walltime, gpus, pool, retries, ...
    error       TEXT,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    cell        TEXT,            -- id of the notebook cell that defines it (%%task cells)
    PRIMARY KEY (pipeline_id, key)
);
CREATE INDEX IF NOT EXISTS tasks_label ON tasks (pipeline_id, label);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks (pipeline_id, state);
CREATE TABLE IF NOT EXISTS edges (
    pipeline_id INTEGER NOT NULL,
    parent      TEXT NOT NULL,
    child       TEXT NOT NULL,
    kind        TEXT NOT NULL,   -- data | after | file
    PRIMARY KEY (pipeline_id, parent, child)
);
CREATE TABLE IF NOT EXISTS results (
    key      TEXT PRIMARY KEY,   -- results are shared by every pipeline of the store
    path     TEXT NOT NULL,      -- relative to the store root (results/ab/<key>.pkl); '' inline
    checksum TEXT NOT NULL,
    size     INTEGER NOT NULL,
    created  REAL NOT NULL,
    data     BLOB                -- an inline result's bytes (see nbpipe.results)
);
CREATE TABLE IF NOT EXISTS environments (
    id       TEXT PRIMARY KEY,
    snapshot TEXT NOT NULL       -- JSON: python, packages, hostname, git_commit, ...
);
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    pipeline_id INTEGER NOT NULL,
    key         TEXT NOT NULL,
    number      INTEGER NOT NULL,
    state       TEXT NOT NULL,
    start       REAL,
    end         REAL,
    worker      TEXT,
    hostname    TEXT,
    pid         INTEGER,
    job_id      TEXT,            -- batch job (Slurm, PBS, ...) of the worker, if any
    exit_code   INTEGER,
    error       TEXT,
    traceback   TEXT,
    stdout      TEXT,
    stderr      TEXT,
    env_id      TEXT
);
CREATE INDEX IF NOT EXISTS attempts_key ON attempts (pipeline_id, key);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline_id INTEGER NOT NULL,
    time        REAL NOT NULL,
    key         TEXT,
    state       TEXT,
    message     TEXT
);
CREATE INDEX IF NOT EXISTS events_pipeline ON events (pipeline_id, id);
CREATE TABLE IF NOT EXISTS commands (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline_id INTEGER NOT NULL,
    time        REAL NOT NULL,
    verb        TEXT NOT NULL,   -- retry | kill | pause | resume
    args        TEXT NOT NULL,   -- JSON
    status      TEXT NOT NULL DEFAULT 'new',  -- new | done | failed
    done_time   REAL,
    message     TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    pipeline_id INTEGER NOT NULL,
    kind        TEXT NOT NULL,   -- slurm | pbs | sge | lsf | htcondor
    job_id      TEXT NOT NULL,   -- the batch scheduler's id
    pool        TEXT NOT NULL,
    name        TEXT NOT NULL,   -- the Dask worker's name
    submitted   REAL NOT NULL,
    ended       REAL,            -- NULL while the runner believes the job is queued or running
    state       TEXT,            -- last state seen in the batch queue
    PRIMARY KEY (pipeline_id, kind, job_id)
);
"""
