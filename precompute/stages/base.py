"""A precompute stage: the one small base class every stage extends, and the typed inputs and context it gets.

A stage declares what the pipeline needs to plan and run it:

- `Stage.name`: how the run's ``--stages`` list and its ``analysis`` settings name it;
- `Stage.tables`: the tables it owns. The pipeline deletes their rows for the run's models before `Stage.write`,
  so re-running a stage (a resumed run) is idempotent;
- `Stage.config_class`: its small frozen settings dataclass, built from ``analysis[name]`` (None: no settings);
- `Stage.hooks`: the MLP hooks it reads from the shared forward passes (none: it does its own work in `write`);
- `Stage.memory_bytes`: what it will hold at each moment (`precompute.memory.StageMemory`: its state, and the
  temporaries of a batch, of closing a pass and of writing), from the models' shapes, the dataset and its
  settings, before anything is allocated, for the run's `precompute.memory.Split`;
- `Stage.splittable`: its state can be cut into blocks streamed in several passes over the rows (the memory plan
  asks for as many passes as the budget needs).

A stage is built from the `RunInputs` (all known before the store opens), folds every batch of a pass into its
running state (`update`), closes each pass (`finish_pass`) until `done_streaming`, checkpoints that state
(`state_dict`/`load_state_dict`) and finally writes its tables with the `RunContext`. Under torchrun each rank
streams a share of the batches: a stage takes its pilot from the dataset's first batch (`share_pilot`) and
combines the ranks' state before each pass closes (`reduce`); a stage whose ranks split its passes instead reads
every row of its own passes (`reads_every_row`) and merges the ranks' results once all have streamed (`gather`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from sqlalchemy import Table

from precompute.activations import ActivationBatch, HookKind
from precompute.correlation import CorrelationConfig
from precompute.data import TokenDataset, TokenSelection
from precompute.distributed import Distributed
from precompute.memory import Split, StageMemory
from precompute.models import LoadedModel
from precompute.store import AtlasStore

#: Which models of the family a stage analyses: all of them or only the reference (the first).
ModelChoice = Literal["all", "reference"]


class RunSettings(Protocol):
    """The run's settings that stages read (`precompute.pipeline.PrecomputeConfig` has them)."""

    @property
    def device(self) -> str: ...

    @property
    def threshold(self) -> float: ...

    @property
    def correlation(self) -> CorrelationConfig: ...

    @property
    def analysis(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class RunInputs:
    """What a stage is built and planned from, all known before the store opens: the run's settings, models,
    dataset, how the memory plan splits the work, and which rank of how many builds it (`precompute.distributed`;
    rank 0 of 1 without torchrun)."""

    config: RunSettings
    models: Sequence[LoadedModel]
    dataset: TokenDataset
    split: Split = field(default_factory=Split, kw_only=True)
    rank: int = field(default=0, kw_only=True)
    world_size: int = field(default=1, kw_only=True)


@dataclass(frozen=True)
class RunContext(RunInputs):
    """What a stage writes its tables with: its inputs, the store and the run's ids."""

    store: AtlasStore
    run_id: int
    model_ids: Mapping[str, int]  # model name -> id in the ``models`` table


def vocab_size(inputs: RunInputs) -> int:
    """The token ids the models or the dataset can hold: the largest model vocabulary or dataset id, plus one."""
    return max(max(m.d_vocab for m in inputs.models), inputs.dataset.max_token_id + 1)


def batch_tokens(inputs: RunInputs) -> int:
    """Tokens in one batch of the run (the split's rows per batch, or the dataset's batch size)."""
    dataset = inputs.dataset
    return min(split_of(inputs).batch_rows or dataset.config.batch_size, dataset.n_rows) * dataset.ctx


def split_of(inputs: RunInputs) -> Split:
    """The run's split (inputs built by hand, in tests and benchmarks, have none: one pass, the dataset's batches)."""
    return getattr(inputs, "split", None) or Split()


def family_blocks(sizes: Mapping[str, int], passes: int) -> dict[str, list[slice]]:
    """The neurons a splittable stage handles in each of its ``passes`` passes, per model: the family's neurons in
    the order of ``sizes`` (`in_block_order`) cut into ``passes`` nearly equal runs, so that a pass after the first
    reads one model,
    or two where its run crosses from one to the next (the blocks of a model outside a pass's run are empty), and
    needs no other model's forward pass (`Stage.models_in_pass`). Every block of a pass together holds at most
    ceil(neurons / passes) neurons, as a block of every model did.

    >>> blocks = family_blocks({"a": 4, "b": 4}, 3)
    >>> [(s.start, s.stop) for s in blocks["a"]], [(s.start, s.stop) for s in blocks["b"]]
    ([(0, 3), (3, 4), (4, 4)], [(0, 0), (0, 2), (2, 4)])
    >>> family_blocks({"a": 2}, 3)
    {'a': [slice(0, 1, None), slice(1, 2, None), slice(2, 2, None)]}
    """
    passes = max(1, passes)
    step = -(-sum(sizes.values()) // passes)
    blocks: dict[str, list[slice]] = {}
    offset = 0
    for name, n in sizes.items():
        blocks[name] = [
            slice(min(max(i * step - offset, 0), n), min(max((i + 1) * step - offset, 0), n)) for i in range(passes)
        ]
        offset += n
    return blocks


def in_block_order(inputs: RunInputs, sizes: Mapping[str, int]) -> dict[str, int]:
    """``sizes`` (model name -> neurons) in the order a splittable stage's passes take the models (`block_order`),
    for `family_blocks`."""
    return {name: sizes[name] for name in block_order(inputs, list(sizes))}


def block_order(inputs: RunInputs, names: Sequence[str]) -> list[str]:
    """The order in which a splittable stage's passes take the models ``names`` (`family_blocks`): the run's, or,
    when the correlations are reference-only, the partners first and the reference last. The correlation passes of
    such a run go through the pairs (reference, partner 1), (reference, partner 2), ...: a pass then reads the
    reference and the partner whose neurons the stats and families block holds, two models instead of three.

    >>> from types import SimpleNamespace as Namespace
    >>> settings = Namespace(stages=("correlations", "stats"), correlation=CorrelationConfig(reference_only=True))
    >>> models = [Namespace(name=name) for name in "abc"]
    >>> block_order(Namespace(config=settings, models=models), "abc")
    ['b', 'c', 'a']
    """
    config, reference = inputs.config, inputs.models[0].name
    # settings built by hand (tests, benchmarks) may not name the stages: the correlations are then not run
    if "correlations" in getattr(config, "stages", ()) and config.correlation.reference_only and reference in names:
        return [name for name in names if name != reference] + [reference]
    return list(names)


def block_widths(sizes: Mapping[str, int], passes: int) -> tuple[int, int]:
    """(the most neurons a pass's blocks hold together, the most one model's block holds) under `family_blocks`
    with ``sizes`` in the stage's order: what a splittable stage's memory plan prices.

    >>> block_widths({"a": 4, "b": 4}, 3)
    (3, 3)
    """
    blocks = family_blocks(sizes, passes)
    widths = [[block.stop - block.start for block in model] for model in blocks.values()]
    return max(map(sum, zip(*widths, strict=True)), default=0), max(map(max, widths), default=0)


def models_with_neurons(blocks: Mapping[str, list[slice]], index: int) -> frozenset[str]:
    """The models whose block of pass ``index`` is not empty."""
    return frozenset(name for name, model in blocks.items() if model[index].stop > model[index].start)


def selected_batch(batch: ActivationBatch, selection: TokenSelection) -> ActivationBatch:
    """The batch as a stage reading ``selection`` sees it: the batch itself when the selection is the counted
    tokens (the default), else a view of the same activations over the selection's positions, shared by every
    stage that reads the same selection."""
    if selection.is_counted:
        return batch
    rows = slice(batch.row_start, batch.row_start + batch.tokens.shape[0])
    return batch.selecting(selection.key, selection.mask(rows))


def selection_bytes(inputs: RunInputs, selection: TokenSelection, firing: bool) -> int:
    """What a batch's view for ``selection`` adds while a batch is read: its mask, positions and indices, and per
    model the float64 power sums of both hooks (and the firing counts per position); 0 for the counted tokens."""
    if selection.is_counted:
        return 0
    ctx = inputs.dataset.ctx
    per_model = sum(2 * 4 * m.n_neurons * 8 + (ctx * m.n_neurons * 8 if firing else 0) for m in inputs.models)
    return batch_tokens(inputs) * (1 + 8 + 8) + per_model


def chosen_models(models: Sequence[LoadedModel], choice: ModelChoice) -> Sequence[LoadedModel]:
    """The models a stage analyses: every model, or only the reference."""
    return models if choice == "all" else models[:1]


class Stage(abc.ABC):
    """A unit of precompute work: streams batches (when it has `hooks`) and writes the `tables` it owns."""

    name: ClassVar[str]
    tables: ClassVar[tuple[Table, ...]]
    config_class: ClassVar[type | None] = None
    hooks: ClassVar[frozenset[HookKind]] = frozenset()
    splittable: ClassVar[bool] = False

    def __init__(self, inputs: RunInputs) -> None:
        self._done = not self.hooks  # a stage that reads no batches has nothing to stream

    @classmethod
    @abc.abstractmethod
    def memory_bytes(cls, inputs: RunInputs) -> StageMemory:
        """What the stage will hold at each moment for these inputs and split, from the shapes and its settings."""

    @property
    def done_streaming(self) -> bool:
        """True once the stage needs no more passes over the rows."""
        return self._done

    def update(self, batch: ActivationBatch) -> None:  # noqa: B027 - a stage without hooks reads no batch
        """Fold one batch into the running state."""

    def finish_pass(self) -> None:
        """Close a pass over the rows; one pass is all a stage needs unless it overrides this."""
        self._done = True

    @classmethod
    def models_by_pass(cls, inputs: RunInputs) -> list[frozenset[str] | None]:
        """The names of the models whose activations the stage reads in each of its passes over the rows (None:
        every model), planned from the inputs (rank 0's, where the ranks split a stage's passes). A pass runs the
        forward passes of the models some active stage reads, no others (`pipeline.pass_models`): a split stage
        reads one or two models in each pass after its first (`family_blocks`)."""
        return [None] if cls.hooks else []

    def models_in_pass(self) -> frozenset[str] | None:
        """The models whose activations the stage reads in its current pass (`models_by_pass`; None: every model)."""
        return None

    def share_pilot(self, group: Distributed, batch: ActivationBatch | None) -> None:  # noqa: B027 - no pilot
        """Several ranks (`precompute.distributed`), before any batch is folded in: a stage that fixes something
        from the first batch (a shift, bin edges) takes it from the dataset's first batch, rank 0's ``batch``,
        on every rank (the others pass None), as a single process would."""

    def reduce(self, group: Distributed) -> None:  # noqa: B027 - a stage without hooks holds no sums
        """Several ranks, before `finish_pass`: combine what this pass folded in on every rank (sums added,
        extremes and top-k merged) so every rank holds what one process streaming every row would."""

    @property
    def reads_every_row(self) -> bool:
        """Several ranks: True while the stage makes a pass of its own on this rank and needs every batch of it
        (the correlation engine when the ranks split its passes), not this rank's share of the batches."""
        return False

    def gather(self, group: Distributed) -> None:  # noqa: B027 - nothing is computed apart by default
        """Several ranks, once every rank has streamed: merge what the ranks computed apart (passes each made
        alone), so rank 0 writes what one process would."""

    def state_dict(self) -> dict[str, Any]:
        """The running state, for the checkpoint (tensors may stay on the device)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - stateless by default
        """Restore the running state from `state_dict` output."""

    @abc.abstractmethod
    def write(self, context: RunContext) -> None:
        """Write the stage's tables (the pipeline has deleted their earlier rows for the run's models)."""


__all__ = [
    "ModelChoice",
    "RunContext",
    "RunInputs",
    "RunSettings",
    "Stage",
    "batch_tokens",
    "block_order",
    "block_widths",
    "chosen_models",
    "family_blocks",
    "in_block_order",
    "models_with_neurons",
    "selected_batch",
    "selection_bytes",
    "split_of",
    "vocab_size",
]
