"""Alembic migrations of the registry schema (run by `unlearnd.database.migrate`), one for every database."""
