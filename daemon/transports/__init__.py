"""Transports move bytes between clients and the backend; they never touch the model."""
