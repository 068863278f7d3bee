"""Alembic history of the imagecb provider's tables (run by ``CallbackDBManager``)."""
