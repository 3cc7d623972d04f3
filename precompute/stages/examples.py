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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from precompute.activations import ActivationBatch
from precompute.distributed import Distributed
from precompute.memory import StageMemory, chunk_bytes, chunk_rows
from precompute.rows import Row
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
    ARRAY_DTYPES,
    U8_HEADER,
    U8_MISSING,
    WRITE_CHUNK_BYTES,
    blob,
    decode_array,
    decode_examples,
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
        # writing, `ENCODE_BLOCK` neurons at a time: the largest kind's windows in float64 with their masks and the
        # encoding's temporaries (about 32 bytes a value), and every kind's encoded rows (codes and fields)
        slots = max(cfg.top, n_bins * cfg.per_bin, cfg.random)
        written_block = min(ENCODE_BLOCK, largest) * (slots * width * 32 + kept * (width + 64))
        return StageMemory(
            state=sum(m.n_neurons * per_neuron + 8 * n_bins for m in models),
            update=blocks
            + candidates
            + merge
            + selection_bytes(inputs, inputs.dataset.selection("counted", cfg.max_tokens), False),
            write=WRITE_CHUNK_BYTES + written_block,
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
                used: list[np.ndarray] = []
                peaks: list[dict[str, np.ndarray]] = []
                written = 0
                for rows, block_used, block_peaks in self._blocks(model.name, model_id, model.d_mlp, dataset_rows):
                    written += context.store.insert_columns(examples, rows)
                    used.append(block_used)
                    peaks.append(block_peaks)
                # each row's tokens once, not once per example (issue 11), as narrow as the vocabulary allows
                itemsize, order = token_itemsize(model.d_vocab), np.unique(np.concatenate(used))
                tokens = [blob(np.ascontiguousarray(dataset_rows[r], dtype=f"<u{itemsize}")) for r in order]
                columns = {"model_id": model_id, "dataset_row": order, "itemsize": itemsize, "token_ids": tokens}
                context.store.insert_columns(example_rows, columns)
                top_peaks = {name: np.concatenate([block[name] for block in peaks]) for name in peaks[0]}
                if len(top_peaks["rank"]):
                    context.store.insert_columns(example_peaks, {"model_id": model_id} | top_peaks)
                logger.info("examples: %d rows (neuron and kind) for %s", written, model.name)

    def example_rows(self, name: str, model_id: int, d_mlp: int, dataset_rows: np.ndarray) -> Iterator[Row]:
        """Every stored example of one model, one mapping each: the ``examples`` rows `write` stores, unpacked
        (the key, ``kind``, the fields `example_columns` takes, with the snippet as ``snippet_codes`` on its
        row's ``snippet_scale``, and the ``peak_token``), for reading the examples one at a time."""
        names = ("ranks", "bins", "bin_ranges", "dataset_rows", "starts", "peaks", "activations", "lengths")
        for rows, _, _ in self._blocks(name, model_id, d_mlp, dataset_rows):
            for i, kind in enumerate(rows["kind"].tolist()):
                key = {"model_id": model_id, "layer": int(rows["layer"][i]), "neuron": int(rows["neuron"][i])}
                snippets = rows["snippets"][i]
                scale, ends = snippets[: U8_HEADER.size], U8_HEADER.size + np.cumsum(decode_array(rows["lengths"][i]))
                decoded = decode_examples([rows[column][i] for column in names] + [snippets])
                for example, end in zip(decoded, ends.tolist(), strict=True):
                    codes = snippets[end - len(example.pop("activations")) : end]
                    token = int(dataset_rows[example["dataset_row"], example["start"] + example["peak"]])
                    yield key | {
                        "kind": kind,
                        **example,
                        "snippet_codes": codes,
                        "snippet_scale": scale,
                        "peak_token": token,
                    }

    def _blocks(
        self, name: str, model_id: int, d_mlp: int, dataset_rows: np.ndarray
    ) -> Iterator[tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]]:
        """One model's ``examples`` rows, a block of `ENCODE_BLOCK` neurons at a time: the block's rows as
        columns, in the order they are inserted (neuron by neuron; top, quantile, random), the dataset rows its
        examples come from, and its top examples' ``example_peaks`` columns.

        Every column is built for the whole block with NumPy, each row's BLOBs cut from one buffer a column (issue
        11: one mapping per example and `example_columns` per row was 23 s a GPT-2-small-sized model on a GPU
        machine, three times the streaming); the bytes are `example_columns`' (tests/unit/test_examples_writer.py
        holds that writer as the oracle)."""
        state = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in self.state[name].items()}
        n_bins = len(self.config.quantiles) + 1
        kinds = {"top": ["top_"], "quantile": [f"bin{b}_" for b in range(n_bins if state["edges"] is not None else 0)]}
        kinds["random"] = ["random_"]
        n_neurons = self.shapes[name]
        for block_start in range(0, n_neurons, ENCODE_BLOCK):
            block = slice(block_start, min(block_start + ENCODE_BLOCK, n_neurons))
            parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
            used: list[np.ndarray] = []
            for kind, prefixes in kinds.items():
                if prefixes:  # no quantile rows without the pilot's edges
                    slots = self._slots(state, prefixes, block)
                    parts.append(self._kind_columns(dataset_rows, state, kind, slots, block))
                    used.append(slots.row[slots.written])
                    if kind == "top":  # the search finds examples by their top peaks' tokens
                        peaks = _top_peaks(dataset_rows, slots, block_start, d_mlp)
            # rows neuron by neuron, each neuron's kinds in order (as the rows were written one at a time)
            order = np.argsort(np.concatenate([neurons * len(parts) + k for k, (neurons, _) in enumerate(parts)]))
            flat = block_start + np.concatenate([neurons for neurons, _ in parts])[order]
            rows: dict[str, Any] = {"model_id": model_id, "layer": flat // d_mlp, "neuron": flat % d_mlp}
            rows |= {column: np.concatenate([part[column] for _, part in parts])[order] for column in parts[0][1]}
            yield rows, np.unique(np.concatenate(used)), peaks

    def _slots(self, state: dict, prefixes: list[str], block: slice) -> _Slots:
        """One kind's example slots for the neurons of ``block``, its prefixes' slots one after the other: the
        (bin, rank) order its rows store them in."""
        ranks = [np.arange(state[f"{prefix}row"].shape[0]) for prefix in prefixes]
        return _Slots(
            written=np.concatenate([self._written(state, prefix, block) for prefix in prefixes]).T,
            rank=np.concatenate(ranks),
            bin=np.concatenate([np.full(len(r), b) for b, r in enumerate(ranks)]),  # a top or random slot's is 0
            row=np.concatenate([state[f"{prefix}row"][:, block] for prefix in prefixes]).T.astype(np.int64),
            pos=np.concatenate([state[f"{prefix}pos"][:, block] for prefix in prefixes]).T.astype(np.int64),
            value=np.concatenate([state[f"{prefix}value"][:, block] for prefix in prefixes]).T.astype(np.float64),
            window=np.concatenate([state[f"{prefix}window"][:, :, block] for prefix in prefixes]).transpose(2, 0, 1),
        )

    def _kind_columns(
        self, dataset_rows: np.ndarray, state: dict, kind: str, slots: _Slots, block: slice
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The ``examples`` columns (without the key) of one kind's rows of a block: the block's neurons that have
        a row (at least one written slot) and their columns, as `example_columns` would encode each row."""
        neurons = np.flatnonzero(slots.written.any(axis=1))
        written, counts = slots.written[neurons], slots.written[neurons].sum(axis=1)
        start, end, first = self._span(slots.pos[neurons], dataset_rows.shape[1])
        values = slots.value[neurons]
        with np.errstate(over="ignore"):  # a float64 beyond float32's range is not a float32: inf != value
            inexact = written & ~((values.astype(np.float32) == values) | np.isnan(values))
        float_codes = np.where(inexact.any(axis=1), ARRAY_DTYPES.index("<f8"), ARRAY_DTYPES.index("<f4"))
        if kind == "quantile":
            n_bins = len(self.config.quantiles) + 1
            present = (written[:, :, None] & (slots.bin[None, :, None] == np.arange(n_bins))).any(axis=1)
            ranges = self._bin_columns(state, block)[neurons][present]  # [bins present, 4], neuron by neuron
            codes = np.full(len(neurons), ARRAY_DTYPES.index("<f8"))
            bin_ranges = _encoded_runs(ranges.reshape(-1), present.sum(axis=1) * 4, codes)
        else:
            bin_ranges = np.full(len(neurons), None, dtype=object)
        shape = written.shape
        return neurons, {
            "kind": np.full(len(neurons), kind, dtype=object),
            "n_examples": counts,
            "ranks": _narrow_runs(np.broadcast_to(slots.rank, shape), written),
            "bins": _narrow_runs(np.broadcast_to(slots.bin, shape), written),
            "bin_ranges": bin_ranges,
            "dataset_rows": _narrow_runs(slots.row[neurons], written),
            "starts": _narrow_runs(start, written),
            "peaks": _narrow_runs(slots.pos[neurons] - start, written),
            "activations": _encoded_runs(values[written], counts, float_codes),
            "lengths": _narrow_runs(end - start, written),
            "snippets": self._block_codes(slots.window[neurons], written, first, end - start),
        }

    def _bin_columns(self, state: dict, block: slice) -> np.ndarray:
        """[neurons, bins, 4] of ``block``: each quantile bin's (bin, low, high, share), the ``bin_ranges`` of a
        row. The first bin's low is NaN (open below), the last one's high the neuron's maximum; the share is that
        of the looked-at tokens that fell in the bin."""
        edges = state["edges"][block].astype(np.float64)  # [neurons, quantiles]
        n, n_bins = edges.shape[0], edges.shape[1] + 1
        low = np.concatenate([np.full((n, 1), np.nan), edges], axis=1)
        high = np.concatenate([edges, state["top_value"][0, block].astype(np.float64)[:, None]], axis=1)
        share = (state["bin_seen"][:, block] / np.maximum(state["bin_looked"], 1)[:, None]).T
        bins = np.broadcast_to(np.arange(n_bins, dtype=np.float64), (n, n_bins))
        return np.stack([bins, low, high, share], axis=2)

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

    @staticmethod
    def _block_codes(window: np.ndarray, written: np.ndarray, first: np.ndarray, length: np.ndarray) -> np.ndarray:
        """The ``snippets`` of rows [neurons]: each row's snippets (its written slots' windows [neurons, slots,
        window] cut to [first, first + length)) on one scale, as `precompute.store.encode_u8` of them one after
        the other: the header (low, step) and the codes."""
        values = window.astype(np.float64)  # a copy, turned into the codes in place (a third of the time)
        offset = np.arange(values.shape[2])
        inside = (offset >= first[:, :, None]) & (offset < (first + length)[:, :, None]) & written[:, :, None]
        finite = np.isfinite(values)
        counted = inside & finite
        low = np.where(counted, values, np.inf).min(axis=(1, 2), initial=np.inf)
        high = np.where(counted, values, -np.inf).max(axis=(1, 2), initial=-np.inf)
        # as `encode_u8`: a float32 low and step, codes rounded against them, 255 where not finite
        known = np.isfinite(low)
        low32 = np.where(known, low, 0.0).astype(np.float32)
        step32 = ((np.where(known, high, 0.0) - low32) / (U8_MISSING - 1)).astype(np.float32)
        safe = np.where(step32 > 0, step32, 1.0).astype(np.float64)
        np.copyto(values, 0.0, where=~finite)
        values -= low32[:, None, None]
        values /= safe[:, None, None]
        codes = np.clip(np.rint(values, out=values), 0, U8_MISSING - 1, out=values).astype(np.uint8)
        codes[~finite] = U8_MISSING
        data, sizes = codes[inside].tobytes(), inside.sum(axis=(1, 2))  # neuron by neuron, in (bin, rank) order
        ends = np.cumsum(sizes)
        snippets = np.empty(len(sizes), dtype=object)
        bounds = zip(low32.tolist(), step32.tolist(), (ends - sizes).tolist(), ends.tolist(), strict=True)
        for i, (lo, st, a, b) in enumerate(bounds):
            snippets[i] = U8_HEADER.pack(lo, st) + data[a:b]
        return snippets


@dataclass(frozen=True)
class _Slots:
    """One kind's example slots of a block of neurons, [neurons, slots] in (bin, rank) order: which are written
    as examples, the dataset row, position and activation of each, and its window [neurons, slots, window]
    (float16 as kept); ``rank`` and ``bin`` [slots] are the same for every neuron."""

    written: np.ndarray
    rank: np.ndarray
    bin: np.ndarray
    row: np.ndarray
    pos: np.ndarray
    value: np.ndarray
    window: np.ndarray


def _top_peaks(dataset_rows: np.ndarray, top: _Slots, block_start: int, d_mlp: int) -> dict[str, np.ndarray]:
    """The ``example_peaks`` columns (without the model) of a block's top examples, neuron by neuron."""
    local, slot = np.nonzero(top.written)
    flat = block_start + local
    return {
        "peak_token": dataset_rows[top.row[top.written], top.pos[top.written]].astype(np.int64),
        "layer": flat // d_mlp,
        "neuron": flat % d_mlp,
        "rank": top.rank[slot],
        "activation": top.value[top.written],
    }


#: The `ARRAY_DTYPES` codes of the unsigned dtypes `unsigned_dtype` picks from, narrowest first.
UNSIGNED_CODES = np.array([ARRAY_DTYPES.index(dtype) for dtype in ("<u1", "<u2", "<u4", "<u8")])


def _narrow_runs(values: np.ndarray, written: np.ndarray) -> np.ndarray:
    """`encode_array` of each row's written ``values`` (non-negative integers [rows, slots], every row with at
    least one), in the narrowest unsigned dtype of the row's largest (`unsigned_dtype`, as `example_columns`)."""
    largest = np.where(written, values, 0).max(axis=1)
    width = (largest >= 1 << 8).astype(np.int64) + (largest >= 1 << 16) + (largest >= 1 << 32)  # <u1 .. <u8
    return _encoded_runs(values[written], written.sum(axis=1), UNSIGNED_CODES[width])


def _encoded_runs(values: np.ndarray, counts: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """`encode_array` of consecutive runs of ``values`` (a row's ``counts`` values each, one after the other),
    each in its dtype (``codes``: its index in `ARRAY_DTYPES`): the values are cast once per dtype present and
    each row's bytes cut from that buffer."""
    ends = np.cumsum(counts)
    encoded = np.empty(len(counts), dtype=object)
    for code in np.unique(codes).tolist():
        dtype = np.dtype(ARRAY_DTYPES[code])
        with np.errstate(over="ignore", invalid="ignore"):  # the other rows' values, which need not fit, are not cut
            data = np.ascontiguousarray(values, dtype=dtype).tobytes()
        head, rows = bytes([code]), np.flatnonzero(codes == code)
        a, b = ((ends - counts)[rows] * dtype.itemsize).tolist(), (ends[rows] * dtype.itemsize).tolist()
        for i, start, stop in zip(rows.tolist(), a, b, strict=True):
            encoded[i] = head + data[start:stop]
    return encoded


__all__ = ["ExamplesConfig", "ExamplesStage", "gather_windows", "merge_candidates"]
