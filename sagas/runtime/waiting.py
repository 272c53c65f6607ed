"""Which step messages still wait in the broker, so recovery does not send a second one.

A step can make no progress because its worker died holding it (its message is gone: re-drive
it) or because no worker has taken its message yet (a pool is down or saturated: sending
another would only pile a duplicate behind the first). Recovery asks the broker which, once
per run and per queue, before it re-drives anything:

- **Redis**: a queue is a list (one per priority level). Its messages are read, up to
  ``PROBE_LIMIT`` per queue, and the task ids taken from their headers: a step whose task id
  (``<saga>.<step>.<do|undo>.<attempt>``) is among them is held, not re-driven. A longer queue
  is not read (recovery then backs off without knowing). A message a worker has taken but not
  yet acknowledged sits in the transport's ``unacked`` hash with the time it was taken: one
  taken less than the step's span ago is a delivery that may still be running (a pool that
  just came back works through its backlog), so it is held too; one taken longer ago belongs
  to a worker that died (or a step past its hard limit) and is re-driven.
- **AMQP** (RabbitMQ): a queue cannot be read without consuming it, but a passive declare
  says how many messages it holds and how many consumers it has: a queue with messages and no
  consumer is served by nobody, so what was sent to it still waits there.
- Anything else, or a broker that does not answer: nothing is known, and recovery re-drives
  (with backoff).

Beyond that, messages a worker has taken are not waiting: those are the ones a dead worker may
have lost, which recovery must re-drive.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sagas.runtime.binding import Binding

log = logging.getLogger("sagas.recovery")

PROBE_LIMIT = 10_000
"""Most messages read from one queue in one recovery run; a longer queue is not read."""

_TASK_ID = re.compile(rb'"id": ?"([^"\\]+)"')


@dataclass(frozen=True)
class BrokerLook:
    """One look at the broker: each queue, and the messages workers took (Redis)."""

    queues: dict[str, QueueLook]
    taken: dict[str, float] | None = None  # task id -> when a worker took it (epoch seconds)

    def taken_since(self, task_ids: Iterable[str], since: float) -> bool:
        """Whether a worker took one of ``task_ids`` at ``since`` or later."""
        taken = self.taken or {}
        return any(taken.get(t, 0.0) >= since for t in task_ids)


@dataclass(frozen=True)
class QueueLook:
    """What the broker says of one queue."""

    queue: str
    task_ids: frozenset[str] | None = None  # every task id waiting in it; None: unknown
    unserved: bool = False  # messages wait and no worker consumes the queue (AMQP)
    waiting: int | None = None  # how many messages wait, when known

    def holds_any(self, task_ids: Iterable[str]) -> bool:
        """Whether one of ``task_ids`` surely still waits in this queue."""
        if self.task_ids is not None:
            return any(t in self.task_ids for t in task_ids)
        return self.unserved


def look(binding: Binding, queues: Sequence[str], taken_since: float | None = None
         ) -> BrokerLook:
    """One look at each queue, and (Redis) at the messages workers took since ``taken_since``
    (see the module docstring); nothing known of a broker that fails."""
    wanted = sorted(set(queues))
    if not wanted:
        return BrokerLook({})
    if binding.probe is not None:
        found: dict[str, QueueLook] = binding.probe(wanted)
        return BrokerLook(found)
    try:
        with binding.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.default_channel
            driver = conn.transport.driver_type
            if driver == "redis":
                taken = _taken(channel, taken_since) if taken_since is not None else None
                return BrokerLook({q: _redis(channel, q) for q in wanted}, taken)
            if driver == "amqp":
                return BrokerLook({q: _amqp(conn, q) for q in wanted})
    except Exception as exc:
        log.warning("could not look at queues %s: %s", ", ".join(wanted), exc)
    return BrokerLook({q: QueueLook(q) for q in wanted})


def _redis(channel: Any, queue: str) -> QueueLook:
    names = [channel._q_for_pri(queue, pri) for pri in channel.priority_steps]
    names = list(dict.fromkeys(names))
    with channel.conn_or_acquire() as client:
        with client.pipeline() as pipe:
            for name in names:
                pipe.llen(name)
            sizes = [int(n or 0) for n in pipe.execute()]
        total = sum(sizes)
        if total > PROBE_LIMIT:
            return QueueLook(queue, waiting=total)
        ids: set[str] = set()
        for name, size in zip(names, sizes, strict=True):
            if size:
                for raw in client.lrange(name, 0, -1):
                    found = _TASK_ID.search(raw if isinstance(raw, bytes) else raw.encode())
                    if found:
                        ids.add(found.group(1).decode())
    return QueueLook(queue, frozenset(ids), waiting=total)


def _taken(channel: Any, since: float) -> dict[str, float]:
    """Task ids of the messages workers took at ``since`` or later and have not acknowledged."""
    out: dict[str, float] = {}
    with channel.conn_or_acquire() as client:
        recent = client.zrangebyscore(channel.unacked_index_key, since, "+inf",
                                      start=0, num=PROBE_LIMIT, withscores=True)
        if not recent:
            return out
        tags = [tag for tag, _ in recent]
        for (_, at), raw in zip(recent, client.hmget(channel.unacked_key, tags), strict=True):
            if raw is None:
                continue
            found = _TASK_ID.search(raw if isinstance(raw, bytes) else raw.encode())
            if found:
                out[found.group(1).decode()] = float(at)
    return out


def _amqp(conn: Any, queue: str) -> QueueLook:
    channel = conn.channel()
    try:
        _, messages, consumers = channel.queue_declare(queue=queue, passive=True)
    except Exception as exc:  # no such queue, or no answer: nothing known of this one
        log.debug("could not look at queue %s: %s", queue, exc)
        return QueueLook(queue)
    finally:
        try:
            channel.close()
        except Exception:  # a failed passive declare closes the channel itself
            log.debug("channel of queue %s already closed", queue)
    return QueueLook(queue, unserved=bool(messages) and not consumers, waiting=int(messages))
