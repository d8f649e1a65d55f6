"""Clients of the outside services (RabbitMQ, the model) and the bridges between them and the log."""
