"""neuron analyses

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 03:33:40.022163
"""

from alembic import op
import sqlalchemy as sa


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "activation_stats",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False, comment="counted tokens the moments cover"),
        sa.Column("pre_mean", sa.Float(), nullable=True, comment="mean of mlp.hook_pre"),
        sa.Column("pre_var", sa.Float(), nullable=True, comment="population variance of mlp.hook_pre"),
        sa.Column("pre_skew", sa.Float(), nullable=True),
        sa.Column("pre_kurt", sa.Float(), nullable=True, comment="non-excess kurtosis: a Gaussian gives 3"),
        sa.Column("pre_min", sa.Float(), nullable=True),
        sa.Column("pre_max", sa.Float(), nullable=True),
        sa.Column("frequency", sa.Float(), nullable=True, comment="activation frequency P(hook_pre > 0)"),
        sa.Column("post_mean", sa.Float(), nullable=True, comment="mean of mlp.hook_post"),
        sa.Column("post_var", sa.Float(), nullable=True),
        sa.Column("post_skew", sa.Float(), nullable=True),
        sa.Column("post_kurt", sa.Float(), nullable=True),
        sa.Column("post_min", sa.Float(), nullable=True),
        sa.Column("post_max", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron"),
    )
    op.create_table(
        "attention_scores",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False, comment="0 = largest |score|"),
        sa.Column("attention_layer", sa.Integer(), nullable=False),
        sa.Column("head", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "rank"),
    )
    op.create_table(
        "entropy_interventions",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False, comment="the fixed activation (hook_post)"),
        sa.Column(
            "is_baseline", sa.Boolean(), nullable=False, comment="a random last-two-layer neuron, for comparison"
        ),
        sa.Column("ln_scale", sa.Float(), nullable=False, comment="mean final LN scale"),
        sa.Column("entropy", sa.Float(), nullable=False, comment="mean next-token entropy (nats)"),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("reciprocal_rank", sa.Float(), nullable=False, comment="mean 1/(rank+1) of the true next token"),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column(
            "nominal_ln_scale",
            sa.Float(),
            nullable=True,
            comment="the same means without intervention (same for every row of a model)",
        ),
        sa.Column("nominal_entropy", sa.Float(), nullable=True),
        sa.Column("nominal_loss", sa.Float(), nullable=True),
        sa.Column("nominal_reciprocal_rank", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "value"),
    )
    op.create_table(
        "examples",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False, comment="top | quantile | random"),
        sa.Column("rank", sa.Integer(), nullable=False, comment="order within (kind, bin)"),
        sa.Column("bin", sa.Integer(), nullable=False, comment="quantile bin index (0 for top and random)"),
        sa.Column("bin_low", sa.Float(), nullable=True, comment="activation range of the quantile bin"),
        sa.Column("bin_high", sa.Float(), nullable=True),
        sa.Column("bin_fraction", sa.Float(), nullable=True, comment="share of counted tokens in the bin"),
        sa.Column("dataset_row", sa.Integer(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False, comment="position in the row of the snippet's first token"),
        sa.Column("peak", sa.Integer(), nullable=False, comment="index in the snippet of the example's token"),
        sa.Column("activation", sa.Float(), nullable=False, comment="hook_post at the example's token"),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False, comment="int32[snippet]"),
        sa.Column(
            "activations", sa.LargeBinary(), nullable=False, comment="float16[snippet]: hook_post of every token"
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "kind", "rank", "bin"),
    )
    op.create_table(
        "families",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column(
            "family",
            sa.String(),
            nullable=False,
            comment="unigram | alphabet | previous_token | position | syntax | semantic | none",
        ),
        sa.Column("best_feature", sa.String(), nullable=True),
        sa.Column("best_vr", sa.Float(), nullable=True, comment="variance reduction of the best feature (paper eq. 4)"),
        sa.Column(
            "position_mi", sa.Float(), nullable=True, comment="binary mutual information of firing with position"
        ),
        sa.Column("evidence", sa.JSON(), nullable=True, comment="how the label was reached"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron"),
    )
    with op.batch_alter_table("families", schema=None) as batch_op:
        batch_op.create_index("ix_families_family", ["model_id", "family"], unique=False)

    op.create_table(
        "feature_scores",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("feature", sa.String(), nullable=False, comment="e.g. token:def, prev_token:(, syntax:keyword"),
        sa.Column(
            "feature_set",
            sa.String(),
            nullable=False,
            comment="unigram | alphabet | token_class | previous_token | position | syntax | spacy",
        ),
        sa.Column("variance_reduction", sa.Float(), nullable=False),
        sa.Column("fraction", sa.Float(), nullable=True, comment="share of counted tokens where the feature holds"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "rank"),
    )
    op.create_table(
        "histograms",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("hook", sa.String(), nullable=False, comment="hook_pre | hook_post"),
        sa.Column("low", sa.Float(), nullable=False, comment="left edge of the first regular bin"),
        sa.Column("high", sa.Float(), nullable=False, comment="right edge of the last regular bin"),
        sa.Column("n_bins", sa.Integer(), nullable=False, comment="regular bins between low and high"),
        sa.Column(
            "counts", sa.LargeBinary(), nullable=False, comment="int64[n_bins + 2]: underflow, bins..., overflow"
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "hook"),
    )
    op.create_table(
        "path_ablations",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("attention_layer", sa.Integer(), nullable=False),
        sa.Column("head", sa.Integer(), nullable=False),
        sa.Column("pearson_bos", sa.Float(), nullable=True, comment="corr(activation, change in attention to BOS)"),
        sa.Column("spearman_bos", sa.Float(), nullable=True),
        sa.Column("pearson_norm", sa.Float(), nullable=True, comment="corr(activation, change in |z|)"),
        sa.Column("spearman_norm", sa.Float(), nullable=True),
        sa.Column("n_points", sa.Integer(), nullable=False),
        sa.Column(
            "points", sa.LargeBinary(), nullable=False, comment="float32[n, 3]: activation, d_bos_attention, d_norm"
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "attention_layer", "head"),
    )
    op.create_table(
        "percentiles",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("statistic", sa.String(), nullable=False, comment="a column of activation_stats or weight_stats"),
        sa.Column("percentile", sa.Float(), nullable=False, comment="0-100 within the neuron's layer (paper Fig. 3)"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "statistic"),
    )
    op.create_table(
        "position_profiles",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("hook", sa.String(), nullable=False, comment="hook_pre | hook_post"),
        sa.Column("mean", sa.LargeBinary(), nullable=False, comment="float32[ctx]: mean activation at each position"),
        sa.Column("std", sa.LargeBinary(), nullable=False, comment="float32[ctx]: standard deviation at each position"),
        sa.Column("count", sa.LargeBinary(), nullable=False, comment="int64[ctx]: counted tokens at each position"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "hook"),
    )
    op.create_table(
        "roles",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("vocab_role", sa.String(), nullable=True, comment="prediction | suppression | partition | NULL"),
        sa.Column(
            "entropy_rank",
            sa.Integer(),
            nullable=True,
            comment="rank by null_space_fraction * |w_out| among candidates",
        ),
        sa.Column(
            "attention_role",
            sa.String(),
            nullable=True,
            comment="deactivation | activation | NULL, for the strongest head",
        ),
        sa.Column("attention_layer", sa.Integer(), nullable=True),
        sa.Column("attention_head", sa.Integer(), nullable=True),
        sa.Column(
            "attention_score", sa.Float(), nullable=True, comment="h = w_out^T W_Q k_BOS / sqrt(d_head), unit w_out"
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron"),
    )
    op.create_table(
        "token_tables",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.String(),
            nullable=False,
            comment="unembed_top | unembed_bottom (W_U w_out), embed_top (W_E w_in), mean_activation, max_activation",
        ),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=True, comment="occurrences among counted tokens (activation tables)"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron", "kind", "rank"),
    )
    with op.batch_alter_table("token_tables", schema=None) as batch_op:
        batch_op.create_index("ix_token_tables_token", ["model_id", "kind", "token_id"], unique=False)

    op.create_table(
        "weight_stats",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("neuron", sa.Integer(), nullable=False),
        sa.Column("w_in_norm", sa.Float(), nullable=False, comment="|w_in| of the processed weights"),
        sa.Column("w_out_norm", sa.Float(), nullable=False),
        sa.Column("input_bias", sa.Float(), nullable=False, comment="b_in after folding LN"),
        sa.Column("in_out_sim", sa.Float(), nullable=False, comment="cos(w_in, w_out)"),
        sa.Column("l2_penalty", sa.Float(), nullable=False, comment="|w_in|^2 + |w_out|^2"),
        sa.Column(
            "vocab_mean", sa.Float(), nullable=False, comment="mean over the vocabulary of cos(W_U[:, v], w_out)"
        ),
        sa.Column("vocab_var", sa.Float(), nullable=False),
        sa.Column("vocab_skew", sa.Float(), nullable=False),
        sa.Column("vocab_kurt", sa.Float(), nullable=False, comment="non-excess: a random direction gives about 3"),
        sa.Column(
            "null_space_fraction", sa.Float(), nullable=True, comment="share of |w_out|^2 in W_U's near-null space"
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "layer", "neuron"),
    )


def downgrade() -> None:
    op.drop_table("weight_stats")
    with op.batch_alter_table("token_tables", schema=None) as batch_op:
        batch_op.drop_index("ix_token_tables_token")

    op.drop_table("token_tables")
    op.drop_table("roles")
    op.drop_table("position_profiles")
    op.drop_table("percentiles")
    op.drop_table("path_ablations")
    op.drop_table("histograms")
    op.drop_table("feature_scores")
    with op.batch_alter_table("families", schema=None) as batch_op:
        batch_op.drop_index("ix_families_family")

    op.drop_table("families")
    op.drop_table("examples")
    op.drop_table("entropy_interventions")
    op.drop_table("attention_scores")
    op.drop_table("activation_stats")
