"""Clients of the external services (RabbitMQ, Redis, PostgreSQL, the model service, webhook receivers).

Each is a ``mode.Service`` that connects lazily and closes on stop; driver
errors are translated here into Inferstream's own (``CacheUnavailable``,
``StoreUnavailable``, ``PublishError``, ``ModelError``). The pipeline stages in
``bridges/`` and ``streams/`` are handed these clients; they never build them.
"""
