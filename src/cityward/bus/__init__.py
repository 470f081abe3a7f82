"""The message bus: NATS JetStream for what several cityward processes must share.

- :mod:`cityward.bus.nats`: :class:`JetStream`, a synchronous facade over ``nats-py`` (its own
  asyncio loop in a daemon thread), for write hooks, worker threads and any other plain code;
- :mod:`cityward.bus.feed`: the data bank's change feed over JetStream (a transactional outbox,
  its relay, and followers that feed a local :class:`~cityward.bank.changes.ChangeFeed`);
- :mod:`cityward.bus.settings`: ``[bus]`` in the configuration.

``docs/bus.md`` explains how it fits together and what it guarantees.
"""

# Nothing is imported here: cityward.config imports cityward.bus.settings, and the settings
# must not pull nats-py into every process that reads its configuration.
