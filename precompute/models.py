"""Load a model family: TransformerLens names or local Hugging Face GPT-2 folders, with the paper's processing.

A model argument is either a TransformerLens name (``stanford-gpt2-small-a``, ``pythia-160m-seed1``; fetched
through the Hugging Face cache by users who are online) or a local folder in Hugging Face format (config.json,
weights, tokenizer files), loaded with nothing fetched from the network. Both become a TransformerLens
``TransformerBridge`` with the paper's weight processing (fold LN, centre writing weights, centre unembed:
paper-spec §1.1), because the paper's weight statistics are defined on those weights. Processing does not change
``mlp.hook_pre``/``hook_post`` values, so correlations are the same either way.

Validation happens before any work: `resolve_source` checks every argument cheaply, `load_family` loads them
and refuses a family whose tokenizers differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

#: The weight processing every model gets (HookedTransformer.from_pretrained defaults; paper App. A.1).
PAPER_PROCESSING: dict[str, bool] = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}


class ModelLoadError(ValueError):
    """A model argument that cannot be loaded, or a family that cannot be compared."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from a command-line argument."""

    name: str  # TransformerLens name, or the folder's basename
    kind: Literal["transformer_lens", "local"]
    location: str  # the official Hugging Face name, or the folder's absolute path


@dataclass
class LoadedModel:
    """A processed TransformerLens model and the facts the store records about it."""

    source: ModelSource
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_heads: int
    act_fn: str
    processing: dict[str, bool] = field(default_factory=lambda: dict(PAPER_PROCESSING))

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def tokenizer(self) -> Any:
        return self.bridge.tokenizer

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    def record(self) -> dict[str, Any]:
        """The row the store keeps for this model."""
        return {
            "name": self.name,
            "source": self.source.location,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "d_vocab": self.d_vocab,
            "n_ctx": self.n_ctx,
            "n_heads": self.n_heads,
            "act_fn": self.act_fn,
            "processing": self.processing,
            "tokenizer_hash": tokenizer_fingerprint(self.tokenizer),
        }


def _official_model_name(name: str) -> str:
    """TransformerLens' official name for an alias; ValueError if it knows none."""
    # lazy: TransformerLens takes seconds to import, and a model folder argument never needs it
    try:  # TransformerLens 4.x
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:  # TransformerLens 3.x
        from transformer_lens.loading_from_pretrained import get_official_model_name  # type: ignore[no-redef]
    return str(get_official_model_name(name))


def resolve_source(argument: str) -> ModelSource:
    """Turn a command-line model argument into a `ModelSource`, without loading anything.

    Raises:
        ModelLoadError: the argument is neither an existing model folder nor a TransformerLens name.
    """
    path = Path(argument).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {argument!r} is a file; give a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {argument!r} has no config.json (not a Hugging Face model folder)")
        resolved = path.resolve()
        return ModelSource(name=resolved.name, kind="local", location=str(resolved))
    try:
        official = _official_model_name(argument)
    except ValueError:
        looks_like_path = os.sep in argument or argument.startswith(".")
        what = f"no model folder {argument!r}" if looks_like_path else f"unknown model {argument!r}"
        raise ModelLoadError(
            f"{what}: not an existing folder and not a TransformerLens model name "
            "(e.g. stanford-gpt2-small-a ... -e, stanford-gpt2-medium-a ... -e, pythia-160m, pythia-160m-seed1)"
        ) from None
    return ModelSource(name=argument, kind="transformer_lens", location=official)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of a tokenizer's vocabulary and special tokens: equal hashes mean interchangeable token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def load_model(source: ModelSource, device: str = "cpu", dtype: Any = None) -> LoadedModel:
    """Load one model as a processed `TransformerBridge`.

    Raises:
        ModelLoadError: the weights or the tokenizer cannot be loaded (offline without a cache, bad folder).
    """
    # lazy: torch and TransformerLens load when a model does, not when the web app imports this module
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    kwargs: dict[str, Any] = {"device": device, "dtype": dtype or torch.float32}
    try:
        bridge = TransformerBridge.boot_transformers(source.location, **kwargs)
    except Exception as exc:  # the loaders raise many types; the user needs one clear line
        hint = (
            " (offline? TransformerLens names need the Hugging Face cache or network)"
            if source.kind == "transformer_lens"
            else ""
        )
        raise ModelLoadError(f"could not load model {source.name!r} from {source.location}: {exc}{hint}") from exc
    if bridge.tokenizer is None:
        raise ModelLoadError(f"model {source.name!r} has no tokenizer files")
    bridge.enable_compatibility_mode(disable_warnings=True, **PAPER_PROCESSING)
    bridge.eval()
    _copy_mapped_tensors(bridge)
    cfg = bridge.cfg
    if cfg.d_mlp is None:
        raise ModelLoadError(f"model {source.name!r} has no MLP layers (d_mlp is not set)")
    return LoadedModel(
        source=source,
        bridge=bridge,
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        d_mlp=int(cfg.d_mlp),
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        n_heads=int(cfg.n_heads),
        act_fn=str(cfg.act_fn),
    )


