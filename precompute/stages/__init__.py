"""The precompute's stages, one module each, and their registry: the list of stage classes.

A stage is a class on the one small base `precompute.stages.base.Stage`; it declares its name, the tables it
owns, its settings, the hooks it reads and its memory, so the pipeline plans, clears and runs from the
declarations. Adding a stage is adding a module here and its class to `STAGES`.
"""

from __future__ import annotations

from precompute.stages.base import RunContext, RunInputs, Stage
from precompute.stages.correlations import CorrelationStage
from precompute.stages.examples import ExamplesStage
from precompute.stages.families import FamiliesStage
from precompute.stages.roles import RolesStage
from precompute.stages.stats import StatsStage

#: Every stage, in the order a run does them.
STAGES: tuple[type[Stage], ...] = (CorrelationStage, StatsStage, ExamplesStage, FamiliesStage, RolesStage)

#: Stage name -> class.
STAGES_BY_NAME: dict[str, type[Stage]] = {stage.name: stage for stage in STAGES}

#: The stages a run does unless told otherwise, in order.
DEFAULT_STAGES: tuple[str, ...] = tuple(STAGES_BY_NAME)

__all__ = [
    "DEFAULT_STAGES",
    "STAGES",
    "STAGES_BY_NAME",
    "CorrelationStage",
    "ExamplesStage",
    "FamiliesStage",
    "RolesStage",
    "RunContext",
    "RunInputs",
    "Stage",
    "StatsStage",
]
