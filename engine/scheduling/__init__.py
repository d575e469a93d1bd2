"""Scheduling over rings: priority levels, key-ordered partitions, delayed delivery.

:class:`PriorityQueue`
    One ring per level (0 = most urgent, as in :class:`queue.PriorityQueue`).
    ``policy="strict"`` always serves the most urgent non-empty level;
    ``policy="weighted"`` shares service by ``weights[i]`` (deficit round robin
    by message count, or by payload bytes with ``by="bytes"``: each visit
    gives level i ``weights[i] * quantum`` bytes of credit, heads are read
    ahead to know their size). ``max_wait=seconds`` adds aging: every level
    message carries its enqueue time in an 8-byte header, and the head of a
    level 1..n-1 that has waited ``max_wait / 2`` is served before anything
    else (the longest-waiting first), so no message waits longer than ``max_wait`` behind a flood of more urgent ones
    as long as the consumer keeps up with the less urgent levels themselves
    (the bound the tests measure). Level 0 does not age: nothing outranks it,
    and aging its own backlog would turn an overloaded queue into one FIFO.

:class:`KeyedQueue`
    One ring per partition; ``put(msg, key=k)`` sends equal keys to the same
    partition (a hash that is the same in every process), so they are consumed
    in order, by one consumer per partition at a time (Kafka partitions).
    Consumers (``kq.consumer()``, in any process) form a group; see
    :class:`KeyedConsumer` for the rebalancing protocol.

Delayed delivery (both): ``put(msg, delay=seconds)`` or ``put(msg, at=t)``
with ``t`` a :func:`time.time` wall-clock time. The message travels in a
separate delay ring with its due time (CLOCK_MONOTONIC, converted from the
wall clock at put time); the consumer keeps it in a heap, invisible, and
serves it by its level as soon as it is due. It is never early (the wall
clock is read before the monotonic one, so rounding only makes it later);
a consumer blocked in ``get`` sleeps exactly until the next due time, so it
is late only by the futex wake-up (well under 10 ms on an idle machine).
``at`` is converted once: a wall-clock step after the put does not move it.

Shared between processes
    ``PriorityQueue.create(name, ...)`` (or ``PriorityQueue(..., name=name)``)
    creates a control region ``/dev/shm/NAME`` (mode 0600: configuration and
    the doorbell every consumer sleeps on) and the rings ``NAME.L0``... and
    ``NAME.delay``; ``PriorityQueue.attach(name)`` in another process reads the
    configuration from the region. The rings are single-producer: one process
    at a time puts (its first ``put`` takes the producer role), and
    ``max_consumers=1`` (default) means one consuming process; with more, the
    level rings use competing consumers (``mode="shared"``, at-most-once
    across a consumer crash, like the ring). ``close_put()`` (or ``close()``
    in the producer) ends the stream: consumers drain, then get ``Closed``.
    ``PriorityQueue.unlink(name)`` removes every file.

Durable
    ``PriorityQueue(..., durable=True, path=DIR)`` keeps one segment log per
    level (``DIR/L0``...) plus ``DIR/delay``: queued messages survive a crash
    or restart. Delivery is at-least-once: ``get`` hands a message out,
    ``ack()`` marks everything this consumer was handed so far as processed
    (a durable group commit per log); whatever was not acked is delivered
    again after a restart. See :class:`DurablePriorityQueue`.
    ``KeyedQueue(..., durable=True, path=DIR)`` keeps a log per partition
    (plus ``DIR/D<p>`` for its delayed messages) with the same consumer-group
    protocol; ``consumer.ack()`` commits (see :class:`DurableKeyedQueue`).
    On both, a delayed message survives a restart with its wall-clock due
    time, and an acked one is not delivered again even when it came due
    before older ones (see :class:`_DelayLog`).

Failures and dead letters (durable queues)
    ``nack(delay=None, reason=None)`` rejects what was handed out since the
    last ``ack``/``nack``: it is delivered again after ``delay`` seconds,
    also after a restart. ``max_deliveries=N`` bounds the attempts (SQS
    ``maxReceiveCount``, JetStream ``MaxDeliver``): every hand-out is counted
    in the group's delivery journal ``DIR/deliveries/`` *before* the message
    is returned, so a consumer killed while processing has used one; a
    message handed out N times that fails again (nack, or a crash) goes to
    the dead-letter log ``DIR/dlq`` with its deliveries, their times and the
    last reason, and is never delivered again. ``queue-engine dlq
    ls|show|replay|purge DIR`` and :mod:`engine.deadletters` manage them.

Threads
    A handle's put side and get side may run on two different threads; two
    threads must not call ``get`` on the same handle at once (give each
    consumer thread its own handle: ``attach`` or ``kq.consumer()``).
    ``close()`` from another thread wakes a blocked ``get`` (``Closed``).
"""

from .._sched import stable_hash
from .durable import DurableKeyedQueue, DurablePriorityQueue
from .shared import KeyedConsumer, KeyedQueue, PriorityQueue

__all__ = ["PriorityQueue", "KeyedQueue", "KeyedConsumer", "DurablePriorityQueue", "DurableKeyedQueue",
           "stable_hash"]
