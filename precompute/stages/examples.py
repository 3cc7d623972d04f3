"""The ``examples`` stage: each neuron's top activating contexts, quantile-bin samples and random samples.

One pass over the counted tokens, in the forward passes every stage shares; nothing is re-run. For every model
(or only the reference, ``models: reference``) and neuron, on ``mlp.hook_post``:

- ``top``: the ``top`` highest activations, at most one per dataset row (the row's own maximum), so the list is
  not twenty near-duplicates of one passage; the first is the neuron's maximum over the dataset;
- ``quantile``: ``per_bin`` uniform samples from each bin between the activation quantiles ``quantiles``
  (default 0-50-90-99-99.9-100%). The bin edges are the quantiles of the first batch (a pilot: the edges are
  fixed before the rest streams by); each row records the bin's edges and the exact share of counted tokens
  that fell in it over the whole dataset;
- ``random``: ``random`` counted tokens drawn uniformly at the start (a different draw per neuron).

Each example is a snippet of its dataset row: the example's token with up to ``before`` tokens before it and
``after`` after (clipped at the row's edges). Stored (issue 11) as one ``examples`` row per neuron and kind holding
its examples as arrays (`precompute.store.example_columns`): the activations of every snippet token as compact
uint8 codes with a stored scale (`precompute.store.encode_u8`); the row's token ids once per model and dataset row
(``example_rows``); the top examples' peak tokens for the search (``example_peaks``). ``start`` is the snippet's
first position in the row and ``peak`` the example's index in the snippet.
Because attention is causal, re-running the row's prefix up to the peak reproduces the activation.

Sampling a bin uniformly without knowing in advance which tokens fall in it: every token gets a uniform random
key (seeded per batch by its row, so a resumed run draws the same keys), and a bin keeps the ``per_bin`` tokens
with the smallest keys. Only tokens whose key is below a per-bin rate (``oversample`` × the expected need) are
looked at, which makes the common bins nearly free. Kept examples are ranked by a total order (score, then dataset
row, then position: `best_examples`), so the same examples are kept whatever order they are merged in: batch by
batch, or every rank's at the end of a distributed run (`ExamplesStage.reduce`, docs/distributed.md).

Memory (issue 11): the kept examples are fixed per neuron; per batch the stage reads blocks of neurons of at most
`precompute.memory.CHUNK_BYTES` (the masked batch for the top examples, the pilot's sort, the looked-at tokens).
When the memory plan gives smaller batches than the dataset's, the pilot is the first smaller batch and the keys
are drawn per smaller batch: the quantile samples are then other uniform samples than an unsplit run's.
"""

from __future__ import annotations

import itertools
import logging
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from precompute.activations import ActivationBatch
from precompute.distributed import Distributed
from precompute.memory import StageMemory, chunk_bytes, chunk_rows
from precompute.rows import Row, neuron_key
from precompute.stage_config import ConfigError, stage_config
from precompute.stages.base import (
    ModelChoice,
    RunContext,
    RunInputs,
    Stage,
    batch_tokens,
    chosen_models,
    selected_batch,
    selection_bytes,
)
from precompute.store import (
    U8_HEADER,
    U8_MISSING,
    WRITE_CHUNK_BYTES,
    blob,
    example_columns,
    example_peaks,
    example_rows,
    examples,
    token_itemsize,
)

logger = logging.getLogger(__name__)

#: Neurons whose snippets are cut together when the examples are written: a block's windows are all that is held
#: at once.
ENCODE_BLOCK = 2048


