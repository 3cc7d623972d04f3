"""The ``correlations`` stage: run the streaming `CorrelationEngine` and write the universality tables.

The engine (`precompute.correlation`) folds every batch's ``mlp.hook_post`` into cross-model products, in as many
passes as its memory budget needs; at the end `precompute.universality` turns its per-partner results into each
neuron's scores (paper eq. 3) and the rows of ``neurons``, ``partner_scores``, ``matches``, ``layer_summaries``
and ``distributions``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from precompute.activations import ActivationBatch
from precompute.correlation import CorrelationEngine, ModelShape, plan_correlations
from precompute.distributed import Distributed
from precompute.memory import StageMemory
from precompute.models import LoadedModel
from precompute.stages.base import RunContext, RunInputs, Stage, batch_tokens, split_of
from precompute.store import WRITE_CHUNK_BYTES, distributions, layer_summaries, matches, neurons, partner_scores
from precompute.universality import (
    distribution_rows,
    layer_summary_rows,
    match_columns,
    neuron_columns,
    partner_columns,
    score_model,
    universal_fraction,
)

logger = logging.getLogger(__name__)


def model_shapes(models: Sequence[LoadedModel]) -> list[ModelShape]:
    """The shapes the engine needs of every model, in the run's order."""
    return [ModelShape(m.name, m.n_layers, m.d_mlp) for m in models]


class CorrelationStage(Stage):
    """The ``correlations`` stage: runs the `CorrelationEngine` and writes the universality tables."""

    name = "correlations"
    tables = (neurons, partner_scores, matches, layer_summaries, distributions)
    hooks = CorrelationEngine.hooks
    splittable = True

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.shapes = model_shapes(inputs.models)
        passes = split_of(inputs).passes_for(self.name)
        rank, world_size = getattr(inputs, "rank", 0), getattr(inputs, "world_size", 1)
        self.engine = CorrelationEngine(
            self.shapes,
            inputs.config.correlation,
            device=inputs.config.device,
            n_passes=passes,
            rank=rank,
            world_size=world_size,
        )
        logger.info(
            "correlations: %d model pairs in %d pass(es), %s products",
            len(self.engine.pairs),
            self.engine.n_passes,
            self.engine.precision,
        )
        if self.engine.ranks_split_passes:
            logger.info(
                "correlations: the %d ranks split the passes: this rank makes passes %s of %d, over every row",
                world_size,
                self.engine.schedule,
                self.engine.n_passes,
            )

    @classmethod
    def memory_bytes(cls, inputs: RunInputs) -> StageMemory:
        """The engine's plan (`precompute.correlation.CorrelationPlan.memory`), and for writing a few float64
        arrays per neuron of the largest model (its scores) and a chunk of rows."""
        device = torch.device(inputs.config.device)
        shapes = model_shapes(inputs.models)
        passes = split_of(inputs).passes_for(cls.name)
        ranks = getattr(inputs, "world_size", 1)  # each rank holds the largest of its own passes
        plan = plan_correlations(shapes, inputs.config.correlation, device, passes, ranks=ranks)
        memory = plan.memory(batch_tokens(inputs))
        largest = max(shape.n_neurons for shape in shapes)
        return dataclasses.replace(memory, write=16 * largest * 8 + WRITE_CHUNK_BYTES)

    @property
    def done_streaming(self) -> bool:
        return self.engine.done

    def update(self, batch: ActivationBatch) -> None:
        self.engine.update(batch)

    @classmethod
    def models_by_pass(cls, inputs: RunInputs) -> list[frozenset[str] | None]:
        """Every model in the first pass (the sums), then the models of each pass's blocks and Gram matrices
        (`CorrelationPlan.models_in_pass`)."""
        shapes = model_shapes(inputs.models)
        plan = plan_correlations(
            shapes,
            inputs.config.correlation,
            torch.device(inputs.config.device),
            split_of(inputs).passes_for(cls.name),
        )
        by_pass: list[frozenset[str] | None] = []
        for index in range(len(plan.passes)):
            wanted = plan.models_in_pass(index)
            by_pass.append(None if wanted is None else frozenset(shapes[m].name for m in wanted))
        return by_pass

    def models_in_pass(self) -> frozenset[str] | None:
        return self.engine.models_in_pass()

    def share_pilot(self, group: Distributed, batch: ActivationBatch | None) -> None:
        self.engine.share_pilot(group, batch)

    def reduce(self, group: Distributed) -> None:
        self.engine.reduce(group)

    @property
    def reads_every_row(self) -> bool:
        return self.engine.ranks_split_passes and not self.engine.done

    def gather(self, group: Distributed) -> None:
        self.engine.gather(group)

    def passes_by_rank(self, world_size: int) -> list[list[int]] | None:
        """The passes each rank makes when the ranks split them (recorded with the run), else None."""
        plan = self.engine.plan
        return [plan.schedule(rank) for rank in range(world_size)] if plan.ranks_split_passes else None

    def finish_pass(self) -> None:
        self.engine.finish_pass()

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def write(self, context: RunContext) -> None:
        store, threshold = context.store, context.config.threshold
        ids = [context.model_ids[shape.name] for shape in self.shapes]
        dead = [self.engine.dead_neurons(i).numpy() for i in range(len(self.shapes))]
        all_scores = []
        for index, shape in enumerate(self.shapes):
            scores = score_model(index, len(self.shapes), self.engine.results, dead[index])
            all_scores.append(scores)
            store.insert_columns(neurons, neuron_columns(ids[index], shape, scores, threshold))
            store.insert_rows(layer_summaries, layer_summary_rows(ids[index], shape, scores, threshold))
            store.insert_rows(distributions, distribution_rows(ids[index], scores))
        for (x, y), result in self.engine.results.items():
            pair = (ids[x], ids[y], self.shapes[x], self.shapes[y], result, dead[x])
            store.insert_columns(partner_scores, partner_columns(*pair))
            store.insert_columns(matches, match_columns(*pair))
        for shape, fraction in zip(self.shapes, universal_fraction(all_scores, threshold), strict=True):
            if fraction is not None:
                logger.info("%s: %.2f%% of neurons have excess correlation > %s", shape.name, 100 * fraction, threshold)


__all__ = ["CorrelationStage", "model_shapes"]
