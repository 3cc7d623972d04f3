"""Bytes per neuron of an atlas file, by table, and the projected size of larger atlases (issue 11).

Usage: ``python -m bench.atlas_size ATLAS.db [--project NAME=NEURONS[:MODELS] ...]``. Prints JSON: the file's
size, the stored neurons (rows of ``neurons``), bytes per neuron overall and per table (SQLite's ``dbstat``: a
table's pages plus its indexes'), and for each ``--project`` the size of an atlas with that many neurons, table by
table at the measured bytes per neuron, the tables kept per partner model (`PER_PARTNER`) scaled from the file's
partners per neuron to MODELS - 1 (e.g. ``gpt2-small-5=184320:5 gpt2-medium-5=491520:5``). Reads the file only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Tables with rows per neuron and partner model: they grow with the number of models of a run.
PER_PARTNER = ("matches", "partner_scores")


def table_of(name: str, indexes: dict[str, str]) -> str:
    """The table a dbstat entry belongs to (an index counts towards its table)."""
    return indexes.get(name, name)


def measure(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        indexes = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'").fetchall())
        for table in {t for t in indexes.values()}:
            indexes[f"sqlite_autoindex_{table}_1"] = table
        per_table: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            per_table[table_of(name, indexes)] = per_table.get(table_of(name, indexes), 0) + size
        n_neurons = conn.execute("SELECT count(*) FROM neurons").fetchone()[0]
        pairs = conn.execute("SELECT count(*) FROM partner_scores").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    size = path.stat().st_size
    per = max(n_neurons, 1)
    return {
        "file": str(path),
        "bytes": size,
        "free_bytes": free,
        "neurons": n_neurons,
        "bytes_per_neuron": round(size / per, 1),
        "partners_per_neuron": round(pairs / per, 3),
        "tables_bytes_per_neuron": {
            name: round(b / per, 1) for name, b in sorted(per_table.items(), key=lambda kv: -kv[1]) if b / per >= 1
        },
        "_table_bytes": per_table,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument(
        "--project",
        nargs="*",
        default=[],
        help="NAME=NEURONS[:MODELS]: project an atlas of that many neurons (and models in a run)",
    )
    args = parser.parse_args(argv)
    result = measure(args.db)
    projected = {}
    tables = result.pop("_table_bytes")
    per = max(result["neurons"], 1)
    for item in args.project:
        name, _, spec = item.partition("=")
        neurons, _, models = spec.partition(":")
        partners = int(models) - 1 if models else result["partners_per_neuron"]
        scale = partners / result["partners_per_neuron"] if result["partners_per_neuron"] else 1.0
        # every table at its bytes per neuron (the per-partner ones scaled); free pages and the header as measured
        per_neuron = sum(b / per * (scale if t in PER_PARTNER else 1.0) for t, b in tables.items())
        per_neuron += (result["bytes"] - sum(tables.values())) / per
        projected[name] = {
            "neurons": int(neurons),
            "partners": partners,
            "bytes_per_neuron": round(per_neuron, 1),
            "gb": round(int(neurons) * per_neuron / 1e9, 3),
        }
    result["projected"] = projected
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