@dataclass(frozen=True)
class ExamplesConfig:
    """Settings of the ``examples`` stage (``analysis["examples"]``).

    Args:
        top: top activating examples per neuron (distinct rows).
        before: tokens of context kept before the example's token.
        after: tokens kept after it.
        quantiles: activation quantiles (strictly between 0 and 1, increasing) that cut the sampling bins.
        per_bin: examples sampled per quantile bin.
        random: uniformly random examples per neuron.
        oversample: how many times the expected need of a bin is looked at (higher: safer, slower).
        seed: seed of the random keys and the random examples.
        models: ``all`` models of the family or only the ``reference``.
        max_tokens: draw the examples from only the first this many counted tokens (in row order) and stop
            updating after them (the paper: 10M); None: all of them.
    """

    top: int = 20
    before: int = 24
    after: int = 8
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    per_bin: int = 4
    random: int = 5
    oversample: float = 20.0
    seed: int = 0
    models: ModelChoice = "all"
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"examples.max_tokens must be at least 1 or null, got {self.max_tokens}")
        for key in ("top", "before", "after", "per_bin", "random"):
            if getattr(self, key) < 0 or (key == "top" and self.top < 1):
                raise ConfigError(f"examples.{key} must be {'at least 1' if key == 'top' else '>= 0'}")
        q = self.quantiles
        if not all(0 < a < 1 for a in q) or any(b <= a for a, b in itertools.pairwise(q)):
            raise ConfigError(f"examples.quantiles must increase strictly within (0, 1), got {list(q)}")
        if self.oversample < 1:
            raise ConfigError(f"examples.oversample must be at least 1, got {self.oversample}")


