"""A non-editable install (the wheel) precomputes and serves from another directory.

The wheel must carry the templates, static files and Alembic migrations that live at the top of the checkout;
before it did, a wheel resolved the migrations to the installed Alembic library itself and found no templates.
The wheel is installed into a folder of its own (``pip install --target``) that is put first on ``PYTHONPATH``, and
every command runs from an empty directory, so nothing can be read from the checkout by accident (checked: the
imported packages' files are inside that folder).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    build = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(build / "dist"), str(ROOT)], check=True
    )
    wheels = list((build / "dist").glob("*.whl"))
    assert len(wheels) == 1
    target = build / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheels[0])], check=True)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    return {"site": target, "cwd": elsewhere}


def _env(site: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_the_wheel_carries_templates_static_files_and_migrations(installed):
    probe = (
        "import app, cli, precompute; from app.templating import TEMPLATES_DIR, STATIC_DIR; "
        "from precompute.store import ALEMBIC_DIR; "
        "print(app.__file__, cli.__file__, precompute.__file__, TEMPLATES_DIR, STATIC_DIR, ALEMBIC_DIR, sep='\\n')"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=installed["cwd"],
        env=_env(installed["site"]),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    site = str(installed["site"].resolve())
    assert all(path.startswith(site) for path in out), out
    templates, static, migrations = map(Path, out[3:])
    assert (templates / "neuron.html").is_file() and (templates / "_partials").is_dir()
    assert (static / "app.css").is_file()
    assert (migrations / "env.py").is_file() and any((migrations / "versions").glob("0001_*.py"))


def test_a_non_editable_install_precomputes_and_serves_from_another_directory(installed, tiny_family):
    script = installed["site"] / "bin" / "universal-neurons"
    env = _env(installed["site"])
    cwd = installed["cwd"]
    models = [str(tiny_family["base"]), str(tiny_family["other"])]
    precompute = ["precompute", "--db", "atlas.db", "--tokens", "3000", "--batch-size", "8", *models]
    subprocess.run(
        [sys.executable, str(script), *precompute],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
    )
    port = _free_port()
    # two workers: the multi-process path imports the app by name in each worker, from the wheel too
    server = subprocess.Popen(
        [sys.executable, str(script), "serve", "--db", "atlas.db", "--port", str(port), "--workers", "2"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = _get(f"{base}/api/v1/models")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    reason = server.stderr.read().decode() if server.stderr else "server did not start"
                    raise AssertionError(reason) from None
                time.sleep(0.3)
        assert status == 200
        status, page = _get(f"{base}/models/tiny-a/neurons/0/1")
        assert status == 200
        assert "tiny-a" in page and "L0" in page
        status, css = _get(f"{base}/static/app.css")
        assert status == 200 and css.strip()
    finally:
        server.terminate()
        server.wait(timeout=30)
