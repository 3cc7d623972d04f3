"""Settings: each one is documented in docs/api.md, and unsafe values are refused with a clear message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def documented_settings() -> dict[str, str]:
    section = DOCS.read_text().split("## Settings", 1)[1]
    return dict(re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", section, flags=re.MULTILINE))


def test_every_setting_is_documented_with_its_default():
    documented = documented_settings()
    assert set(documented) == set(Settings.model_fields), "docs/api.md's settings table must list every setting"
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        if name == "db_path":
            continue
        default = documented[name].strip().strip("`")
        expected = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
        assert default == expected, f"docs/api.md says {name} defaults to {default}, the code says {expected}"


def test_defaults(tmp_path):
    db = tmp_path / "a.db"
    db.write_bytes(b"")
    settings = Settings(db_path=db)
    assert settings.live_max_chars == 2000 and settings.live_max_tokens == 256 and settings.device == "cpu"
    assert settings.db_path == db.resolve()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"query_time_limit_ms": 0}, "greater than or equal to 10"),
        ({"query_time_limit_ms": 10**9}, "less than or equal to 60000"),
        ({"max_rows": 0}, "greater than or equal to 1"),
        ({"page_size": 5000, "max_rows": 100}, "must not exceed max_rows"),
        ({"live_max_concurrent": 0}, "greater than or equal to 1"),
        ({"live_timeout_s": 0}, "greater than 0"),
        ({"live_max_tokens": 10**6}, "less than or equal to 8192"),
        ({"device": "gpu; rm -rf /"}, "device must be cpu"),
        ({"unknown_setting": 1}, "Extra inputs are not permitted"),
    ],
)
def test_unsafe_values_are_refused(tmp_path, overrides, message):
    db = tmp_path / "a.db"
    db.write_bytes(b"")
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(db_path=db, **overrides)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="no atlas file"):
        Settings(db_path=tmp_path / "missing.db")
    with pytest.raises(ValidationError, match="no atlas file"):
        Settings(db_path=tmp_path)  # a directory


def test_environment_variables(tmp_path, monkeypatch):
    db = tmp_path / "a.db"
    db.write_bytes(b"")
    monkeypatch.setenv("UNA_QUERY_TIME_LIMIT_MS", "250")
    assert Settings(db_path=db).query_time_limit_ms == 250


def test_importing_the_app_loads_no_model_and_reads_no_settings():
    import subprocess
    import sys

    code = "import sys, app.main as m; print(hasattr(m, 'app'), hasattr(m, 'settings'), 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.split() == ["False", "False", "False"]
