"""The run a request looks at, and the URLs of every page and endpoint (one place builds them all).

Model URLs name the model only (``/models/seed-0``): they mean the newest complete run that has it. A
``?run=ID`` query picks another run; links made while looking at a non-default run keep that ``run``, and every
page shows a permalink pinned to its run. A ``?threshold=`` other than the run's own universality threshold is
view state too: every link keeps it, and links at the run's threshold stay without it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from app.queries.models import Model
from app.queries.runs import Run


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
    default: bool  # the run is the newest complete one (its URLs need no ?run=)
    custom_threshold: float | None = None  # a universality threshold other than the run's (?threshold=)

    @property
    def threshold(self) -> float:
        """The excess correlation above which a neuron counts as universal in this view."""
        return self.run.threshold if self.custom_threshold is None else self.custom_threshold

    def at_threshold(self, threshold: float | None) -> Scope:
        """This scope at another threshold; None or the run's own threshold mean the run's (clean URLs)."""
        custom = None if threshold is None or threshold == self.run.threshold else float(threshold)
        return self if custom == self.custom_threshold else dataclasses.replace(self, custom_threshold=custom)

    def state_params(self, pin: bool = False) -> list[tuple[str, object]]:
        """The view state every link keeps: the run (when it is not the newest, or `pin`) and a chosen threshold."""
        items: list[tuple[str, object]] = []
        if pin or not self.default:
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

    def _query(self, params: dict[str, object] | None = None, pin: bool = False) -> str:
        items = self.state_params(pin)
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
        return "/" + self._query()

    def model_url(self, model: str, params: dict[str, object] | None = None) -> str:
        return f"/models/{_q(model)}" + self._query(params)

    def neuron_url(
        self, model: str, layer: int, neuron: int, params: dict[str, object] | None = None, pin: bool = False
    ) -> str:
        return f"/models/{_q(model)}/neurons/{layer}/{neuron}" + self._query(params, pin)

    def partial_url(
        self, model: str, layer: int, neuron: int, panel: str, params: dict[str, object] | None = None
    ) -> str:
        return f"/models/{_q(model)}/neurons/{layer}/{neuron}/_partials/{panel}" + self._query(params)

    def model_partial_url(self, model: str, panel: str, params: dict[str, object] | None = None) -> str:
        return f"/models/{_q(model)}/_partials/{panel}" + self._query(params)

    def random_url(self, model: str, params: dict[str, object] | None = None) -> str:
        return f"/models/{_q(model)}/random" + self._query(params)

    def search_url(self, params: dict[str, object] | None = None) -> str:
        return "/search" + self._query(params)

    def api_url(self, path: str, params: dict[str, object] | None = None) -> str:
        return "/api/v1" + path + self._query(params)

    def api_model_path(self, model: str) -> str:
        return f"/models/{_q(model)}"

    def api_neuron_url(
        self, model: str, layer: int, neuron: int, suffix: str = "", params: dict[str, object] | None = None
    ) -> str:
        return self.api_url(f"{self.api_model_path(model)}/neurons/{layer}/{neuron}{suffix}", params)
