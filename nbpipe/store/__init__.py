"""The pipeline store: the source of truth for pipelines and tasks, and every SQL statement.

Layout of a store directory (default ``./.nbpipe``, created private to the user)::

    .nbpipe/
      nbpipe.sqlite        pipelines, tasks, edges, attempts, results, events, commands
      results/ab/<key>.pkl result files, written atomically by the workers (small results of
                           quick tasks are kept in the results table instead)
      locks/<pipeline>-<digest>.lock  held by the one process running a pipeline

The package, one idea per module:

- :mod:`~nbpipe.store.schema` -- the tables, in one commented place;
- :mod:`~nbpipe.store.sqlite` -- :class:`Store` (connections, transactions, migrations, the
  runner's writes in one :class:`Batch` per tick) on SQLite;
- :mod:`~nbpipe.store.lock` -- :class:`RunnerLock`, one runner per pipeline;
- :mod:`~nbpipe.store.mounts` -- on which file system the store lives (network ones refuse WAL);
- :mod:`~nbpipe.store.queries` -- read-only views for the command line and the sidebar;
- :mod:`~nbpipe.store.maintenance` -- ``doctor``, ``gc`` and deleting a pipeline;
- :mod:`~nbpipe.store.copy` -- a store copied elsewhere, verified (``nbpipe store copy``);
- :mod:`~nbpipe.store.registry` -- the stores this user opened.

>>> from nbpipe.store import Store
>>> store = Store(".nbpipe")                                  # doctest: +SKIP
>>> store.pipelines()[0]["name"]                              # doctest: +SKIP
'pi'
"""

from __future__ import annotations

from .lock import LOCK_TRIES, RunnerLock, file_stem, lock_name
from .registry import known_stores, registry_path, remember
from .schema import SCHEMA, SCHEMA_VERSION
from .sqlite import DATABASE_FILE, DATABASE_POINTER, Batch, Store, is_damage, is_store

__all__ = [
    "DATABASE_FILE", "DATABASE_POINTER", "LOCK_TRIES", "SCHEMA", "SCHEMA_VERSION", "Batch",
    "RunnerLock", "Store", "file_stem", "is_damage", "is_store", "known_stores", "lock_name",
    "registry_path", "remember",
]
