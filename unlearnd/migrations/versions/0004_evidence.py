"""Evidence: per forget request, the probe battery's last result (or the queued / running job).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evidence",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16)),
        sa.Column("requested_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("claim", sa.String(32)),  # the running battery's token: only its runner may save the result
        sa.Column("heartbeat", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("error", sa.Text),
        sa.Column("report", sa.Text),
        sa.Column("markdown", sa.Text),
        sa.Column("png", sa.LargeBinary),
    )


def downgrade() -> None:
    op.drop_table("evidence")
