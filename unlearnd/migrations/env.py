"""Alembic's entry point: migrations run on the connection `unlearnd.database.migrate` hands over
(under its lock), never from a URL of their own."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the registry migrations through unlearnd.database.migrate")
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
