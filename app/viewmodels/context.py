"""What a view-model builder is handed: one typed context per request, built by a dependency in `app.deps`.

Builders take a context instead of a list of positional parameters (connection, scope, model, layer, neuron,
settings, vocabulary, runner, ...), so a route is a dependency plus a call, and a panel's builder reads what it
needs from one place. Display options of a single request (``?context=``, ``?kind=``, ``?text=``) stay explicit
arguments of the builders that use them.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from app.live import LiveRunner
from app.queries import analyses as q
from app.queries.models import Model
from app.settings import Settings
from app.urls import Scope, neuron_label

#: Rows kept per token table on a page.
TOKEN_TABLE_ROWS = 10


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds a connection
class ModelViewContext:
    """One model of the run in scope, and what a builder reads it with."""

    conn: sqlite3.Connection  # read-only, with the request's SQL deadline (app.db)
    scope: Scope  # the run looked at, and the universality threshold in effect
    model: Model
    settings: Settings
    vocab: Sequence[str]  # the run's token texts, index = token id (cached per run by AppState)
    live: LiveRunner  # bounded live re-runs; call it after the SQL work (see app.live)

    @property
    def threshold(self) -> float:
        """The universality threshold in effect (``?threshold=``, default: the run's)."""
        return self.scope.threshold


@dataclass(frozen=True, eq=False)
class NeuronViewContext(ModelViewContext):
    """One neuron (it exists: `app.deps.get_neuron` 404s otherwise) of a model of the run in scope.

    The rows that several panels read (activation and weight statistics, token tables, percentiles) are read once
    per request, on first use.
    """

    layer: int
    neuron: int

    @property
    def label(self) -> str:
        return neuron_label(self.layer, self.neuron)

    @property
    def key(self) -> q.Key:
        """The analysis tables' key (model id, layer, neuron)."""
        return (self.model.id, self.layer, self.neuron)

    # A frozen dataclass keeps an instance __dict__, which functools.cached_property writes to directly.
    @functools.cached_property
    def activation_stats(self) -> q.ActivationStats | None:
        """Read by the activation panel and by the examples' colour scale."""
        return q.activation_stats(self.conn, self.key)

    @functools.cached_property
    def weight_stats(self) -> dict[str, float | None] | None:
        """Read by the weights, vocabulary and roles panels."""
        return q.weight_stats(self.conn, self.key)

    @functools.cached_property
    def token_tables(self) -> dict[str, list[q.TokenRow]]:
        """The first `TOKEN_TABLE_ROWS` of each token table, read by the vocabulary and token-table panels."""
        return q.token_tables(self.conn, self.key, TOKEN_TABLE_ROWS)

    @functools.cached_property
    def percentiles(self) -> dict[str, float]:
        """Within-layer percentiles, read by the activation and weights panels."""
        return q.percentiles(self.conn, self.key)
