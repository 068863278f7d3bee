"""Maintainers' tools for the imagecb provider: the real Airflow stack harness and its pytest fixtures."""
