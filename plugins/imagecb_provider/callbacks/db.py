"""
``CallbackDBManager``: creates and migrates the provider's tables the Airflow way.

Declared under the provider info key ``db-managers``, it is run by ``airflow db migrate``
(and ``airflow db reset`` drops its tables), with its own alembic history and version table
(``imagecb_alembic_version``) next to Airflow's. Without the installed provider, list it in
``[database] external_db_managers`` instead.

A new database gets the tables of :mod:`~imagecb_provider.callbacks.schema` and is stamped with
the head revision; one an older release made is upgraded through ``migrations/versions`` (0001
created the tables, 0002 makes a task id unique per connection and purpose). Both must give the
same schema: ``tests/callbacks/test_migrations.py`` and ``test_postgres.py`` compare them.
"""

from __future__ import annotations

from pathlib import Path

from airflow.utils.db_manager import BaseDBManager

from imagecb_provider.callbacks.schema import VERSION_TABLE, metadata

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class CallbackDBManager(BaseDBManager):
    """Manage the ``imagecb_callback`` and ``imagecb_callback_cursor`` tables."""

    metadata = metadata
    version_table_name = VERSION_TABLE
    migration_dir = str(MIGRATIONS)
    #: Unused: no ini file ships with the provider, :meth:`get_alembic_config` builds the config.
    alembic_file = ""
    supports_table_dropping = True

    def get_alembic_config(self):
        """Build the alembic config in code (script location and Airflow's database URL)."""
        from airflow import settings
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", self.migration_dir.replace("%", "%%"))
        config.set_main_option("sqlalchemy.url", settings.SQL_ALCHEMY_CONN.replace("%", "%%"))
        return config
