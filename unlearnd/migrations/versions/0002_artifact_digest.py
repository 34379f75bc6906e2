"""The digest of a request's artifact folder, checked by every replica before it loads the folder.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("forget_requests")}
    if "artifact_digest" not in columns:
        op.add_column("forget_requests", sa.Column("artifact_digest", sa.Text))


def downgrade() -> None:
    op.drop_column("forget_requests", "artifact_digest")
