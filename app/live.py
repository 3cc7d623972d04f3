"""Bounded live re-runs: run a family's models on a short text and read chosen neurons' activations.

Bounds, all from `Settings`: the text's size (characters, then tokens, also capped by the model's context),
the number of runs at once (a semaphore; a request waits `live_queue_timeout_s` for a slot, then 503), a time
limit for the forward passes (504; the work finishes in the background while still holding its slot, so the
concurrency bound stays true), and a separate, longer limit for the first load of a model. Models are loaded
once through the precompute's own loader (`precompute.models.load_model`: the same processed weights) and kept
in an LRU cache; results are memoised, so a shared ``?text=`` link costs one run.

torch and the model code are imported on the first run, never when the app starts.

Callers do their SQL before they call into the runner: a request's SQL deadline (`app.db`) counts wall time from
the moment its connection was borrowed, and loading a model can take seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from app.errors import GatewayTimeout, PayloadTooLarge, ServiceUnavailable, Unprocessable
from app.queries.models import Model
from app.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class LiveRequest:
    """Which models to run on which token rows, and which neurons of each to read."""

    models: tuple[Model, ...]
    rows: tuple[tuple[int, ...], ...]  # token ids per row, BOS included where wanted
    neurons: tuple[tuple[tuple[int, int], ...], ...]  # per model: (layer, neuron) pairs

    def key(self) -> Hashable:
        return (tuple((m.run_id, m.name, m.tokenizer_hash) for m in self.models), self.rows, self.neurons)


@dataclass(frozen=True)
class LiveResult:
    """activations[m][r] is a float32 array [len(rows[r]), len(neurons[m])] for model m and row r."""

    activations: tuple[tuple[np.ndarray, ...], ...]
    seconds: float


class LRU:
    """A small thread-safe least-recently-used mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class LiveRunner:
    """Runs models on small inputs within the settings' bounds. One per app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._slots = threading.BoundedSemaphore(settings.live_max_concurrent)
        self._executor = ThreadPoolExecutor(max_workers=settings.live_max_concurrent, thread_name_prefix="live")
        self._models = LRU(settings.live_cached_models)
        self._load_lock = threading.Lock()
        # A loaded model attaches its hooks to itself while running, so one model runs one request at a time.
        self._run_locks: dict[tuple[str, str], threading.Lock] = {}
        self._results = LRU(256)
        self._torch_ready = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- input checks ---------------------------------------------------------------------------------

    @staticmethod
    def check_has_weights(models: Sequence[Model]) -> None:
        """Refuse a model imported from the paper's tables before any slot is taken: it has no weights here."""
        for model in models:
            if model.published:
                raise ServiceUnavailable(
                    f"{model.name} of run {model.run_id} is the paper's published table: it has no weights to run "
                    f"live; compute it with `universal-neurons precompute` to get live re-runs"
                )

    def check_text(self, text: str) -> None:
        """Refuse empty or oversized text before any model work.

        Blank text is refused by the request schemas (pattern ``\\S``), with their notion of white space; a second,
        different test here would refuse some text that the schema promises to take (issue 8).
        """
        if not text:
            raise Unprocessable("text is empty")
        if len(text) > self.settings.live_max_chars:
            raise PayloadTooLarge(
                f"text has {len(text)} characters; live runs take at most {self.settings.live_max_chars}"
            )

    def max_tokens(self, models: Sequence[Model]) -> int:
        """The longest token sequence a live run takes (BOS excluded): the setting, capped by every context."""
        return max(1, min([self.settings.live_max_tokens, *[m.n_ctx - 1 for m in models]]))

    def tokenize(
        self, model: Model, text: str, bos_id: int | None, models: Sequence[Model]
    ) -> tuple[tuple[int, ...], int]:
        """Token ids of `text` with BOS in front (as every precompute row starts), and how many were put in front."""
        self.check_has_weights([model])
        self.check_text(text)
        loaded = self._call(lambda: self._load(model), self.settings.live_load_timeout_s, "loading the model")
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = self.max_tokens(models)
        if len(ids) > limit:
            raise PayloadTooLarge(f"text has {len(ids)} tokens; live runs take at most {limit}")
        if not ids:
            raise Unprocessable("text has no tokens")
        bos = bos_id if bos_id is not None else loaded.tokenizer.bos_token_id
        prefix = [bos] if bos is not None else []
        return tuple(prefix + list(ids)), len(prefix)

    # --- running --------------------------------------------------------------------------------------

    def run(self, request: LiveRequest) -> LiveResult:
        """Activations of the requested neurons, memoised; raises 503 when busy, 504 past the time limit."""
        if not self.settings.live_enabled:
            raise ServiceUnavailable("live re-runs are disabled on this server (live_enabled = false)")
        return self.compute(request.key(), request.models, lambda: self._forward(request), "the live run")

    def compute(self, key: Hashable, models: Sequence[Model], work: Callable[[], T], what: str) -> T:
        """Any live model work within the same bounds as `run`, memoised under `key` (prefix it with its kind).

        The models are loaded first (each within `live_load_timeout_s`); then `work` runs on the live executor in
        one concurrency slot within `live_timeout_s` (503 busy, 504 past it). `work` reaches each model through
        `using`, which holds the model for that thread alone while it runs (hooks attach to the model).
        """
        if not self.settings.live_enabled:
            raise ServiceUnavailable("live re-runs are disabled on this server (live_enabled = false)")
        self.check_has_weights(models)
        cached = self._results.get(key)
        if cached is not None:
            return cast(T, cached)
        for model in models:
            self._call(lambda m=model: self._load(m), self.settings.live_load_timeout_s, "loading the model")
        result = self._call(work, self.settings.live_timeout_s, what)
        self._results.put(key, result)
        return cast(T, result)

    @contextmanager
    def using(self, model: Model) -> Iterator[Any]:
        """The loaded model (`precompute.models.LoadedModel`), run by this thread alone until the block ends.

        Call it inside `compute`'s work: a model evicted from the cache since `compute` loaded it is loaded again
        in the same slot.
        """
        key = (model.source, model.tokenizer_hash)
        loaded = self._models.get(key)
        if loaded is None:
            loaded = self._load(model)
        with self._run_locks.setdefault(key, threading.Lock()):
            yield loaded

    def vocab_effect(self, model: Model, layer: int, neuron: int) -> np.ndarray:
        """The neuron's direct effect on every logit, ``W_U·w_out`` (float32 [d_vocab]), from the loaded weights."""
        if not self.settings.live_enabled:
            raise ServiceUnavailable("live model access is disabled on this server (live_enabled = false)")
        self.check_has_weights([model])
        key = ("vocab_effect", model.source, model.tokenizer_hash, layer, neuron)
        cached = self._results.get(key)
        if cached is not None:
            return cached
        loaded = self._call(lambda: self._load(model), self.settings.live_load_timeout_s, "loading the model")

        def compute() -> np.ndarray:
            import torch

            with torch.inference_mode():
                w_out = loaded.bridge.W_out[layer, neuron]  # [d_model]
                return (w_out @ loaded.bridge.W_U).float().cpu().numpy()  # [d_vocab]

        effect = self._call(compute, self.settings.live_timeout_s, "the vocabulary projection")
        self._results.put(key, effect)
        return effect

    def _call(self, work: Any, timeout: float, what: str) -> Any:
        """Run `work` on the live executor within a concurrency slot and a time limit."""
        if not self._slots.acquire(timeout=self.settings.live_queue_timeout_s):
            raise ServiceUnavailable(
                f"the server is busy with {self.settings.live_max_concurrent} live runs; try again shortly",
                headers={"Retry-After": "2"},
            )
        try:
            future: Future = self._executor.submit(work)
        except RuntimeError:
            self._slots.release()
            raise ServiceUnavailable("the server is shutting down") from None
        # The slot is freed when the work really ends, even if this request stops waiting for it.
        future.add_done_callback(lambda _f: self._slots.release())
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise GatewayTimeout(f"{what} took longer than {timeout:g} s") from None

    def _load(self, model: Model) -> Any:
        key = (model.source, model.tokenizer_hash)
        loaded = self._models.get(key)
        if loaded is not None:
            return loaded
        with self._load_lock:
            loaded = self._models.get(key)
            if loaded is not None:
                return loaded
            self._prepare_torch()
            from precompute.models import ModelLoadError, load_model, resolve_source, tokenizer_fingerprint

            started = time.perf_counter()
            try:
                loaded = load_model(resolve_source(model.source), device=self.settings.device)
            except ModelLoadError as exc:
                reason = without_server_paths(str(exc), model)
                raise ServiceUnavailable(f"model {model.name!r} is not available for live runs: {reason}") from exc
            if tokenizer_fingerprint(loaded.tokenizer) != model.tokenizer_hash:
                raise ServiceUnavailable(
                    f"model {model.name!r} ({model.public_source}) has another tokenizer than the precompute used"
                )
            logger.info("live: loaded %s in %.1f s", model.name, time.perf_counter() - started)
            self._models.put(key, loaded)
            return loaded

    def _prepare_torch(self) -> None:
        if not self._torch_ready:
            import torch

            torch.set_num_threads(self.settings.live_torch_threads)
            self._torch_ready = True

    def _forward(self, request: LiveRequest) -> LiveResult:
        import torch

        from precompute.activations import run_mlp_hooks

        started = time.perf_counter()
        lengths = [len(row) for row in request.rows]
        width = max(lengths)
        # Right padding is harmless: attention is causal, and the padded positions are dropped below.
        batch = torch.zeros((len(request.rows), width), dtype=torch.long)
        for i, row in enumerate(request.rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        out = []
        for model, pairs in zip(request.models, request.neurons, strict=True):
            with self.using(model) as loaded:
                post = run_mlp_hooks(loaded, batch.to(self.settings.device), ("hook_post",))["hook_post"]
            layers = torch.tensor([p[0] for p in pairs], dtype=torch.long)
            units = torch.tensor([p[1] for p in pairs], dtype=torch.long)
            chosen = post[:, :, layers, units].float().cpu().numpy()  # [batch, pos, k]
            out.append(tuple(chosen[i, :length] for i, length in enumerate(lengths)))
        return LiveResult(tuple(out), time.perf_counter() - started)


def without_server_paths(message: str, model: Model) -> str:
    """A loader's message with the model's folder named by `Model.public_source`, never by its server path.

    >>> from types import SimpleNamespace
    >>> model = SimpleNamespace(source="/srv/m/seed-1", public_source="seed-1")
    >>> without_server_paths("no model folder '/srv/m/seed-1'", model)
    "no model folder 'seed-1'"
    """
    source = Path(model.source).expanduser()
    for path in sorted({model.source, str(source), str(source.resolve())}, key=len, reverse=True):
        if path not in (".", ""):
            message = message.replace(path, model.public_source)
    return message


def check_vocab_ids(rows: Sequence[Sequence[int]], d_vocab: int) -> None:
    """Refuse token ids outside the vocabulary (stored examples from another tokenizer)."""
    for row in rows:
        if any(not 0 <= t < d_vocab for t in row):
            raise Unprocessable("token ids outside the model's vocabulary")
