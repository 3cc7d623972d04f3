"""The dashboard's one typed configuration, built by the caller and handed to `create_app` (never at import).

Every setting is declared once here with its default and help text (the field description); docs/api.md
repeats them in its settings table and `tests/app/test_settings.py` fails when one is undocumented. Values
also come from environment variables prefixed ``UNA_`` (``UNA_QUERY_TIME_LIMIT_MS=500``), so that a
deployment can tune the server without code. Validators refuse unsafe values with a message that names the
valid range.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


class Settings(BaseSettings):
    """Settings of the web app (the SQLite file it reads, query bounds, live re-run limits)."""

    model_config = SettingsConfigDict(env_prefix="UNA_", frozen=True, extra="forbid")

    db_path: Path = Field(
        description="The atlas SQLite file written by `universal-neurons precompute` (opened read-only)."
    )
    immutable: bool = Field(
        False,
        description="Open the file with SQLite's immutable=1: no -wal/-shm side files, fastest reads. Only for a "
        "finished file that no precompute is writing to.",
    )
    query_time_limit_ms: int = Field(
        1000, ge=10, le=60_000, description="Deadline of the SQL work of one request (progress-handler limit)."
    )
    export_time_limit_ms: int = Field(
        10_000,
        ge=10,
        le=600_000,
        description="Deadline of the SQL work of a CSV export, and of a comparison of two runs (/compare).",
    )
    max_rows: int = Field(1000, ge=1, le=100_000, description="Most rows one list request returns (`limit` cap).")
    max_export_rows: int = Field(
        1_000_000, ge=1, le=10_000_000, description="Most rows one CSV export writes; `truncated` beyond."
    )
    max_scatter_points: int = Field(
        20_000,
        ge=100,
        le=500_000,
        description="Most points the explorer scatter plots (a deterministic sample beyond).",
    )
    page_size: int = Field(50, ge=1, le=100_000, description="Default `limit` of list pages and endpoints.")
    top_examples: int = Field(10, ge=0, le=200, description="Top examples shown on a neuron page and in its JSON.")
    snippet_before: int = Field(16, ge=0, le=512, description="Tokens before the peak in snippet view.")
    snippet_after: int = Field(6, ge=0, le=512, description="Tokens after the peak in snippet view.")
    twin_examples: int = Field(4, ge=0, le=50, description="Top examples re-run through the twins side by side.")
    live_enabled: bool = Field(True, description="Allow live re-runs (model loading) at all.")
    live_max_chars: int = Field(2000, ge=1, le=100_000, description="Longest live text in characters (413 beyond).")
    live_max_tokens: int = Field(
        256, ge=1, le=8192, description="Most tokens of a live text (413 beyond; also capped by the model context)."
    )
    live_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Wall-clock limit of one live re-run's forward passes (504 beyond)."
    )
    live_load_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Wall-clock limit for loading a model the first time (504 beyond)."
    )
    live_max_concurrent: int = Field(
        2, ge=1, le=64, description="Live re-runs that may run at once; more wait up to `live_queue_timeout_s`."
    )
    live_queue_timeout_s: float = Field(
        2.0, ge=0, le=60, description="How long a live re-run waits for a free slot (503 beyond)."
    )
    live_cached_models: int = Field(8, ge=1, le=64, description="Models kept loaded for live re-runs (LRU).")
    live_torch_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="torch intra-op threads of the server process (1 keeps requests fair on few cores).",
    )
    device: str = Field("cpu", description="Device of live re-runs: cpu, cuda, cuda:N or mps.")
    request_threads: int = Field(
        4,
        ge=1,
        le=256,
        description="Threads that serve the (synchronous) routes of one worker process. A page is ~4 ms of "
        "CPU-bound Python: more threads only fight over the GIL (8 concurrent clients: 9 ms of CPU per request "
        "with 40 threads, 5 ms with 4). Raise it if slow live re-runs of large models hold threads.",
    )
    static_max_age_s: int = Field(
        86_400, ge=0, le=31_536_000, description="Cache-Control max-age of /static files (vendored files: immutable)."
    )

    @field_validator("db_path")
    @classmethod
    def _existing_file(cls, value: Path) -> Path:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"no atlas file at {path}; run `universal-neurons precompute --db {path} ...` first")
        return path.resolve()

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.page_size > self.max_rows:
            raise ValueError(f"page_size ({self.page_size}) must not exceed max_rows ({self.max_rows})")
        return self
