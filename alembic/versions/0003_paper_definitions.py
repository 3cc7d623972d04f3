"""paper definitions: the paper's activation frequency next to ours (issue 7)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00.000000

``activation_stats.frequency_paper`` holds the paper's published ``sparsity``: P(hook_pre > e) with e = -0.0980391,
the float32 edge of linspace(-10, 15, 256) just below its first edge >= 0, where the paper's code starts counting
histogram bins (docs/analyses.md, "Our definitions and the paper's"). Files written before this revision get NULL.
"""

from alembic import op
import sqlalchemy as sa


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite's ALTER TABLE is limited; adding a nullable column needs no copy of the table
    with op.batch_alter_table("activation_stats") as batch:
        batch.add_column(
            sa.Column(
                "frequency_paper",
                sa.Float(),
                nullable=True,
                comment="the paper's sparsity: P(hook_pre > e), e = -0.0980391 the float32 edge of linspace(-10, 15, "
                "256) just below its first edge >= 0, where the paper's code starts counting bins (revision 0003)",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("activation_stats") as batch:
        batch.drop_column("frequency_paper")