def _copy_mapped_tensors(module: Any) -> None:
    """Copy the parameters that still live in the weights file transformers mapped into memory.

    A few tensors (GPT-2's attention weights) stay views of the memory-mapped safetensors file, which keeps the
    whole file resident: 474 MB of a GPT-2-small's 498 MB, counted in the run's resident memory (issue 11). Their
    copies are all the memory that is needed. Linux only (it reads ``/proc/self/maps``); elsewhere nothing is done.
    """
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    mapped = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith((".safetensors", ".bin", ".pt")):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((start, end))
    if not mapped:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        if any(start <= tensor.data_ptr() < end for start, end in mapped):
            tensor.data = tensor.data.clone()


def load_tokenizer(source: ModelSource) -> Any:
    """Load only a model's tokenizer (cheap), to check a family before loading any weights."""
    from transformers import AutoTokenizer  # lazy: as for load_model

    try:
        return AutoTokenizer.from_pretrained(source.location)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer of {source.name!r} from {source.location}: {exc}") from exc


def check_tokenizers(sources: Sequence[ModelSource], tokenizers: Sequence[Any]) -> None:
    """Refuse a family whose members tokenize differently (their token positions would not line up).

    Raises:
        ModelLoadError: naming the models whose tokenizer differs from the first model's.
    """
    fingerprints = [tokenizer_fingerprint(t) for t in tokenizers]
    differ = [s.name for s, f in zip(sources, fingerprints, strict=True) if f != fingerprints[0]]
    if differ:
        raise ModelLoadError(
            f"models must share a tokenizer: {', '.join(differ)} tokenize differently from {sources[0].name}"
        )


def load_family(arguments: Sequence[str], device: str = "cpu", dtype: Any = None) -> list[LoadedModel]:
    """Resolve every argument and compare tokenizers first (cheap), then load the weights."""
    if len(arguments) < 2:
        raise ModelLoadError("give at least two models (the same architecture trained from different seeds)")
    sources = [resolve_source(argument) for argument in arguments]
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ModelLoadError(f"two models share the name {duplicates[0]!r}; give each model once")
    check_tokenizers(sources, [load_tokenizer(s) for s in sources])
    loaded = []
    for source in sources:
        logger.info("loading %s from %s", source.name, source.location)
        loaded.append(load_model(source, device=device, dtype=dtype))
    return loaded


def decoded_vocab(tokenizer: Any, d_vocab: int) -> list[str]:
    """Each token id's decoded text (``' the'``, not the byte-level ``'Ġthe'``), for the store's vocab table."""
    size = max(d_vocab, len(tokenizer))
    return [tokenizer.decode([i]) if i < len(tokenizer) else "" for i in range(size)]