def gather_windows(
    acts: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, neurons: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Activations around chosen tokens: [chosen, window] from ``acts`` [batch, pos, n] (contiguous).

    ``rows``, ``positions`` and ``neurons`` [chosen] pick a token of a neuron; window positions outside the row
    are clamped (the writer cuts them off).

    >>> a = torch.arange(12.0).reshape(1, 6, 2)  # a[0, p, n] = 2p + n
    >>> gather_windows(a, torch.tensor([0, 0]), torch.tensor([0, 3]), torch.tensor([0, 1]), torch.arange(-1, 2))
    tensor([[0., 0., 2.],
            [5., 7., 9.]])
    """
    _, n_pos, n = acts.shape
    pos = (positions.unsqueeze(1) + offsets).clamp_(0, n_pos - 1)  # [chosen, window]
    return acts.reshape(-1)[(rows.unsqueeze(1) * n_pos + pos) * n + neurons.unsqueeze(1)]


def best_examples(score: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The indices [k, n] of the best ``k`` of [candidates, n] examples per neuron: by ``score`` (largest or
    smallest first), ties broken by the earlier dataset row, then position.

    A total order of the examples makes the kept ones the same whatever order they were merged in: batch after
    batch in one process, or every rank's kept examples at the end of a distributed run (`ExamplesStage.reduce`).

    >>> best_examples(torch.tensor([[1.0], [3.0], [3.0]]), torch.tensor([[9], [5], [2]]), torch.zeros(3, 1), 2, True)
    tensor([[2],
            [1]])
    """
    order = torch.sort(pos, dim=0, stable=True).indices
    order = order.gather(0, torch.sort(row.gather(0, order), dim=0, stable=True).indices)
    ranked = torch.sort(score.gather(0, order), dim=0, descending=largest, stable=True).indices
    return order.gather(0, ranked[:k])


def merge_candidates(
    state: dict[str, Any],
    prefix: str,
    score: str,
    new: dict[str, torch.Tensor],
    largest: bool,
    acts: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    """Keep, per neuron, the best ``k`` (by ``score``, `best_examples`) of the kept examples and the batch's
    candidates.

    ``new`` holds [candidates, n] tensors named like the kept ones (``prefix`` + name) plus ``batch_row``; the
    activation windows are gathered only for the candidates that get in.
    """
    k = state[f"{prefix}{score}"].shape[0]
    rows = torch.cat([state[f"{prefix}row"], new["row"]])
    positions = torch.cat([state[f"{prefix}pos"], new["pos"]])
    index = best_examples(torch.cat([state[f"{prefix}{score}"], new[score]]), rows, positions, k, largest)
    from_new = index >= k  # [k, n]
    if not bool(from_new.any()):
        return
    for name, value in new.items():
        if name != "batch_row":
            both = torch.cat([state[f"{prefix}{name}"], value.to(state[f"{prefix}{name}"].dtype)])
            state[f"{prefix}{name}"] = both.gather(0, index)
    old = state[f"{prefix}window"]
    windows = old.gather(0, index.clamp(max=k - 1).unsqueeze(1).expand_as(old))
    slot, neuron = from_new.nonzero(as_tuple=True)
    source = index[slot, neuron] - k
    chosen = gather_windows(
        acts, new["batch_row"][source, neuron], state[f"{prefix}pos"][slot, neuron], neuron, offsets
    )
    windows[slot, :, neuron] = chosen.to(windows.dtype)
    state[f"{prefix}window"] = windows


class ExamplesStage(Stage):
    """The ``examples`` stage (single pass over ``hook_post``)."""

    name = "examples"
    tables = (examples, example_rows, example_peaks)
    config_class = ExamplesConfig
    hooks = frozenset({"hook_post"})

    def __init__(self, inputs: RunInputs) -> None:
        super().__init__(inputs)
        self.config = cfg = stage_config(ExamplesConfig, inputs.config.analysis.get(self.name), self.name)
        self.device = torch.device(inputs.config.device)
        self.shapes = {m.name: m.n_neurons for m in chosen_models(inputs.models, cfg.models)}
        self.offsets = torch.arange(-cfg.before, cfg.after + 1, device=self.device)
        dataset = inputs.dataset
        self.selection = dataset.selection("counted", cfg.max_tokens)
        levels = np.array([0.0, *cfg.quantiles, 1.0])
        # a bin of share f holds f * n_counted tokens: look at enough of them for oversample * per_bin samples
        needed = cfg.oversample * max(cfg.per_bin, 1) / (np.diff(levels) * max(self.selection.n_tokens, 1))
        self.rates = torch.tensor(np.minimum(1.0, needed), dtype=torch.float32, device=self.device)
        flat_counted = self.selection.flat_indices()
        self.state = {name: self._empty(n, flat_counted, dataset.ctx) for name, n in self.shapes.items()}

    @classmethod
    def memory_bytes(cls, inputs: RunInputs) -> StageMemory:
        """The kept examples (fixed per neuron), and per batch: chunks of activations over blocks of neurons, one
        bin's candidates and the copy of the top examples' windows a merge makes."""
        cfg = stage_config(ExamplesConfig, inputs.config.analysis.get(cls.name), cls.name)
        width, n_bins = cfg.before + cfg.after + 1, len(cfg.quantiles) + 1
        # Per neuron and kept example: its row and position (int64) and its float16 window; the top examples'
        # activations, and each bin's keys and activations, are float32. Then the bin edges and counters.
        kept = cfg.top + n_bins * cfg.per_bin + cfg.random
        per_neuron = kept * (8 + 8 + 2 * width) + 4 * (cfg.top + 2 * n_bins * cfg.per_bin + cfg.random)
        per_neuron += 4 * len(cfg.quantiles) + 8 * n_bins
        models = chosen_models(inputs.models, cfg.models)
        largest, tokens = max(m.n_neurons for m in models), batch_tokens(inputs)
        k = max(cfg.top, cfg.per_bin)
        # merging candidates: both lists of every field (value, key, row, position: 8 bytes), the window copy
        merge = 2 * k * largest * 8 * 5 + k * width * largest * 2
        # a block of neurons of the batch: masked (top examples), sorted with its order (the pilot), or the looked-at
        # tokens with a bin's mask and scores
        blocks = max(chunk_bytes(largest, tokens, 4), chunk_bytes(largest, tokens, 16))
        candidates = n_bins * cfg.per_bin * largest * (4 + 4 + 8)
        return StageMemory(
            state=sum(m.n_neurons * per_neuron + 8 * n_bins for m in models),
            update=blocks
            + candidates
            + merge
            + selection_bytes(inputs, inputs.dataset.selection("counted", cfg.max_tokens), False),
            write=WRITE_CHUNK_BYTES,
        )

    def _empty(self, n: int, flat_counted: np.ndarray, ctx: int) -> dict[str, Any]:
        cfg, device, width = self.config, self.device, len(self.offsets)
        n_bins = len(cfg.quantiles) + 1
        draw = np.random.default_rng(cfg.seed).integers(0, max(len(flat_counted), 1), size=(cfg.random, n))
        chosen = torch.from_numpy(flat_counted[draw] if len(flat_counted) else np.zeros((cfg.random, n), np.int64))
        state: dict[str, Any] = {
            "top_value": torch.full((cfg.top, n), -torch.inf, device=device),
            "edges": None,  # [n, n_quantiles] from the first batch
            "bin_seen": torch.zeros(n_bins, n, dtype=torch.float64, device=device),  # looked-at tokens in the bin
            "bin_looked": torch.zeros(n_bins, dtype=torch.float64, device=device),  # tokens looked at for the bin
            "random_row": (chosen // ctx).to(device),  # [random, n]
            "random_pos": (chosen % ctx).to(device),
            "random_value": torch.full((cfg.random, n), torch.nan, device=device),
            "random_window": torch.zeros(cfg.random, width, n, dtype=torch.float16, device=device),
        }
        for prefix, k in [("top_", cfg.top)] + [(f"bin{b}_", cfg.per_bin) for b in range(n_bins)]:
            if prefix != "top_":
                state[f"{prefix}key"] = torch.full((k, n), torch.inf, device=device)
                state[f"{prefix}value"] = torch.zeros(k, n, device=device)
            state[f"{prefix}row"] = torch.full((k, n), -1, dtype=torch.int64, device=device)
            state[f"{prefix}pos"] = torch.zeros(k, n, dtype=torch.int64, device=device)
            state[f"{prefix}window"] = torch.zeros(k, width, n, dtype=torch.float16, device=device)
        return state

    def update(self, batch: ActivationBatch) -> None:
        batch = selected_batch(batch, self.selection)  # the first max_tokens counted tokens (all by default)
        counted = batch.counted
        if batch.n_counted == 0:
            return
        batch_rows = batch.counted_index // counted.shape[1]  # [tokens]
        batch_pos = batch.counted_positions
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + batch.row_start)
        keys = torch.rand(batch.n_counted, generator=generator).to(self.device)  # one key per counted token
        order = torch.argsort(keys)
        for name, state in self.state.items():
            acts = batch.hook_post[name].reshape(*counted.shape, self.shapes[name])  # [batch, pos, n_neurons]
            self._update_top(state, acts, counted, batch.row_start)
            self._update_bins(state, batch, name, acts, keys, order, batch_rows, batch_pos, batch.row_start)
            self._update_random(state, acts, batch.row_start)

    def _update_top(self, state: dict, acts: torch.Tensor, counted: torch.Tensor, row_start: int) -> None:
        n_rows, n = acts.shape[0], acts.shape[2]
        row_max = torch.empty(n_rows, n, dtype=acts.dtype, device=acts.device)
        row_arg = torch.empty(n_rows, n, dtype=torch.int64, device=acts.device)
        step = chunk_rows(acts.shape[0] * acts.shape[1], 4)  # neurons per block of the masked copy
        for start in range(0, n, step):
            cols = slice(start, start + step)
            masked = torch.where(counted.unsqueeze(-1), acts[:, :, cols], -torch.inf)  # [batch, pos, block]
            row_max[:, cols], row_arg[:, cols] = masked.max(dim=1)
        rows = torch.arange(n_rows, device=acts.device).unsqueeze(1).expand(n_rows, n)
        new = {"value": row_max, "row": rows + row_start, "pos": row_arg, "batch_row": rows}
        merge_candidates(state, "top_", "value", new, True, acts, self.offsets)

    def _pilot_edges(self, batch: ActivationBatch, name: str, n: int) -> torch.Tensor:
        """The bin edges: quantiles of the first batch, per neuron [n, n_quantiles] (sorted in blocks of neurons)."""
        ranks = (torch.tensor(self.config.quantiles) * (batch.n_counted - 1)).round().long().to(self.device)
        edges = torch.empty(n, len(self.config.quantiles), device=self.device)
        step = chunk_rows(batch.n_counted, 16)  # the block, its transposed copy, the sorted values and order
        for start in range(0, n, step):
            cols = slice(start, start + step)
            ordered = batch.counted_rows(name, "hook_post", slice(None), cols).T.contiguous().sort(dim=1).values
            edges[cols] = ordered[:, ranks]
        return edges

    def _update_bins(
        self,
        state: dict,
        batch: ActivationBatch,
        name: str,
        acts: torch.Tensor,
        keys: torch.Tensor,
        order: torch.Tensor,
        batch_rows: torch.Tensor,
        batch_pos: torch.Tensor,
        row_start: int,
    ) -> None:
        n = acts.shape[2]
        if state["edges"] is None:  # the pilot: quantiles of the first batch
            state["edges"] = self._pilot_edges(batch, name, n)
        edges, sorted_keys = state["edges"], keys[order]
        looked = torch.searchsorted(sorted_keys, self.rates).tolist()  # tokens looked at, per bin
        if max(looked) == 0 or self.config.per_bin == 0:
            return
        head = order[: max(looked)]
        candidates = []
        for count in looked:
            k = min(self.config.per_bin, count)
            candidates.append(
                {
                    "key": torch.empty(k, n, device=self.device),
                    "value": torch.empty(k, n, device=self.device),
                    "token": torch.empty(k, n, dtype=torch.int64, device=self.device),
                }
            )
        # a uniformly random subset of the batch's tokens, in key order, one block of neurons at a time
        step = chunk_rows(len(head), 16)  # the block and, per bin, its mask and scores
        for start in range(0, n, step):
            cols = slice(start, start + step)
            values = batch.counted_rows(name, "hook_post", head, cols)  # [looked, block]
            for b, count in enumerate(looked):
                if count == 0:
                    continue
                part = values[:count]
                inside = part >= edges[cols, b - 1] if b > 0 else torch.ones_like(part, dtype=torch.bool)
                if b < edges.shape[1]:
                    inside &= part < edges[cols, b]
                state["bin_seen"][b, cols] += inside.sum(0)
                score = torch.where(inside, sorted_keys[:count].unsqueeze(1), torch.inf)
                best_keys, best = torch.topk(score, candidates[b]["key"].shape[0], dim=0, largest=False)
                candidates[b]["key"][:, cols] = best_keys
                candidates[b]["value"][:, cols] = part.gather(0, best)
                candidates[b]["token"][:, cols] = head[best]  # index among the batch's counted tokens
        for b, count in enumerate(looked):
            if count == 0:
                continue
            state["bin_looked"][b] += count
            found = candidates[b]
            token = found["token"]
            new = {
                "key": found["key"],
                "value": found["value"],
                "row": torch.where(found["key"].isfinite(), batch_rows[token] + row_start, -1),
                "pos": batch_pos[token],
                "batch_row": batch_rows[token],
            }
            merge_candidates(state, f"bin{b}_", "key", new, False, acts, self.offsets)

    def _update_random(self, state: dict, acts: torch.Tensor, row_start: int) -> None:
        inside = (state["random_row"] >= row_start) & (state["random_row"] < row_start + acts.shape[0])
        which, neuron = inside.nonzero(as_tuple=True)
        if which.numel() == 0:
            return
        rows = state["random_row"][which, neuron] - row_start
        pos = state["random_pos"][which, neuron]
        state["random_value"][which, neuron] = acts[rows, pos, neuron]
        windows = gather_windows(acts, rows, pos, neuron, self.offsets)  # [chosen, window]
        state["random_window"][which, :, neuron] = windows.to(torch.float16)

    # --- several ranks (precompute.distributed) -----------------------------------------------------------

    def share_pilot(self, group: Distributed, batch: ActivationBatch | None) -> None:
        """Every rank cuts its quantile bins at the edges of the dataset's first batch (rank 0's ``batch``)."""
        edges: dict[str, torch.Tensor] = {}
        if group.is_main and batch is not None:
            selected = selected_batch(batch, self.selection)
            if selected.n_counted:
                edges = {name: self._pilot_edges(selected, name, n).cpu() for name, n in self.shapes.items()}
        for name, value in group.broadcast_object(edges).items():
            self.state[name]["edges"] = value.to(self.device)

    def reduce(self, group: Distributed) -> None:
        """Merge the ranks' examples into those one process keeps: the bins' counters added, each random example
        taken from the rank that read its row, and the top and quantile examples gathered and ranked again by
        `best_examples` (the total order makes the result the same as streaming every row in one process)."""
        n_bins = len(self.config.quantiles) + 1
        for state in self.state.values():
            group.all_reduce(state["bin_seen"])
            group.all_reduce(state["bin_looked"])
            read = state["random_value"].isfinite()  # the rank that read the row filled it; the others hold NaN
            # -0.0 where unread: x + (-0.0) = x for every x, -0.0 included (+0.0 would turn -0.0 into +0.0)
            value = torch.where(read, state["random_value"], -0.0)  # the sum over ranks is then exact
            window = torch.where(read.unsqueeze(1), state["random_window"].float(), -0.0)
            readers = read.to(torch.int64)
            for tensor in (value, window, readers):
                group.all_reduce(tensor)
            state["random_value"] = torch.where(readers > 0, value, torch.nan)
            state["random_window"] = window.to(torch.float16)
            for prefix, score, largest in [("top_", "value", True)] + [
                (f"bin{b}_", "key", False) for b in range(n_bins)
            ]:
                self._merge_ranks(group, state, prefix, score, largest)

    @staticmethod
    def _merge_ranks(group: Distributed, state: dict[str, Any], prefix: str, score: str, largest: bool) -> None:
        """The best of every rank's kept examples of one kind, one field at a time (every rank's copy of a field
        is held at once)."""
        k = state[f"{prefix}{score}"].shape[0]
        gathered = {name: torch.cat(group.all_gather(state[f"{prefix}{name}"])) for name in (score, "row", "pos")}
        index = best_examples(gathered[score], gathered["row"], gathered["pos"], k, largest)
        for name, value in gathered.items():
            state[f"{prefix}{name}"] = value.gather(0, index)
        del gathered
        fields = [name for name in ("value", "key") if name != score and f"{prefix}{name}" in state] + ["window"]
        for name in fields:
            both = torch.cat(group.all_gather(state[f"{prefix}{name}"]))
            where = index if both.dim() == 2 else index.unsqueeze(1).expand(k, both.shape[1], index.shape[1])
            state[f"{prefix}{name}"] = both.gather(0, where)

    def state_dict(self) -> dict[str, Any]:
        return {"models": self.state, "done": self._done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = {
            name: {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
            for name, saved in state["models"].items()
        }
        self._done = state["done"]

    # --- results ------------------------------------------------------------------------------------------

    def write(self, context: RunContext) -> None:
        for model in context.models:
            if model.name in self.state:
                model_id, dataset_rows = context.model_ids[model.name], context.dataset.rows
                used: set[int] = set()
                peaks: dict[str, array[Any]] = {n: array("q") for n in ("peak_token", "layer", "neuron", "rank")}
                peaks["activation"] = array("d")
                rows = self.example_rows(model.name, model_id, model.d_mlp, dataset_rows)
                written = context.store.insert_rows(examples, _packed(rows, used, peaks))
                # each row's tokens once, not once per example (issue 11), as narrow as the vocabulary allows
                itemsize, order = token_itemsize(model.d_vocab), np.array(sorted(used), dtype=np.int64)
                tokens = [blob(np.ascontiguousarray(dataset_rows[r], dtype=f"<u{itemsize}")) for r in order]
                columns = {"model_id": model_id, "dataset_row": order, "itemsize": itemsize, "token_ids": tokens}
                context.store.insert_columns(example_rows, columns)
                if len(peaks["rank"]):
                    arrays = {name: np.frombuffer(values, dtype=values.typecode) for name, values in peaks.items()}
                    context.store.insert_columns(example_peaks, {"model_id": model_id} | arrays)
                logger.info("examples: %d rows (neuron and kind) for %s", written, model.name)

    def example_rows(self, name: str, model_id: int, d_mlp: int, dataset_rows: np.ndarray) -> Iterator[Row]:
        """Every stored example of one model, as ``examples`` rows.

        The snippets are encoded for a block of neurons at a time (`_block_codes`), vectorised over the block's
        neurons: each row (a neuron and kind) gets one scale, the range of its snippets' values, and each
        snippet its uint8 codes on it; `example_columns` joins them (issue 11: encoding each example on its own
        was 140 s of 146 of the writing for two GPT-2-small-shaped models on a GPU machine)."""
        state = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in self.state[name].items()}
        n_bins = len(self.config.quantiles) + 1
        edges = state["edges"]
        kinds = {"top": ["top_"], "quantile": [f"bin{b}_" for b in range(n_bins if edges is not None else 0)]}
        kinds["random"] = ["random_"]
        n_neurons = self.shapes[name]
        for block_start in range(0, n_neurons, ENCODE_BLOCK):
            block = slice(block_start, min(block_start + ENCODE_BLOCK, n_neurons))
            codes = {kind: self._block_codes(dataset_rows, state, prefixes, block) for kind, prefixes in kinds.items()}
            for flat in range(block.start, block.stop):
                key = neuron_key(model_id, d_mlp, flat)
                local = flat - block_start
                for kind, prefixes in kinds.items():  # top, the quantile bins, random: rows of one kind together
                    headers, slots = codes[kind]
                    for b, prefix in enumerate(prefixes):
                        extra = self._bin_columns(state, b, flat) if kind == "quantile" else {}
                        written, snippets = slots[prefix]
                        for rank in np.flatnonzero(written[:, local]).tolist():
                            snippet = snippets[rank][local]
                            yield key | self._snippet(
                                dataset_rows, state, prefix, rank, flat, snippet, headers[local], kind, **extra
                            )

    def _bin_columns(self, state: dict, b: int, flat: int) -> dict[str, Any]:
        """A quantile bin's columns: its edges (``bin_low`` None for the first bin, open below; ``bin_high`` of the
        last is the neuron's maximum) and the share of the looked-at tokens that fell in it."""
        edges, last = state["edges"], len(self.config.quantiles)
        return {
            "bin": b,
            "bin_low": None if b == 0 else float(edges[flat, b - 1]),
            "bin_high": float(state["top_value"][0, flat]) if b == last else float(edges[flat, b]),
            "bin_fraction": float(state["bin_seen"][b, flat] / max(state["bin_looked"][b], 1)),
        }

    def _span(self, pos: np.ndarray, ctx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, first) of snippets peaking at ``pos``: the row's tokens [start, end) around the peak, and
        the index in the stored window of the snippet's first token (windows are cut ``before`` the peak)."""
        start = np.maximum(0, pos - self.config.before)
        end = np.minimum(ctx, pos + self.config.after + 1)
        return start, end, start - (pos - self.config.before)

    def _written(self, state: dict, prefix: str, block: slice) -> np.ndarray:
        """[ranks, neurons] of the block: the slots written as examples. Top and quantile slots fill in rank order
        (the first empty one ends the list; a top slot needs a finite value too); a random slot is written when
        its value is finite."""
        row, value = state[f"{prefix}row"][:, block], state[f"{prefix}value"][:, block]
        if prefix == "random_":
            return np.isfinite(value)
        present = (row >= 0) & np.isfinite(value) if prefix == "top_" else row >= 0
        return np.logical_and.accumulate(present, axis=0)

    def _block_codes(
        self, dataset_rows: np.ndarray, state: dict, prefixes: list[str], block: slice
    ) -> tuple[list[bytes], dict[str, tuple[np.ndarray, list[list[bytes | None]]]]]:
        """One kind's snippets of every neuron of ``block``, encoded on one scale a neuron (`encode_u8` of the
        neuron's snippets one after the other gives the same bytes): each neuron's `encode_u8` header, and per slot
        prefix the written slots [ranks, neurons] and each written snippet's codes (None elsewhere)."""
        n = block.stop - block.start
        low, high = np.full(n, np.inf), np.full(n, -np.inf)
        cut: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {}
        for prefix in prefixes:
            written, cut[prefix] = self._written(state, prefix, block), []
            for rank in range(written.shape[0]):
                pos = state[f"{prefix}pos"][rank, block].astype(np.int64)
                start, end, first = self._span(pos, dataset_rows.shape[1])
                window = state[f"{prefix}window"][rank, :, block].T.astype(np.float64)  # [neurons, window]
                offset = np.arange(window.shape[1])
                inside = (offset >= first[:, None]) & (offset < (first + end - start)[:, None]) & written[rank, :, None]
                finite = inside & np.isfinite(window)
                low = np.minimum(low, np.where(finite, window, np.inf).min(axis=1))
                high = np.maximum(high, np.where(finite, window, -np.inf).max(axis=1))
                cut[prefix].append((written[rank], window, first, end - start))
        # as `precompute.store.encode_u8`: a float32 low and step, codes rounded against them, 255 where not finite
        known = np.isfinite(low)
        low32 = np.where(known, low, 0.0).astype(np.float32)
        step32 = ((np.where(known, high, 0.0) - low32) / (U8_MISSING - 1)).astype(np.float32)
        safe = np.where(step32 > 0, step32, 1.0).astype(np.float64)
        headers = [U8_HEADER.pack(lo, st) for lo, st in zip(low32.tolist(), step32.tolist(), strict=True)]
        out: dict[str, tuple[np.ndarray, list[list[bytes | None]]]] = {}
        for prefix, ranks in cut.items():
            snippets: list[list[bytes | None]] = []
            for written, window, first, length in ranks:
                codes = np.rint((np.where(np.isfinite(window), window, 0.0) - low32[:, None]) / safe[:, None])
                codes = np.where(np.isfinite(window), np.clip(codes, 0, U8_MISSING - 1), U8_MISSING).astype(np.uint8)
                row: list[bytes | None] = [None] * n
                for local in np.flatnonzero(written).tolist():
                    row[local] = codes[local, first[local] : first[local] + length[local]].tobytes()
                snippets.append(row)
            out[prefix] = (np.stack([w for w, *_ in ranks]) if ranks else np.zeros((0, n), dtype=bool), snippets)
        return headers, out

    def _snippet(
        self,
        dataset_rows: np.ndarray,
        state: dict,
        prefix: str,
        rank: int,
        flat: int,
        codes: bytes | None,
        scale: bytes,
        kind: str,
        **extra: Any,
    ) -> Row:
        """One example's row (without the neuron key) with its snippet's codes on its row's scale (`encode_u8`'s
        header); ``extra`` fills the bin columns of quantile samples."""
        row, pos = int(state[f"{prefix}row"][rank, flat]), int(state[f"{prefix}pos"][rank, flat])
        start = max(0, pos - self.config.before)
        assert codes is not None  # every written slot was encoded
        return {
            "kind": kind,
            "rank": rank,
            "bin": 0,
            "bin_low": None,
            "bin_high": None,
            "bin_fraction": None,
            **extra,
            "dataset_row": row,
            "start": start,
            "peak": pos - start,
            "activation": float(state[f"{prefix}value"][rank, flat]),
            "peak_token": int(dataset_rows[row, pos]),
            "snippet_codes": codes,
            "snippet_scale": scale,
        }


def _packed(rows: Iterator[Row], used: set[int], peaks: dict[str, array[Any]]) -> Iterator[Row]:
    """The examples as stored: one row per neuron and kind (`example_columns`), noting the dataset row of each
    example (the rows whose tokens ``example_rows`` stores) and the top examples' peaks (``example_peaks``)."""
    group: list[Row] = []
    for row in rows:
        if group and (row["layer"], row["neuron"], row["kind"]) != (
            group[0]["layer"],
            group[0]["neuron"],
            group[0]["kind"],
        ):
            yield example_columns(group)
            group = []
        group.append(row)
        used.add(row["dataset_row"])
        if row["kind"] == "top":
            for name in ("peak_token", "layer", "neuron", "rank", "activation"):
                peaks[name].append(row[name])
    if group:
        yield example_columns(group)


__all__ = ["ExamplesConfig", "ExamplesStage", "gather_windows", "merge_candidates"]
