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

It also creates the pool every submitting task runs in (``imagecb_submissions``, one slot), once:
Airflow never schedules a task whose pool does not exist, and says so only in the scheduler's
log. A pool that exists is left as it is, whatever its slots (see :func:`ensure_submission_pool`).
"""

from __future__ import annotations

from pathlib import Path

from airflow.utils.db_manager import BaseDBManager
from sqlalchemy.exc import IntegrityError

from imagecb_provider.callbacks.schema import VERSION_TABLE, metadata

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SUBMISSION_POOL_SLOTS = 1
SUBMISSION_POOL_DESCRIPTION = "imagecb submissions"


def ensure_submission_pool(session) -> bool:
    """
    Create the pool ``imagecb_submissions`` with one slot unless a pool of that name exists.

    Never changes an existing pool: slots a user set stay. A deferred task does not hold its slot
    (``include_deferred`` is off), as with ``airflow pools set``.

    :param session: a session on Airflow's metadata database.
    :return: whether the pool was created.
    """
    from airflow.models.pool import Pool
    from sqlalchemy import select

    from imagecb_provider.utils.pacing import SUBMISSION_POOL

    if session.scalar(select(Pool.id).where(Pool.pool == SUBMISSION_POOL)) is not None:
        return False
    session.add(
        Pool(
            pool=SUBMISSION_POOL,
            slots=SUBMISSION_POOL_SLOTS,
            description=SUBMISSION_POOL_DESCRIPTION,
            include_deferred=False,
        )
    )
    try:
        session.commit()
    except IntegrityError:
        # Another migrate made it between the select and the commit: theirs is as good.
        session.rollback()
        return False
    return True


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

    # The pool rides on the two entry points Airflow calls: initdb (a new database, `db reset`)
    # and upgradedb (`db migrate` on a migrated one). Drop these overrides with the pool.
    def initdb(self, use_migration_files=False):
        """Create or upgrade the tables, then make sure the submission pool exists."""
        super().initdb(use_migration_files=use_migration_files)
        self._ensure_pool()

    def upgradedb(self, to_revision=None, from_revision=None, show_sql_only=False, use_migration_files=False):
        """Upgrade the tables, then make sure the submission pool exists (not with ``show_sql_only``)."""
        super().upgradedb(
            to_revision=to_revision,
            from_revision=from_revision,
            show_sql_only=show_sql_only,
            use_migration_files=use_migration_files,
        )
        if not show_sql_only:
            self._ensure_pool()

    def _ensure_pool(self) -> None:
        from imagecb_provider.utils.pacing import SUBMISSION_POOL

        if ensure_submission_pool(self.session):
            self.log.info(
                "Created the pool %s with %d slot: every task that submits images runs in it",
                SUBMISSION_POOL,
                SUBMISSION_POOL_SLOTS,
            )
