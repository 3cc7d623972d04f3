"""Named run configurations for ``universal-neurons precompute --preset NAME``; ``paper`` is Gurnee et al.'s.

A preset gives values to command-line options and to stage settings; an option or a ``--set STAGE.KEY=VALUE``
given alongside it wins over the preset's value. The run records the preset's name (``runs.config["preset"]``)
next to every value of its configuration, so the file says how the run was made (docs/analyses.md, "Our
definitions and the paper's").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The Pile's test split on the Hugging Face hub (split ``test``): the original test split with the subsets under
#: copyright removed (Books3, BookCorpus2, OpenSubtitles, YouTubeSubtitles: paper-spec §7.3 item 12), each split
#: cleaned separately; the paper's own copy (the-eye.eu) is offline. Streamed in its file order: the paper
#: shuffled its rows (without a seed). Needs ``pip install datasets`` and network (or a local HF cache).
PILE_TEST = "hf:monology/pile-uncopyrighted"

#: Tokens of the paper's statistics and explanations: pile.test.all-10m.512, 19,532 rows of 512 (paper-spec §1.2).
PAPER_ANALYSIS_TOKENS = 10_000_384


@dataclass(frozen=True)
class Preset:
    """A named set of option values and stage settings."""

    name: str
    summary: str  # one line, for --help
    options: Mapping[str, Any]  # the ``precompute`` command's options, by argparse ``dest``
    analysis: Mapping[str, Mapping[str, Any]]  # stage settings, as ``--set STAGE.KEY=VALUE`` gives them


PAPER = Preset(
    name="paper",
    summary=(
        "the paper's configuration: the Pile test split (hf:monology/pile-uncopyrighted, split test), rows of 512 "
        "(or the models' context if shorter), 100M tokens for the correlations on the counted tokens (BOS/EOS/pad "
        "and newlines left out), the first 10,000,384 tokens for statistics, examples and variance reductions, "
        "statistics and variance reductions on all tokens, unigram features > 3000 occurrences, gaussian baseline, "
        "threshold 0.5"
    ),
    options={
        "dataset": PILE_TEST,
        "hf_split": "test",
        "text_field": "text",
        "tokens": 100_000_000,  # 195,313 rows of 512 = the paper's pile.test.all-100m.512
        "ctx": None,
        "max_ctx": 512,
        "keep_special": False,  # the correlations skip BOS/EOS/pad and "\n" (paper A.2)
        "keep_newlines": False,
        "baseline": "gaussian",
        "threshold": 0.5,
    },
    analysis={
        "stats": {"tokens": "all", "max_tokens": PAPER_ANALYSIS_TOKENS},
        "families": {"tokens": "all", "max_tokens": PAPER_ANALYSIS_TOKENS, "unigram_min_count": 3001},
        "examples": {"max_tokens": PAPER_ANALYSIS_TOKENS},
    },
)

#: Every preset, by name.
PRESETS: dict[str, Preset] = {PAPER.name: PAPER}


def merged_analysis(preset: Preset | None, settings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stage settings: the preset's, then ``settings`` (the ``--set`` values) over them, key by key.

    >>> merged_analysis(PAPER, {"stats": {"max_tokens": 5}, "roles": {"rows": 2}})["stats"]
    {'tokens': 'all', 'max_tokens': 5}
    >>> merged_analysis(None, {"stats": {"bins": 7}})
    {'stats': {'bins': 7}}
    """
    merged: dict[str, dict[str, Any]] = {
        stage: dict(values) for stage, values in (preset.analysis if preset else {}).items()
    }
    for stage, values in settings.items():
        merged.setdefault(stage, {}).update(values)
    return merged


__all__ = ["PAPER", "PAPER_ANALYSIS_TOKENS", "PILE_TEST", "PRESETS", "Preset", "merged_analysis"]
