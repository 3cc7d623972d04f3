"""A precompute under torchrun writes the atlas one process writes (issue 11, docs/distributed.md).

Two gloo ranks on the CPU, launched as users launch them (``python -m torch.distributed.run --standalone
--nproc-per-node 2 -m cli.main precompute ...``), against the same run in one process:

- exact: the top, quantile and random examples (rows, positions, windows, bins' shares), histograms, counts,
  extremes, token tables, the best match of every neuron (its layer and index), and everything rank 0 computes
  alone in `Stage.write` (weights, roles);
- within 1e-6: every correlation (``neurons``, ``partner_scores``, ``matches``, ``layer_summaries``,
  ``distributions``): the sums are the same, added in another order;
- within float rounding (relative 1e-9): moments, position profiles and variance reductions, for the same reason.
  Complementary features (``position:<32`` and ``position:[32,64)`` split the row in two) have equal variance
  reductions in exact arithmetic, so their order among a neuron's best features may differ: they are accepted as
  a tie when their variance reductions agree.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cli.main import main
from precompute.stages import STAGES, CorrelationStage

ROOT = Path(__file__).resolve().parents[2]
#: Tables whose floats are correlations: they must agree within 1e-6.
CORRELATION_TABLES = {table.name for table in CorrelationStage.tables}
#: The columns naming a neuron's best feature, with the variance reduction that ranks it.
FEATURE_COLUMNS = {"feature": "variance_reduction", "feature_id": "variance_reduction", "best_feature": "best_vr"}


def torchrun(*arguments: str, script: Path | None = None, **popen: Any) -> list[str]:
    """The command that runs ``universal-neurons`` (or ``script``) on two gloo ranks of this machine."""
    target = [str(script)] if script else ["-m", "cli.main"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*launcher, *target, *arguments]


def environment() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_ranks(command: list[str]) -> str:
    """Run a distributed command to its end; returns its log (both ranks')."""
    done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return done.stderr


def close(a: float, b: float, table: str) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if table in CORRELATION_TABLES:
        return a == b or abs(a - b) <= 1e-6
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def same_value(a: Any, b: Any, table: str) -> bool:
    """Equal, floats within the table's tolerance, JSON text compared as values (a [feature, VR] pair may name
    a tied feature)."""
    if isinstance(a, float) and isinstance(b, float):
        return close(a, b, table)
    if isinstance(a, str) and isinstance(b, str) and a[:1] in "[{" and a != b:
        return same_json(json.loads(a), json.loads(b), table)
    return bool(a == b)


def same_json(a: Any, b: Any, table: str) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k], table) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], float) and isinstance(b[1], float):
            return close(a[1], b[1], table)  # [feature, VR]: a tie may name either feature
        return len(a) == len(b) and all(same_json(x, y, table) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return close(float(a), float(b), table)
    return bool(a == b)


def stage_rows(db: Path) -> dict[str, tuple[list[str], list[tuple]]]:
    """Every table a stage owns: its columns and its rows in primary-key order."""
    tables = {}
    with sqlite3.connect(db) as conn:
        for table in (table for stage in STAGES for table in stage.tables):
            columns = [c.name for c in table.columns]
            order = ", ".join(c.name for c in table.primary_key.columns) or ", ".join(columns)
            rows = conn.execute(f"SELECT {', '.join(columns)} FROM {table.name} ORDER BY {order}").fetchall()
            tables[table.name] = (columns, rows)
    return tables


def assert_same_atlas(db: Path, reference: Path) -> dict[str, bool]:
    """Every stage table of ``db`` equals the reference's (see the module's docstring); returns which tables are
    exactly equal."""
    ours, theirs = stage_rows(db), stage_rows(reference)
    exact = {}
    for name, (columns, rows) in theirs.items():
        got = ours[name][1]
        assert len(got) == len(rows), f"{name}: {len(got)} rows, one process wrote {len(rows)}"
        exact[name] = got == rows
        for row, expected in zip(got, rows, strict=True):
            values, wanted = dict(zip(columns, row, strict=True)), dict(zip(columns, expected, strict=True))
            tied = [c for c in FEATURE_COLUMNS if c in values and values[c] != wanted[c]]
            for column in tied:  # another feature of the same VR: a tie (its share is the other feature's)
                assert close(values[FEATURE_COLUMNS[column]], wanted[FEATURE_COLUMNS[column]], name), (name, row)
                values.pop("fraction", None)
            for column, value in values.items():
                if column not in tied:
                    assert same_value(value, wanted[column], name), (name, column, value, wanted[column], row)
    return exact


def best_matches(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        columns = "model_id, partner_model_id, layer, neuron, max_layer, max_neuron"
        return conn.execute(f"SELECT {columns} FROM partner_scores ORDER BY 1, 2, 3, 4").fetchall()


def example_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(examples)")]
        return conn.execute(f"SELECT * FROM examples ORDER BY {', '.join(columns)}").fetchall()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return [p for child in children for p in (child, *descendants(child))]


def wait_gone(pids: list[int], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def models(tiny_family) -> list[str]:
    return [str(tiny_family["base"]), str(tiny_family["other"])]


def test_two_ranks_write_the_atlas_of_one_process(models, tmp_path):
    """Every stage; 7 batches, so the ranks read 4 and 3 and rank 1 has none in the last step."""
    args = ["precompute", "--tokens", "2000", "--batch-size", "5", *models]
    reference, db = tmp_path / "one.db", tmp_path / "two.db"
    assert main([*args, "--db", str(reference)]) == 0
    log = run_ranks(torchrun(*args, "--db", str(db)))
    assert "[rank 1/2]" in log and "streaming done: rank 0 writes" in log
    exact = assert_same_atlas(db, reference)
    assert best_matches(db) == best_matches(reference)
    assert example_rows(db) == example_rows(reference)
    assert all(exact[table.name] for stage in STAGES if stage.name in ("examples", "roles") for table in stage.tables)
    with sqlite3.connect(db) as conn:
        status, environment = conn.execute("SELECT status, environment FROM runs").fetchone()
    assert status == "complete" and json.loads(environment)["world_size"] == 2
    assert not (tmp_path / "two.db.checkpoints").exists()


SPLIT_SCRIPT = """
import sys

from cli.main import main
from precompute import pipeline
from precompute.memory import Split

# every splittable stage in two passes (at these shapes no budget asks for it)
pipeline.fit_split = lambda price, *_: price(Split({"correlations": 2, "stats": 2, "families": 2}))
sys.exit(main(sys.argv[1:]))
"""


def test_split_passes_reduce_each_pass_once(models, tmp_path, monkeypatch):
    """With two passes per splittable stage, the second pass adds only its own block (the first pass's sums are
    already every rank's): the atlas is still the one process's."""
    from precompute import pipeline
    from precompute.memory import Split

    script = tmp_path / "split.py"
    script.write_text(SPLIT_SCRIPT)
    args = ["precompute", "--tokens", "1500", "--batch-size", "4", "--stages", "correlations,stats,families"]
    args += models
    reference, db = tmp_path / "one.db", tmp_path / "two.db"
    with monkeypatch.context() as patch:
        patch.setattr(
            pipeline,
            "fit_split",
            lambda price, *_: price(Split(dict.fromkeys(["correlations", "stats", "families"], 2))),
        )
        assert main([*args, "--db", str(reference)]) == 0
    run_ranks(torchrun(*args, "--db", str(db), script=script))
    with sqlite3.connect(db) as conn:
        plan = json.loads(conn.execute("SELECT environment FROM runs").fetchone()[0])["memory_plan"]
    assert plan["split"]["passes"] == {"correlations": 2, "stats": 2, "families": 2}
    assert_same_atlas(db, reference)
    assert best_matches(db) == best_matches(reference)


def recorded_forwards(patch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record, in the list returned, the names of the models each pass over the rows runs (the pipeline's calls of
    `stream_batches`, one a pass)."""
    from precompute import activations, pipeline

    ran: list[list[str]] = []
    stream = activations.stream_batches

    def recorded(models, *rest, **options):
        ran.append([model.name for model in models])
        return stream(models, *rest, **options)

    patch.setattr(pipeline, "stream_batches", recorded)
    return ran


def test_a_split_pass_runs_only_the_models_it_reads(tiny_family, tmp_path, monkeypatch):
    """One process, three models, each splittable stage in three passes: the first pass runs every model; a later
    one only the models of its correlation blocks and Gram matrices and of the stats' and families' blocks (the
    family's neurons cut in three runs: model 1's, then model 2's), and the atlas is the one-pass run's."""
    from cli.main import parse_arguments, precompute_config
    from precompute import pipeline
    from precompute.memory import Split

    models = [str(tiny_family[name]) for name in ("base", "permuted", "other")]
    args = ["precompute", "--tokens", "1200", "--batch-size", "4", "--stages", "correlations,stats,families", *models]
    reference, db = tmp_path / "one.db", tmp_path / "split.db"
    with monkeypatch.context() as patch:
        ran = recorded_forwards(patch)
        assert main([*args, "--db", str(reference)]) == 0
        assert len(ran) == 1 and len(ran[0]) == 3
        ran.clear()
        split = Split(dict.fromkeys(["correlations", "stats", "families"], 3))
        patch.setattr(pipeline, "fit_split", lambda price, *_: price(split))
        assert main([*args, "--db", str(db)]) == 0
    names = ran[0]
    assert len(ran) == 3 and len(names) == 3
    # correlation pass 1 is pair (0, 2) with model 2's Gram matrices, pass 2 pair (1, 2) (`pack_into_passes`);
    # the stats' and families' second block is model 1's, the third model 2's
    assert ran[1:] == [names, [names[1], names[2]]]
    assert sum(map(len, ran)) == 8  # not 9
    with sqlite3.connect(db) as conn:
        environment = json.loads(conn.execute("SELECT environment FROM runs").fetchone()[0])
    assert environment["forward_models_by_pass"] == ran  # the run's record, and the plan's before it ran
    config = precompute_config(parse_arguments([*args, "--db", str(db)]))
    assert pipeline.planned_forwards(config, *pipeline.prepare(config), split) == ran
    assert_same_atlas(db, reference)
    assert best_matches(db) == best_matches(reference)


def test_a_reference_only_split_takes_the_partners_blocks_with_their_correlations(tiny_family, tmp_path, monkeypatch):
    """Reference-only, the correlations in two passes and the stats and families in three: their blocks take the
    partners first (`block_order`), so a pass that correlates the reference with a partner also holds that
    partner's neurons; fewer forward passes than the run's own order would need, and the one-pass run's atlas."""
    from cli.main import parse_arguments, precompute_config
    from precompute import pipeline
    from precompute.memory import Split
    from precompute.stages import base

    models = [str(tiny_family[name]) for name in ("base", "permuted", "other")]
    args = ["precompute", "--tokens", "1200", "--batch-size", "4", "--reference-only"]
    args += ["--stages", "correlations,stats,families", *models]
    reference, db = tmp_path / "one.db", tmp_path / "split.db"
    split = Split({"correlations": 2, "stats": 3, "families": 3})  # a pair a pass; a model's neurons a block
    assert main([*args, "--db", str(reference)]) == 0
    with monkeypatch.context() as patch:
        ran = recorded_forwards(patch)
        patch.setattr(pipeline, "fit_split", lambda price, *_: price(split))
        assert main([*args, "--db", str(db)]) == 0
    config = precompute_config(parse_arguments([*args, "--db", str(db)]))
    loaded = pipeline.prepare(config)
    assert pipeline.planned_forwards(config, *loaded, split) == ran
    with monkeypatch.context() as patch:
        patch.setattr(base, "block_order", lambda inputs, names: list(names))  # the run's own order
        in_run_order = pipeline.planned_forwards(config, *loaded, split)
    names = ran[0]
    # pass 1 correlates the reference with the second partner while the stats and families read the second
    # partner's neurons (the first partner's came in pass 0); pass 2 reads the reference's alone
    assert ran == [names, [names[0], names[2]], [names[0]]]
    assert in_run_order == [names, names, [names[2]]]  # pass 1 would hold the first partner's block: 3 models
    assert_same_atlas(db, reference)
    assert best_matches(db) == best_matches(reference)


PASSES_SCRIPT = """
import json
import os
import sys

from cli.main import main
from precompute import pipeline
from precompute.memory import Split

# the split of ATLAS_TEST_SPLIT (stage -> passes), as a budget too small for one pass would ask
split = Split(json.loads(os.environ["ATLAS_TEST_SPLIT"]))
pipeline.fit_split = lambda price, *_: price(split)
# ATLAS_TEST_DELAY: seconds each correlation update waits, so that a pass lasts long enough for a test to see
# its checkpoints (a tiny model's pass took under a second, and a poll could miss it)
delay = float(os.environ.get("ATLAS_TEST_DELAY", "0"))
if delay:
    import time

    from precompute.stages.correlations import CorrelationStage

    update = CorrelationStage.update

    def slowed(self, batch):
        time.sleep(delay)
        update(self, batch)

    CorrelationStage.update = slowed
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory) -> list[str]:
    """Two tiny models of four layers: up to four correlation passes of one layer of model a each."""
    from tests.factories import tiny_gpt2

    root = tmp_path_factory.mktemp("deep")
    return [str(tiny_gpt2(root / f"deep-{seed}", seed=seed, n_layers=4)) for seed in (0, 1)]


def test_ranks_split_the_correlation_passes(deep_models, tmp_path, monkeypatch):
    """Four correlation passes on two ranks: each rank makes two of its own over every row (rank 0 passes 0 and
    2, rank 1 passes 1 and 3), with no all-reduce of their accumulators, while the stats and families stages (two
    passes each) and the examples stage still split the rows in the same passes; the ranks' results are merged
    at the end into the one process's atlas."""
    from precompute import pipeline
    from precompute.memory import Split

    split = {"correlations": 4, "stats": 2, "families": 2}
    script = tmp_path / "split.py"
    script.write_text(PASSES_SCRIPT)
    args = ["precompute", "--tokens", "1500", "--batch-size", "4", "--stages", "correlations,stats,examples,families"]
    args += deep_models
    reference, db = tmp_path / "one.db", tmp_path / "two.db"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "fit_split", lambda price, *_: price(Split(split)))
        assert main([*args, "--db", str(reference)]) == 0
    with monkeypatch.context() as patch:
        patch.setenv("ATLAS_TEST_SPLIT", json.dumps(split))
        log = run_ranks(torchrun(*args, "--db", str(db), script=script))
    for rank, passes in ((0, [0, 2]), (1, [1, 3])):  # ceil(4 / 2) = 2 passes over the rows each
        assert (
            f"[rank {rank}/2] precompute.stages.correlations: correlations: the 2 ranks split the passes: "
            f"this rank makes passes {passes} of 4, over every row" in log
        )
        assert log.count(f"[rank {rank}/2] precompute.pipeline: pass over the rows done") == 2
    with sqlite3.connect(db) as conn:
        environment = json.loads(conn.execute("SELECT environment FROM runs").fetchone()[0])
    assert environment["passes_by_rank"] == {"correlations": [[0, 2], [1, 3]]}
    assert environment["memory_plan"]["split"]["passes"] == split
    assert_same_atlas(db, reference)
    assert best_matches(db) == best_matches(reference)
    assert top_matches(db) == top_matches(reference)
    assert example_rows(db) == example_rows(reference)


def test_killed_run_resumes_in_its_own_passes(tiny_family, tmp_path, monkeypatch):
    """Three models in three correlation passes (one pair each): rank 0 makes passes 0 and 2, rank 1 pass 1 and
    then, in rank 0's last pass, reads only its share of the batches for the stats stage's second pass. Killed in
    that pass, the run resumes from the ranks' checkpoints (rank 1's share counted from the dataset's first batch,
    not from the row it resumes at) and ends with the one process's atlas."""
    from precompute import pipeline
    from precompute.memory import Split

    split = {"correlations": 3, "stats": 2}
    models = [str(tiny_family[name]) for name in ("base", "permuted", "other")]
    args = ["precompute", "--tokens", "1200", "--batch-size", "2", "--stages", "correlations,stats", *models]
    reference, db = tmp_path / "one.db", tmp_path / "two.db"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "fit_split", lambda price, *_: price(Split(split)))
        assert main([*args, "--db", str(reference)]) == 0
    script = tmp_path / "split.py"
    script.write_text(PASSES_SCRIPT)
    monkeypatch.setenv("ATLAS_TEST_SPLIT", json.dumps(split))
    monkeypatch.setenv("ATLAS_TEST_DELAY", "0.25")  # every pass lasts seconds: the kill lands inside pass 2
    command = torchrun(*args, "--db", str(db), "--checkpoint-seconds", "0", script=script)
    folder = tmp_path / "two.db.checkpoints"
    files = [folder / "run-1.pt", folder / "run-1.rank-1.pt"]

    def rank_0_state() -> dict | None:
        with contextlib.suppress(Exception):  # not written yet, or being replaced
            return torch.load(files[0], map_location="cpu", weights_only=False)
        return None

    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:  # until a checkpoint inside rank 0's pass 2
        state = rank_0_state()
        if state and state["stages"]["correlations"]["round"] == 1 and state["rows_done"] > 0:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before a checkpoint inside rank 0's second pass was seen"
    ranks = descendants(process.pid)
    for pid in [process.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError):  # a worker may exit between the listing and the signal
            os.kill(pid, signal.SIGKILL)
    process.wait()
    wait_gone(ranks)
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    assert states[0]["stages"]["correlations"]["schedule"] == [0, 2]
    assert states[1]["stages"]["correlations"]["schedule"] == [1]
    assert states[0]["stages"]["correlations"]["round"] == 1, "killed in rank 0's second pass"
    assert states[1]["stages"]["correlations"]["round"] == 1, "rank 1 had made its only pass"
    assert {(s["rows_done"], s["saves"]) for s in states} == {(states[0]["rows_done"], states[0]["saves"])}
    rows = states[0]["rows_done"]
    assert rows > 0, "killed inside the pass"

    log = run_ranks(torchrun(*args, "--db", str(db), script=script))
    for rank in (0, 1):
        assert f"[rank {rank}/2] precompute.pipeline: resuming from checkpoint at row {rows}" in log
    assert_same_atlas(db, reference)
    assert best_matches(db) == best_matches(reference)
    assert top_matches(db) == top_matches(reference)
    with sqlite3.connect(db) as conn:
        record = json.loads(conn.execute("SELECT environment FROM runs").fetchone()[0])
    assert record["passes_by_rank"] == {"correlations": [[0, 2], [1]]}


def top_matches(db: Path) -> list[tuple]:
    """Every neuron's top-k partners (which neuron, in which rank), without the correlations."""
    with sqlite3.connect(db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(matches)")]
        kept = [c for c in columns if "corr" not in c and "excess" not in c]
        return conn.execute(f"SELECT {', '.join(kept)} FROM matches ORDER BY {', '.join(kept)}").fetchall()


def test_killed_distributed_run_resumes(models, tmp_path):
    """Both ranks are killed mid-stream (SIGKILL to torchrun and its workers); the same command resumes each rank
    from its own checkpoint, written at the same step as the other's, and ends with the one process's atlas."""
    args = ["precompute", "--tokens", "4000", "--batch-size", "2", "--stages", "correlations,examples", *models]
    reference, db = tmp_path / "one.db", tmp_path / "two.db"
    assert main([*args, "--db", str(reference)]) == 0
    folder = tmp_path / "two.db.checkpoints"
    files = [folder / "run-1.pt", folder / "run-1.rank-1.pt"]
    command = torchrun(*args, "--db", str(db), "--checkpoint-seconds", "0")
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not all(f.exists() for f in files) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = descendants(process.pid)  # torchrun starts each rank in a session of its own
    for pid in [process.pid, *ranks]:  # the launcher first (it must not notice and stop the ranks), then the ranks
        os.kill(pid, signal.SIGKILL)
    process.wait()
    wait_gone(ranks)
    assert all(f.exists() for f in files), "each rank wrote a checkpoint before the kill"
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    assert {(s["rows_done"], s["saves"], s["world_size"]) for s in states} == {
        (states[0]["rows_done"], states[0]["saves"], 2)
    }, "the ranks' checkpoints are of one step"
    rows = states[0]["rows_done"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]

    assert rows > 0, "killed inside the pass (at its end rows_done is 0 again)"

    log = run_ranks(torchrun(*args, "--db", str(db)))
    for rank in (0, 1):  # both ranks go on from the checkpoint's row, not from the start
        assert f"[rank {rank}/2] precompute.pipeline: resuming from checkpoint at row {rows}" in log
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM runs").fetchall() == [("complete",)]
    assert_same_atlas(db, reference)
    assert best_matches(db) == best_matches(reference)
    assert example_rows(db) == example_rows(reference)
    assert not any(f.exists() for f in files)
