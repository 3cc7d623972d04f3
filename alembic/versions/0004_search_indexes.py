"""search indexes: neurons by feature, by role, and top examples by their peak token (issue 10)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 12:00:00.000000

The dashboard's search ranks neurons by how strongly they are tied to a token, a feature, a family or a role,
reading only index ranges (docs/api.md, "Search"). ``ix_examples_top_peak`` is a partial expression index: the
token id a top example peaks on is the 4 bytes at ``peak * 4`` of its int32 ``token_ids`` BLOB. Files written
before this revision are still searched (the app checks for the index), more slowly.
"""

from alembic import op
import sqlalchemy as sa


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_examples_top_peak",
        "examples",
        ["model_id", sa.text("substr(token_ids, peak * 4 + 1, 4)")],
        unique=False,
        sqlite_where=sa.text("kind = 'top'"),
    )
    op.create_index("ix_feature_scores_feature", "feature_scores", ["model_id", "feature"], unique=False)
    op.create_index("ix_roles_vocab_role", "roles", ["model_id", "vocab_role"], unique=False)
    op.create_index("ix_roles_attention_role", "roles", ["model_id", "attention_role"], unique=False)
    op.create_index("ix_roles_entropy_rank", "roles", ["model_id", "entropy_rank"], unique=False)


def downgrade() -> None:
    for name, table in (
        ("ix_roles_entropy_rank", "roles"),
        ("ix_roles_attention_role", "roles"),
        ("ix_roles_vocab_role", "roles"),
        ("ix_feature_scores_feature", "feature_scores"),
        ("ix_examples_top_peak", "examples"),
    ):
        op.drop_index(name, table_name=table)
