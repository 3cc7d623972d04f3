"""The Jinja environment: autoescape always on, filters for numbers and token display, static asset URLs.

No filter returns markup: every value that comes from data (token text, model names, family labels) is
escaped by Jinja when it is printed. Token text is made visible (newline → ↵, tab → ⇥, other control
characters → \\xNN) before escaping, never instead of it.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from fastapi.templating import Jinja2Templates

from app import plots
from precompute.paths import package_folder

TEMPLATES_DIR = package_folder(Path(__file__).resolve().parent, "templates", "templates")
STATIC_DIR = package_folder(Path(__file__).resolve().parent, "static", "static")

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\ufeff]")
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def token_display(text: str) -> str:
    """Token text with whitespace and control characters made visible (still plain text, escaped later).

    >>> token_display("\\n\\tx\\x07"), token_display("")
    ('↵⇥x\\\\x07', '∅')
    """
    if text == "":
        return "∅"
    for raw, shown in _VISIBLE.items():
        text = text.replace(raw, shown)
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text
    )


def fmt(value: Any, digits: int = 3) -> str:
    """A number for display; missing values are an em dash.

    >>> fmt(0.12345), fmt(None), fmt(3), fmt(12345.678, 1)
    ('0.123', '—', '3', '12345.7')
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return "—"
    if value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.{digits}e}"
    return f"{value:.{digits}f}"


def signed(value: float | None) -> str:
    """An activation for a tooltip: sign and four decimals.

    >>> signed(0.5), signed(-0.17)
    ('+0.5000', '-0.1700')
    """
    return "—" if value is None else f"{value:+.4f}"


def tone(value: float) -> str:
    """The colour class of an activation: ``p`` positive, ``n`` negative, ``z`` zero."""
    return "p" if value > 0 else "n" if value < 0 else "z"


def alpha(value: float, scale: float) -> str:
    """How strongly a token is coloured, in [0, 1], relative to the neuron's scale.

    The square root makes small (e.g. GELU's negative) activations visible without hiding the ordering.

    >>> alpha(1.0, 4.0), alpha(-0.04, 4.0), alpha(0.0, 4.0)
    ('0.50', '0.10', '0')
    """
    if value == 0 or scale <= 0:
        return "0"
    return f"{max(min(1.0, math.sqrt(abs(value) / scale)), 0.08):.2f}"


@dataclass(frozen=True)
class StaticFile:
    path: Path
    digest: str
    media_type: str


def static_files() -> dict[str, StaticFile]:
    """Every file /static serves, with a content hash for cache-busting URLs."""
    import js_lib_htmx
    import plotly

    files = {
        "app.css": (STATIC_DIR / "app.css", "text/css"),
        "app.js": (STATIC_DIR / "app.js", "text/javascript"),
        "vendor/htmx.min.js": (
            Path(js_lib_htmx.__file__).parent / "static" / "htmx" / "htmx.min.js",
            "text/javascript",
        ),
        "vendor/plotly.min.js": (Path(plotly.__file__).parent / "package_data" / "plotly.min.js", "text/javascript"),
    }
    out = {}
    for name, (path, media_type) in files.items():
        if path.is_file():
            out[name] = StaticFile(path, hashlib.sha256(path.read_bytes()).hexdigest()[:12], media_type)
    return out


def make_templates(assets: dict[str, StaticFile]) -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,  # always, whatever the file name: nothing from data is ever marked safe
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters.update(tokshow=token_display, fmt=fmt, signed=signed, tone=tone, alpha=alpha)
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":"), "allow_nan": False}
    env.globals.update(
        static_url=lambda name: f"/static/{name}?v={assets[name].digest}" if name in assets else f"/static/{name}",
        plots=plots,
    )
    return Jinja2Templates(env=env)
