"""The tests' PostgreSQL server: `unlearnd.bench.postgres` (the propagation benchmark starts one too)."""

from unlearnd.bench.postgres import PostgresServer, postgres_bin

__all__ = ["PostgresServer", "postgres_bin"]
