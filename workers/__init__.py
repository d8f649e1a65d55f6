"""ML workers: consume RabbitMQ work queues, call the model with batching, retries and a circuit breaker."""

from workers.worker import MLWorker, no_cancellations

__all__ = ["MLWorker", "no_cancellations"]
