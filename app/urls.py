"""The run a request looks at, and the URLs of every page and endpoint (one place builds them all).

Model URLs name the model only (``/models/seed-0``): they mean the newest complete run that has a model of that
name, so one file can hold several runs side by side (our family next to the paper's published tables, issue 7).
A ``?run=ID`` query picks another run; links made while looking at a run that a bare URL would not reach keep that
``run``, and every page shows a permalink pinned to its run. A ``?threshold=`` other than the run's own universality
threshold is view state too: every link keeps it, and links at the run's threshold stay without it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from app.queries.models import Model
from app.queries.runs import Run

#: The longest text a URL carries (the live text of ``?text=``). Even at 4 UTF-8 bytes per character, each
#: percent-encoded (12 URL bytes), 2,000 characters keep a request line far below the 64 KiB that uvicorn's HTTP
#: parser (httptools) takes; beyond that it answers a bare 400 before the app could (issue 8).
MAX_TEXT_IN_URL = 2000


@functools.lru_cache(maxsize=1024)
def _q(name: str) -> str:
    """A model name as one URL path segment."""
    return quote(name, safe="")


def neuron_label(layer: int, neuron: int) -> str:
    """The display id of a neuron.

    >>> neuron_label(3, 1234)
    'L3N1234'
    """
    return f"L{layer}N{neuron}"


@dataclass(frozen=True)
class Scope:
    """The run a request looks at and its family of models."""

    run: Run
    models: tuple[Model, ...]
    default: bool  # the run is the newest complete one (the front page's and search's URLs need no ?run=)
    custom_threshold: float | None = None  # a universality threshold other than the run's (?threshold=)
    # Names of the run's models whose URLs need no ?run=: this is the newest complete run that has them. The
    # newest complete run is that for all of its models.
    defaults: frozenset[str] = frozenset()

    @property
    def threshold(self) -> float:
        """The excess correlation above which a neuron counts as universal in this view."""
        return self.run.threshold if self.custom_threshold is None else self.custom_threshold

    def at_threshold(self, threshold: float | None) -> Scope:
        """This scope at another threshold; None or the run's own threshold mean the run's (clean URLs)."""
        custom = None if threshold is None or threshold == self.run.threshold else float(threshold)
        return self if custom == self.custom_threshold else dataclasses.replace(self, custom_threshold=custom)

    def is_default_for(self, model: str | None) -> bool:
        """Whether a URL without ?run= means this run: for a model's URLs, the newest complete run with that
        model; for the others (front page, search), the newest complete run."""
        return self.default or (model is not None and model in self.defaults)

    @property
    def links_key(self) -> str:
        """What this scope's links depend on beyond the run itself (which models need ?run=), for the ETag: a
        newer run with one of these models changes the links of this run's pages.

        >>> from app.queries.runs import Run
        >>> run = Run(1, "t", None, "complete", "h", [], None, None, {}, {}, {}, {})
        >>> Scope(run, (), default=True).links_key, Scope(run, (), default=False).links_key
        ('', 'n')
        """
        if self.default:
            return ""
        digest = hashlib.sha256("\n".join(sorted(self.defaults)).encode()).hexdigest()[:8] if self.defaults else ""
        return f"n{digest}"

    def state_params(self, pin: bool = False, model: str | None = None) -> list[tuple[str, object]]:
        """The view state every link keeps: the run (when a bare URL would show another, or `pin`) and a chosen
        threshold. `model` is the model a link is about (None: the front page, search)."""
        items: list[tuple[str, object]] = []
        if pin or not self.is_default_for(model):
            items.append(("run", self.run.id))
        if self.custom_threshold is not None:
            items.append(("threshold", self.custom_threshold))
        return items

    def model(self, name: str) -> Model | None:
        for model in self.models:
            if model.name == name:
                return model
        return None

    def model_by_id(self, model_id: int) -> Model | None:
        for model in self.models:
            if model.id == model_id:
                return model
        return None

    @property
    def etag(self) -> str:
        return f'W/"{self.run.content_hash or self.run.id}"'

    def _query(self, params: dict[str, object] | None = None, pin: bool = False, model: str | None = None) -> str:
        items = self.state_params(pin, model)
        for key, value in (params or {}).items():
            if value is None or value == "" or value == []:
                continue
            if isinstance(value, list | tuple):
                items.extend((key, v) for v in value)
            elif isinstance(value, bool):
                items.append((key, str(value).lower()))
            else:
                items.append((key, value))
        return "?" + urlencode(items) if items else ""

    def index_url(self) -> str:
        """The front page of this run (``/?run=ID`` unless it is the newest)."""
        return "/" + self._query()

    def home_url(self) -> str:
        """The front page without ?run= (every complete run's models), keeping a chosen threshold."""
        return "/" + (
            f"?{urlencode([('threshold', self.custom_threshold)])}" if self.custom_threshold is not None else ""
        )

    def model_url(self, model: str, params: dict[str, object] | None = None) -> str:
        return f"/models/{_q(model)}" + self._query(params, model=model)

    def neuron_url(
        self, model: str, layer: int, neuron: int, params: dict[str, object] | None = None, pin: bool = False
    ) -> str:
        return f"/models/{_q(model)}/neurons/{layer}/{neuron}" + self._query(params, pin, model)

    def partial_url(
        self, model: str, layer: int, neuron: int, panel: str, params: dict[str, object] | None = None
    ) -> str:
        return f"/models/{_q(model)}/neurons/{layer}/{neuron}/_partials/{panel}" + self._query(params, model=model)

    def model_partial_url(self, model: str, panel: str, params: dict[str, object] | None = None) -> str:
        return f"/models/{_q(model)}/_partials/{panel}" + self._query(params, model=model)

    def random_url(self, model: str, params: dict[str, object] | None = None) -> str:
        return f"/models/{_q(model)}/random" + self._query(params, model=model)

    def search_url(self, params: dict[str, object] | None = None) -> str:
        return "/search" + self._query(params)

    def top_neurons_url(self, model: str, params: dict[str, object] | None = None, partial: bool = False) -> str:
        """The "which neurons fire on my text?" page (or its fragment) for `model`, like a search in one model."""
        path = "/_partials/top-neurons" if partial else "/top-neurons"
        return path + self._query({"model": model, **(params or {})}, model=model)

    def api_url(self, path: str, params: dict[str, object] | None = None, model: str | None = None) -> str:
        """An API URL; `model` names the model of a ``/models/{model}/...`` path (its run is resolved by name)."""
        return "/api/v1" + path + self._query(params, model=model)

    def api_model_path(self, model: str) -> str:
        return f"/models/{_q(model)}"

    def api_model_url(self, model: str, suffix: str = "", params: dict[str, object] | None = None) -> str:
        """``/api/v1/models/{model}{suffix}`` with the view state."""
        return self.api_url(f"{self.api_model_path(model)}{suffix}", params, model)

    def api_neuron_url(
        self, model: str, layer: int, neuron: int, suffix: str = "", params: dict[str, object] | None = None
    ) -> str:
        return self.api_model_url(model, f"/neurons/{layer}/{neuron}{suffix}", params)
