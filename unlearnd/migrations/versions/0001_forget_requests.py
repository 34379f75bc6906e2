"""The forget_requests table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("forget_requests"):
        return  # a registry created before migrations existed: the same table, adopted as it is
    op.create_table(
        "forget_requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("heartbeat", sa.Double),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("spec", sa.Text, nullable=False),
    )
    op.create_index("forget_requests_status", "forget_requests", ["status"])


def downgrade() -> None:
    op.drop_index("forget_requests_status", table_name="forget_requests")
    op.drop_table("forget_requests")
