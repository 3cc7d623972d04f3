"""Runs imported from the paper's published tables (`precompute.published`): what they hold, what they lack, and
the paper's prediction/suppression labels of GPT-2-medium-a's neurons (issue 7).

A published run holds one model's universal neurons only (the rows of the paper's universal.csv) with their
correlation scores, weight statistics and pre-activation moments. There are no weights, tokens or partners in it,
so the pages say once, plainly, what is missing and which precompute computes it, instead of showing empty panels.

The prediction/suppression labels (``prediction_neurons.csv``, paper §5.1, Fig 24) are read from the package data
here, not imported into the atlas: the atlas has no column for a label's token class (``roles.vocab_role`` holds our
own kurtosis/skew rule, which these labels are not), and an import that wrote them would change the import's
configuration hash of files imported before.
"""

from __future__ import annotations

import functools
import shlex
from typing import Literal

from pydantic import Field

from app.queries.models import Model
from app.queries.runs import Run
from app.viewmodels.common import ViewModel

#: What the published tables do not have, in the words the pages use.
LACKS = (
    "the neurons below the universality threshold (the table lists the universal neurons only)",
    "each partner's twin and top matches",
    "top, quantile and random examples; activation histograms and position profiles; tokens by activation",
    "post-activation moments and the activation frequency P(hook_pre > 0)",
    "the vocabulary projection's tokens and within-layer percentiles (paper Fig. 3)",
    "families, and the entropy and attention roles",
    "the weights themselves: no live re-runs, twins side by side or interventions",
)
#: What they do have.
HOLDS = (
    "max/mean/min correlation with the partner seeds, the rotated baselines and the excess correlation",
    "weight statistics (norms, input bias, cos(w_in, w_out), L2 penalty, vocabulary moments)",
    "pre-activation moments (mean, variance, skew, kurtosis of mlp.hook_pre)",
)
#: The paper's correlations used 100M tokens of the Pile test split (paper-spec §1.2).
PAPER_TOKENS = 100_000_000


class PublishedNote(ViewModel):
    """A run imported from the paper's released tables: where it comes from, and how to compute the rest."""

    source: str = Field(description="Who published the table (Gurnee et al. 2024)")
    repository: str = Field(description="The repository and commit the table comes from")
    table: str = Field(description="The table's file, e.g. stanford-gpt2-small-a/universal.csv")
    holds: list[str] = Field(description="What the table gives per neuron")
    lacks: list[str] = Field(description="What the table does not have (shown nowhere for this run)")
    command: str = Field(description="The precompute that computes everything from the TransformerLens models")


class PaperLabel(ViewModel):
    """A neuron's label in the paper's prediction_neurons.csv (GPT-2-medium-a, paper §5.1, Fig 24)."""

    role: Literal["prediction", "suppression"] = Field(description="Promotes or suppresses the token class")
    feature: str = Field(description="The token class, e.g. all_caps, is_year, contains_open_paren")


def precompute_command(run: Run) -> str:
    """The command that computes a published run's model with its partner seeds, from their TransformerLens names:
    the paper's configuration (``--preset paper``: the Pile's test split, rows of 512, threshold 0.5) and, as the
    paper did, the reference model against each partner only (``--reference-only``).

    >>> run = Run(1, "t", None, "complete", "h", [], None, None,
    ...           {"models": ["pythia-160m"], "partners": ["pythia-160m-seed1", "pythia-160m-seed2"]}, {}, {}, {})
    >>> precompute_command(run).split(" --tokens 100000000 ")[1]
    'pythia-160m pythia-160m-seed1 pythia-160m-seed2'
    >>> precompute_command(run).split(" --tokens")[0]
    'universal-neurons precompute --preset paper --reference-only --db pythia-160m.db --device cuda'
    """
    models = [str(m) for m in (*run.config.get("models", []), *run.config.get("partners", []))]
    db = f"{models[0]}.db" if models else "atlas.db"
    options = ["--preset", "paper", "--reference-only", "--db", db, "--device", "cuda", "--tokens", str(PAPER_TOKENS)]
    return shlex.join(["universal-neurons", "precompute", *options, *models])


def published_note(run: Run) -> PublishedNote | None:
    """The note of a published run; None for a run of ours."""
    info = run.published
    if info is None:
        return None
    repository = str(info.get("repository", ""))
    commit = str(info.get("commit", ""))
    return PublishedNote(
        source=str(info.get("source", "published")),
        repository=f"{repository}@{commit}" if repository and commit else repository,
        table=str(info.get("table", "")),
        holds=list(HOLDS),
        lacks=list(LACKS),
        command=precompute_command(run),
    )


@functools.cache
def _prediction_labels(model: str) -> dict[tuple[int, int], tuple[PaperLabel, ...]]:
    # precompute.published imports torch (through precompute.correlation): only a published page needs it.
    from precompute.published import PAPER_TABLES, prediction_labels

    if "prediction_neurons.csv" not in PAPER_TABLES.get(model, ()):
        return {}
    return {
        key: tuple(
            PaperLabel(role="suppression" if label.is_suppression else "prediction", feature=label.feature)
            for label in labels
        )
        for key, labels in prediction_labels(model).items()
    }


def paper_labels(run: Run, model: Model, layer: int, neuron: int) -> list[PaperLabel]:
    """The paper's prediction/suppression labels of a neuron of a published run (only GPT-2-medium-a has any)."""
    if run.published is None:
        return []
    return list(_prediction_labels(model.name).get((layer, neuron), ()))
