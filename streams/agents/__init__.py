"""Faust agents of the pipeline role: forward requests to RabbitMQ, sink to PostgreSQL, settle quotas."""
