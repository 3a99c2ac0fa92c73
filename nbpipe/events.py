"""The channel workers report through: one Dask topic per runner.

Workers publish a task's start and its outcomes (whole batches at once) as events on the runner's
topic (``distributed``'s pub/sub on the scheduler): no request per task. The runner subscribes
when it starts and drops the topic when it closes; every worker gets the SIGTERM notice behind
``context().should_stop()`` installed as a worker plugin.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .worker import install_termination_notice

__all__ = ["TOPIC_HISTORY", "TerminationNoticePlugin", "Topic", "bound_topic"]

log = logging.getLogger("nbpipe")

TOPIC_HISTORY = 16  # events of a runner's topic the scheduler keeps (it delivers them all)


def bound_topic(topic: str, keep: int, dask_scheduler: Any = None) -> None:
    """On the scheduler: keep only the last ``keep`` events of ``topic`` (0: forget the topic).

    The scheduler keeps a history of every topic (``distributed.admin.low-level-log-length``,
    1,000 events); a runner's events carry the outcomes of whole batches of tasks, so that
    history held every outcome of the last 1,000 batches (for a local cluster, in the driver:
    about 18 MB over 20,000 tasks) and outlived the runner. Nobody reads it: the runner gets
    each event as it is published.
    """
    topics = dask_scheduler._broker._topics  # no public API bounds one topic's history
    if keep == 0:
        topics.pop(topic, None)
    else:
        topics[topic].events = deque(topics[topic].events, maxlen=keep)


class TerminationNoticePlugin(WorkerPlugin):
    """Installs the SIGTERM notice behind ``context().should_stop()`` on every worker."""

    name = "nbpipe-termination-notice"

    def setup(self, worker: Any) -> None:
        install_termination_notice()


# The clients whose scheduler has the notice plugin: the scheduler keeps a plugin and installs it
# on every worker that joins later, so a runner on a client that registered it already does not
# send it again (a round trip to every worker before the first task of every run).
_registered: weakref.WeakSet[Any] = weakref.WeakSet()
_registered_lock = threading.Lock()


def _register_plugin(client: Any) -> None:
    """Register :class:`TerminationNoticePlugin` on ``client``'s scheduler, once per client."""
    with _registered_lock:
        if client in _registered:
            return
        try:
            client.register_plugin(TerminationNoticePlugin())
        except Exception:  # pragma: no cover - old schedulers without plugin support
            log.debug("could not register the termination notice plugin", exc_info=True)
            return
        _registered.add(client)


class Topic:
    """A runner's topic on ``client``'s scheduler; ``on_event`` is called (in the client's
    thread) with each event published on it."""

    def __init__(self, client: Any, on_event: Callable[[Any], None]) -> None:
        self.client = client
        self.name = f"nbpipe-{uuid.uuid4().hex[:12]}"
        client.subscribe_topic(self.name, on_event)
        # Bounding the topic's history is a round trip to the scheduler that nothing waits for
        # (memory only): done beside the run, not before its first task is sent.
        self._bounding = threading.Thread(target=self._bound, daemon=True,
                                          name="nbpipe-topic-bound")
        self._bounding.start()
        _register_plugin(client)

    def _bound(self) -> None:
        with contextlib.suppress(Exception):  # memory only: never worth failing a run for
            self.client.run_on_scheduler(bound_topic, self.name, TOPIC_HISTORY)

    def close(self) -> None:
        """Unsubscribe and make the scheduler forget the topic."""
        self._bounding.join(timeout=5)  # (else it could bound the topic again once dropped)
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(self.name)
        # Before the client closes (else the scheduler keeps the topic), but a scheduler that is
        # gone delays closing by 5 s at most.
        dropping = threading.Thread(target=self._drop, daemon=True)
        dropping.start()
        dropping.join(timeout=5)

    def _drop(self) -> None:
        with contextlib.suppress(Exception):  # a closed client or a scheduler gone: nothing kept
            self.client.run_on_scheduler(bound_topic, self.name, 0)
