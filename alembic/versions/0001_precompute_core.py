"""precompute core

Revision ID: 0001
Revises:
Create Date: 2026-11-26 03:26:41.067210
"""

from alembic import op
import sqlalchemy as sa


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.String(), nullable=False, comment="UTC ISO-8601 time the run started"),
        sa.Column(
            "finished_at", sa.String(), nullable=True, comment="UTC ISO-8601 time the run was marked complete or failed"
        ),
        sa.Column("status", sa.String(), nullable=False, comment="running | complete | failed"),
        sa.Column("config_hash", sa.String(), nullable=False, comment="sha256 of `config`; a re-run with it resumes"),
        sa.Column("config", sa.JSON(), nullable=False, comment="the run's full configuration: every stage's config"),
        sa.Column("environment", sa.JSON(), nullable=False, comment="versions of Python, torch, transformers, ..."),
        sa.Column("dataset", sa.JSON(), nullable=False, comment="source, ctx, rows, token filter, corpus fingerprint"),
        sa.Column("tokens_seen", sa.Integer(), nullable=True, comment="tokens run through the models"),
        sa.Column(
            "tokens_counted", sa.Integer(), nullable=True, comment="tokens left after the BOS/EOS/pad/newline filter"
        ),
        sa.Column("timings", sa.JSON(), nullable=True, comment="seconds per stage"),
        sa.Column("stages", sa.JSON(), nullable=True, comment="stages completed, in order"),
        sa.Column("error", sa.Text(), nullable=True, comment="why the run failed"),
        sa.Column(
            "content_hash", sa.String(), nullable=True, comment="hash of the finished results; the ETag of every page"
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False, comment="TransformerLens name or local folder basename"),
        sa.Column("source", sa.String(), nullable=False, comment="what was loaded: a TransformerLens name or a path"),
        sa.Column("position", sa.Integer(), nullable=False, comment="order of the model on the command line"),
        sa.Column("is_reference", sa.Boolean(), nullable=False, comment="first model of the family"),
        sa.Column("n_layers", sa.Integer(), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column("d_mlp", sa.Integer(), nullable=False),
        sa.Column("d_vocab", sa.Integer(), nullable=False),
        sa.Column("n_ctx", sa.Integer(), nullable=False),
        sa.Column("n_heads", sa.Integer(), nullable=False),
        sa.Column("act_fn", sa.String(), nullable=False),
        sa.Column("processing", sa.JSON(), nullable=False, comment="weight processing flags (fold_ln, center_*)"),
        sa.Column("tokenizer_hash", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "name"),
    )
    op.create_table(
        "vocab",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False, comment="decoded text of the token (' the', not 'Ġthe')"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "token_id"),
    )
    op.create_table(
        "distributions",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("quantity", sa.String(), nullable=False, comment="e.g. mean_corr, mean_baseline, excess_corr"),
        sa.Column("bin_edges", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("quantiles", sa.JSON(), nullable=False, comment="{'0.5': ..., '0.9': ..., ...}"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "quantity"),
    )
    op.create_table(
        "layer_summaries",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("n_neurons", sa.Integer(), nullable=False),
        sa.Column("n_dead", sa.Integer(), nullable=False),
        sa.Column("n_universal", sa.Integer(), nullable=True, comment="excess_corr > the run's threshold"),
        sa.Column("mean_excess", sa.Float(), nullable=True),
        sa.Column("max_excess", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer"),
    )
    op.create_table(
        "matches",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("partner_model_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False, comment="0 = best match"),
        sa.Column("partner_layer", sa.Integer(), nullable=False),
        sa.Column("partner_neuron", sa.Integer(), nullable=False),
        sa.Column("corr", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["partner_model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "partner_model_id", "rank"),
    )
    with op.batch_alter_table("matches", schema=None) as batch_op:
        batch_op.create_index(
            "ix_matches_partner", ["partner_model_id", "partner_layer", "partner_neuron"], unique=False
        )

    op.create_table(
        "neurons",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("dead", sa.Boolean(), nullable=False, comment="zero variance over the counted tokens"),
        sa.Column("max_corr", sa.Float(), nullable=True, comment="max over partners of the partner's max correlation"),
        sa.Column("mean_corr", sa.Float(), nullable=True, comment="mean over partners of the max correlation"),
        sa.Column("min_corr", sa.Float(), nullable=True, comment="min over partners of the max correlation"),
        sa.Column(
            "max_baseline",
            sa.Float(),
            nullable=True,
            comment="max over partners of the max rotated-baseline correlation",
        ),
        sa.Column(
            "mean_baseline",
            sa.Float(),
            nullable=True,
            comment="mean over partners of the max rotated-baseline correlation",
        ),
        sa.Column(
            "min_baseline",
            sa.Float(),
            nullable=True,
            comment="min over partners of the max rotated-baseline correlation",
        ),
        sa.Column("excess_corr", sa.Float(), nullable=True, comment="mean_corr - mean_baseline (paper eq. 3)"),
        sa.Column("universal", sa.Boolean(), nullable=True, comment="excess_corr > the run's threshold"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron"),
    )
    with op.batch_alter_table("neurons", schema=None) as batch_op:
        batch_op.create_index("ix_neurons_model_excess", ["model_id", "excess_corr"], unique=False)

    op.create_table(
        "partner_scores",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("partner_model_id", sa.Integer(), nullable=False),
        sa.Column("max_corr", sa.Float(), nullable=False, comment="max correlation with any partner neuron"),
        sa.Column("max_layer", sa.Integer(), nullable=False),
        sa.Column("max_neuron", sa.Integer(), nullable=False),
        sa.Column("baseline_corr", sa.Float(), nullable=False, comment="max correlation with any rotated partner unit"),
        sa.Column("baseline_layer", sa.Integer(), nullable=False),
        sa.Column("baseline_unit", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["partner_model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "partner_model_id"),
    )


def downgrade() -> None:
    op.drop_table("partner_scores")
    with op.batch_alter_table("neurons", schema=None) as batch_op:
        batch_op.drop_index("ix_neurons_model_excess")

    op.drop_table("neurons")
    with op.batch_alter_table("matches", schema=None) as batch_op:
        batch_op.drop_index("ix_matches_partner")

    op.drop_table("matches")
    op.drop_table("layer_summaries")
    op.drop_table("distributions")
    op.drop_table("vocab")
    op.drop_table("models")
    op.drop_table("runs")
