"""The paper's own numbers in the dashboard (issue 7): ``universal-neurons import-paper`` adds the published tables
to the tests' fixture file as runs; every page and JSON twin serves them next to the runs already there; a model
name means the newest complete run that has it; ``/compare`` and ``universal-neurons compare`` put two runs of one
model side by side, checked on a published table against a perturbed copy of itself (a known answer)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from app.viewmodels.compare import ComparePage
from app.viewmodels.explorer import ExplorerPage
from app.viewmodels.index import IndexPage
from app.viewmodels.neuron import NeuronPage
from cli.main import main
from precompute.published import PUBLISHED_MODELS, import_table, paper_table, read_universal_table
from precompute.store import AtlasStore
from tests.app.conftest import FULL_RUN, HTML, REFERENCE_ONLY_RUN, query
from tests.dashboard_factories import copy_atlas
from tests.factories import MOST_PERTURBED, SHIFT, write_perturbed_table

SMALL, MEDIUM, PYTHIA = "stanford-gpt2-small-a", "stanford-gpt2-medium-a", "pythia-160m"
#: The runs `import-paper` adds after the fixture's two, in PUBLISHED_MODELS order.
PUBLISHED_RUN = {SMALL: 3, MEDIUM: 4, PYTHIA: 5}
#: Universal neurons per layer of GPT-2-small-a (paper-spec §2.5).
SMALL_LAYERS = {0: 222, 1: 244, 2: 101, 3: 110, 4: 71, 5: 72, 6: 56, 7: 112, 8: 101, 9: 142, 10: 125, 11: 177}
#: The columns of universal.csv and where the neuron's JSON twin has them.
NEURON_FIELDS = ("excess_corr", "mean_corr", "max_corr", "min_corr", "mean_baseline", "max_baseline", "min_baseline")
WEIGHT_FIELDS = ("w_in_norm", "w_out_norm", "input_bias", "in_out_sim", "l2_penalty")
VOCAB_FIELDS = ("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt")
PRE_FIELDS = {"mean": "pre_mean", "var": "pre_var", "skew": "pre_skew", "kurt": "pre_kurt"}


@pytest.fixture(scope="session")
def paper_template(atlas_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture file with the three published tables imported through the CLI, once per session."""
    db = copy_atlas(atlas_template, tmp_path_factory.mktemp("paper") / "paper.db")
    assert main(["import-paper", "--db", str(db)]) == 0
    return db


@pytest.fixture
def paper_db(paper_template: Path, tmp_path: Path) -> Path:
    return copy_atlas(paper_template, tmp_path / "atlas.db")


@pytest.fixture
def paper_client(paper_db, make_client):
    return make_client(paper_db)


@pytest.fixture
def perturbed(paper_db: Path, tmp_path: Path):
    """A newer run of stanford-gpt2-small-a (run 6): the published table with 100 neurons dropped, 50 added and
    the excess of the rest nudged (tests/factories.py)."""
    table = write_perturbed_table(tmp_path)
    with AtlasStore(paper_db) as store:
        run = import_table(store, PUBLISHED_MODELS[SMALL], table.path, "perturbed", provenance={"source": "test"})
    assert run == 6
    return table


def rows(model: str) -> dict[tuple[int, int], dict[str, float]]:
    return {(r.layer, r.neuron): dict(r.values) for r in read_universal_table(paper_table(model))}


# --- the import ---------------------------------------------------------------------------------------------------


def test_import_paper_through_the_cli(atlas_db, capsys):
    assert main(["import-paper", "--db", str(atlas_db), "--model", PYTHIA, "--model", SMALL]) == 0
    runs = query(atlas_db, "SELECT r.id, r.status, m.name FROM runs r JOIN models m ON m.run_id = r.id ORDER BY r.id")
    assert [(run, status, name) for run, status, name in runs if run > FULL_RUN] == [
        (3, "complete", PYTHIA),
        (4, "complete", SMALL),
    ]
    assert main(["import-paper", "--db", str(atlas_db)]) == 0  # the two again (skipped), and medium-a
    assert query(atlas_db, "SELECT count(*) FROM runs") == [(5,)]

    capsys.readouterr()
    assert main(["import-paper", "--db", str(atlas_db), "--model", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("universal-neurons: error: no published table for model 'gpt2'")
    assert "stanford-gpt2-small-a, stanford-gpt2-medium-a, pythia-160m" in err
    assert main(["import-paper", "--db", str(atlas_db.parent / "no-such-folder" / "x.db")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("model", [SMALL, MEDIUM, PYTHIA])
def test_universal_counts_per_layer_are_the_tables(paper_client, model):
    table = rows(model)
    listed = paper_client.get(f"/api/v1/models/{model}/neurons", params={"universal": "true", "limit": 1}).json()
    assert listed["total"] == len(table) == {SMALL: 1533, MEDIUM: 1211, PYTHIA: 465}[model]
    assert listed["model"]["run"] == PUBLISHED_RUN[model] and listed["published"]["table"] == f"{model}/universal.csv"
    overview = paper_client.get(f"/api/v1/models/{model}").json()
    per_layer = {layer["layer"]: layer["n_universal"] for layer in overview["layers"]}
    assert per_layer == {layer: Counter(k[0] for k in table)[layer] for layer in range(len(per_layer))}
    assert overview["model"]["n_neurons"] == PUBLISHED_MODELS[model].n_neurons
    if model == SMALL:
        assert per_layer == SMALL_LAYERS


@pytest.mark.parametrize(("model", "layer", "neuron"), [(SMALL, 0, 2436), (MEDIUM, 23, 3440), (PYTHIA, 11, 1070)])
def test_a_neuron_is_its_row_of_the_table(paper_client, model, layer, neuron):
    row = rows(model).get((layer, neuron))
    if row is None:  # pythia's L11.1070 (an entropy neuron) is not universal: the table does not list it
        body = paper_client.get(f"/api/v1/models/{model}/neurons/{layer}/{neuron}").json()
        assert body["excess_corr"] is None and body["universal"] is None and body["published"]["listed"] is False
        return
    body = paper_client.get(f"/api/v1/models/{model}/neurons/{layer}/{neuron}").json()
    assert body["run"] == PUBLISHED_RUN[model] and body["universal"] is True
    for name in NEURON_FIELDS:
        assert body[name] == pytest.approx(row[name], abs=1e-6), name
    for name in WEIGHT_FIELDS:
        assert body["weights"]["stats"][name] == pytest.approx(row[name], abs=1e-6), name
    for name in VOCAB_FIELDS:
        assert body["vocab"]["moments"][name] == pytest.approx(row[name], abs=1e-6), name
    for column, name in PRE_FIELDS.items():
        assert body["activation"]["stats"][name] == pytest.approx(row[column], abs=1e-6), name
    csv_rows = paper_client.get(f"/api/v1/models/{model}/neurons.csv", params={"layer": layer}).text
    exported = next(r for r in csv.DictReader(io.StringIO(csv_rows)) if int(r["neuron"]) == neuron)
    assert float(exported["excess_corr"]) == pytest.approx(row["excess_corr"], abs=1e-9)
    assert float(exported["vocab_kurt"]) == pytest.approx(row["vocab_kurt"], abs=1e-9)


def test_the_runs_already_in_the_file_serve_as_before(paper_client, client):
    """Every URL of the fixture answers as it did before the import (the model names differ from the paper's)."""
    for url in (
        "/api/v1/models/tiny-a",
        "/api/v1/models/tiny-a/neurons?universal=true",
        "/api/v1/models/tiny-a/neurons/1/7",
        f"/api/v1/models/tiny-b/neurons/0/2?run={REFERENCE_ONLY_RUN}",
        f"/api/v1/models?run={FULL_RUN}",
        f"/api/v1/models?run={REFERENCE_ONLY_RUN}",
        "/api/v1/models/tiny-a/scatter?x=vocab_kurt&y=excess_corr",
    ):
        before, after = client.get(url), paper_client.get(url)
        assert after.status_code == before.status_code == 200, url
        assert after.json() == before.json(), url
    page = paper_client.get("/models/tiny-a/neurons/1/7", headers=HTML)
    assert page.status_code == 200 and 'id="published"' not in page.text


# --- the published pages --------------------------------------------------------------------------------------


def test_a_published_neuron_says_what_the_table_lacks(paper_client):
    response = paper_client.get(f"/models/{MEDIUM}/neurons/23/3440", headers=HTML)
    assert response.status_code == 200
    html = response.text
    page = response.context["page"]
    assert isinstance(page, NeuronPage)
    assert page.model_dump(mode="json") == paper_client.get(f"/api/v1/models/{MEDIUM}/neurons/23/3440").json()
    # one note, with the command that computes the rest from the TransformerLens names
    assert html.count('id="published"') == 1 and "not in it" in html
    command = f"precompute --preset paper --reference-only --db {MEDIUM}.db --device cuda --tokens 100000000 {MEDIUM} "
    assert command + " ".join(f"stanford-gpt2-medium-{s}" for s in "bcde") in html
    assert page.published is not None and page.published.command in html
    # the paper's label of this neuron (prediction_neurons.csv: L23.3440 suppresses all_caps)
    assert [(label.role, label.feature) for label in page.published.labels] == [("suppression", "all_caps")]
    assert "paper: suppression (all_caps)" in html
    # nothing that needs weights, tokens or partners is offered, and no empty panel is shown
    assert not page.live.enabled and page.twins_url is None and page.vocab_histogram_url is None
    for absent in ('textarea class="live"', 'id="twins"', 'id="examples"', 'id="token-tables"', "No partner scores"):
        assert absent not in html, absent
    for present in ('id="universality"', 'id="weights"', 'id="activation"', 'id="vocab"'):
        assert present in html, present


def test_live_runs_of_a_published_model_are_refused(paper_client):
    response = paper_client.post(f"/api/v1/models/{SMALL}/run", json={"text": "hi", "neurons": [[0, 2436]]})
    assert response.status_code == 503 and "published table" in response.json()["error"]
    vocab = paper_client.get(f"/api/v1/models/{SMALL}/neurons/0/2436/vocab")
    assert vocab.status_code == 503 and list(vocab.json()) == ["error", "status"]


def test_explorer_scatter_and_csv_of_a_published_model(paper_client):
    response = paper_client.get(f"/models/{MEDIUM}?x=layer&y=vocab_kurt&color=universal", headers=HTML)
    assert response.status_code == 200 and "badge published" in response.text
    page = response.context["page"]
    assert isinstance(page, ExplorerPage) and page.total == 1211
    twin = paper_client.get(f"/api/v1/models/{MEDIUM}/neurons?x=layer&y=vocab_kurt&color=universal").json()
    assert page.model_dump(mode="json") == twin and twin["published"]["table"] == f"{MEDIUM}/universal.csv"
    scatter = paper_client.get(f"/api/v1/models/{MEDIUM}/scatter", params={"x": "layer", "y": "vocab_kurt"}).json()
    assert scatter["total"] == 1211 and not scatter["sampled"]
    # the late-layer prediction and suppression neurons: vocab kurtosis > 10 only after the midpoint (paper §5.1)
    high = Counter(layer for layer, kurt in zip(scatter["xs"], scatter["ys"], strict=True) if kurt > 10)
    assert sum(high.values()) == 291 and high[23] == 77 and all(layer >= 5 for layer in high)

    # the same through the explorer's ranges (docs/reproduction.md): 165 suppression-like (skew < 0) of the 291,
    # and the position-neuron candidates (universal and pre-activation kurtosis < 2: 9 in layers 1, 2 and 5)
    def total(*ranges: str) -> int:
        params = {"range": list(ranges), "limit": 20}
        return paper_client.get(f"/api/v1/models/{MEDIUM}/neurons", params=params).json()["total"]

    assert (total("vocab_kurt:10:"), total("vocab_kurt:10:", "vocab_skew::0"), total("pre_kurt::2")) == (291, 165, 9)
    export = paper_client.get(f"/api/v1/models/{SMALL}/neurons.csv", params={"universal": "true"})
    assert export.headers["x-total-count"] == "1533" and len(export.text.strip().splitlines()) == 1534


def test_the_front_page_shows_every_complete_runs_models(paper_client):
    response = paper_client.get("/", headers=HTML)
    page = response.context["page"]
    assert isinstance(page, IndexPage)
    assert page.model_dump(mode="json") == paper_client.get("/api/v1/").json()
    assert [g.run.id for g in page.groups] == [5, 4, 3, FULL_RUN, REFERENCE_ONLY_RUN]
    assert [(g.published is not None, [m.name for m in g.models]) for g in page.groups][:3] == [
        (True, [PYTHIA]),
        (True, [MEDIUM]),
        (True, [SMALL]),
    ]
    # overviews: each name where its bare URL leads, grouped by run (run 1's names are all in run 2)
    assert [(o.model.run, o.model.name) for o in page.models] == [
        (5, PYTHIA),
        (4, MEDIUM),
        (3, SMALL),
        (FULL_RUN, "tiny-a"),
        (FULL_RUN, "tiny-a-permuted"),
        (FULL_RUN, "tiny-b"),
    ]
    assert [o.model.n_universal for o in page.models[:3]] == [465, 1211, 1533]
    assert (
        page.run is not None
        and page.run.id == 5
        and page.run.published == f"Gurnee et al. 2024: {PYTHIA}/universal.csv"
    )
    html = response.text
    assert html.count('class="plot-spec"') == 12 and html.count('class="badge published"') >= 6
    assert f'href="/models/{MEDIUM}"' in html and 'href="/models/tiny-a"' in html
    assert 'href="/models/tiny-a?run=1"' in html  # run 1's models, listed in the runs table, keep their run
    # ?run= still shows that run alone
    alone = paper_client.get(f"/api/v1/?run={FULL_RUN}").json()
    assert [o["model"]["name"] for o in alone["models"]] == ["tiny-a", "tiny-a-permuted", "tiny-b"]


# --- several runs of one model ------------------------------------------------------------------------------------


def test_a_model_name_means_the_newest_complete_run_that_has_it(paper_client, perturbed):
    listed = paper_client.get(f"/api/v1/models/{SMALL}/neurons", params={"universal": "true"}).json()
    assert listed["model"]["run"] == 6 and listed["total"] == len(perturbed.perturbed) == 1483
    older = paper_client.get(f"/api/v1/models/{SMALL}/neurons", params={"universal": "true", "run": 3}).json()
    assert older["model"]["run"] == 3 and older["total"] == 1533
    # links of the newer run need no ?run=; those of the older one keep it
    newer = paper_client.get(f"/api/v1/models/{SMALL}/neurons/0/2436").json()
    assert newer["url"] == f"/models/{SMALL}/neurons/0/2436" and newer["nav"]["next"]["url"].endswith("/0/2437")
    assert newer["excess_corr"] == pytest.approx(perturbed.original[MOST_PERTURBED] + SHIFT, abs=1e-6)
    pinned = paper_client.get(f"/api/v1/models/{SMALL}/neurons/0/2436?run=3").json()
    assert pinned["url"] == f"/models/{SMALL}/neurons/0/2436?run=3" and pinned["nav"]["next"]["url"].endswith("?run=3")
    assert pinned["excess_corr"] == pytest.approx(perturbed.original[MOST_PERTURBED], abs=1e-6)
    # another model of an older run: still no ?run= (run 4 is the newest with medium-a), nor for the fixture's
    assert paper_client.get(f"/api/v1/models/{MEDIUM}").json()["model"]["url"] == f"/models/{MEDIUM}"
    assert paper_client.get("/api/v1/models/tiny-a").json()["model"]["run"] == FULL_RUN
    # the jump box of an older run's page searches that run
    html = paper_client.get(f"/models/{SMALL}/neurons/0/2436?run=3", headers=HTML).text
    assert '<input type="hidden" name="run" value="3">' in html
    found = paper_client.get("/api/v1/search", params={"q": "L0N2436", "model": SMALL, "run": 3}).json()
    assert found["redirect"] == f"/models/{SMALL}/neurons/0/2436?run=3"
    assert paper_client.get("/api/v1/search", params={"q": "L0N2436", "model": MEDIUM}).json()["redirect"] == (
        f"/models/{MEDIUM}/neurons/0/2436"
    )
    # the front page shows the newer run of small-a, and offers to compare the two
    index = paper_client.get("/api/v1/").json()
    assert [(o["model"]["run"], o["model"]["name"]) for o in index["models"]][:3] == [
        (6, SMALL),
        (5, PYTHIA),
        (4, MEDIUM),
    ]
    assert index["compare_url"] == "/compare"


def test_compare_a_table_with_a_perturbed_copy_of_itself(paper_client, perturbed):
    url = f"/api/v1/compare?a={SMALL}&b={SMALL}@3&top=5"
    body = paper_client.get(url).json()
    assert (body["a"]["spec"], body["b"]["spec"]) == (f"{SMALL}@6", f"{SMALL}@3")
    agreement = body["agreement"]
    assert (agreement["n_a"], agreement["n_b"], agreement["n_both"]) == (1483, 1533, 1433)
    assert agreement["jaccard"] == pytest.approx(1433 / 1583, abs=1e-6)
    assert agreement["precision"] == pytest.approx(1433 / 1483, abs=1e-6)
    assert agreement["recall"] == pytest.approx(1433 / 1533, abs=1e-6)
    shared = set(perturbed.original) & set(perturbed.perturbed)
    assert {c["layer"]: (c["universal_a"], c["universal_b"], c["universal_both"]) for c in body["layers"]} == {
        layer: (
            sum(1 for k in perturbed.perturbed if k[0] == layer),
            sum(1 for k in perturbed.original if k[0] == layer),
            sum(1 for k in shared if k[0] == layer),
        )
        for layer in range(12)
    }
    correlations = {c["statistic"]: c for c in body["correlations"]}
    assert correlations["excess_corr"]["n_shared"] == 1433 and 0.9 < correlations["excess_corr"]["pearson"] < 1
    assert correlations["vocab_kurt"]["pearson"] == pytest.approx(1.0)
    assert correlations["frequency"]["n_shared"] == 0 and correlations["frequency"]["pearson"] is None
    top = body["disagreements"][0]
    assert (top["layer"], top["neuron"], top["difference"]) == (*MOST_PERTURBED, pytest.approx(SHIFT, abs=1e-6))
    assert top["url_a"] == f"/models/{SMALL}/neurons/0/2436" and top["url_b"] == f"/models/{SMALL}/neurons/0/2436?run=3"
    assert len(body["disagreements"]) == 5 and body["notes"]

    response = paper_client.get(f"/compare?a={SMALL}&b={SMALL}@3&top=5", headers=HTML)
    assert response.status_code == 200 and response.headers["link"].startswith(f"<{body['api_url']}>")
    page = response.context["page"]
    assert isinstance(page, ComparePage) and page.model_dump(mode="json") == body
    html = response.text
    assert 'id="compare-layers"' in html and f'href="/models/{SMALL}/neurons/0/2436?run=3"' in html

    # without a and b: the chooser, which suggests this comparison
    chooser = paper_client.get("/api/v1/compare").json()
    assert chooser["agreement"] is None and chooser["suggested_url"] == f"/compare?a={SMALL}%406&b={SMALL}%403"
    assert [o["spec"] for o in chooser["options"]][:3] == [f"{SMALL}@6", f"{PYTHIA}@5", f"{MEDIUM}@4"]


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"a": SMALL, "b": PYTHIA}, 422, "only two runs of the same model can be compared"),
        ({"a": "tiny-a", "b": SMALL}, 422, "only two runs of the same model can be compared"),
        ({"a": "gpt2", "b": SMALL}, 404, "no complete run has a model 'gpt2'"),
        ({"a": f"{SMALL}@999", "b": SMALL}, 404, "no run 999"),
        ({"a": f"{SMALL}@1", "b": SMALL}, 404, "no model 'stanford-gpt2-small-a' in run 1"),
        ({"a": f"{SMALL}@x", "b": SMALL}, 422, "invalid request"),
        ({"a": "", "b": SMALL}, 422, "invalid request"),
        ({"a": SMALL, "b": SMALL, "top": 201}, 422, "invalid request"),
    ],
)
def test_comparisons_that_cannot_be_made(paper_client, params, status, message):
    response = paper_client.get("/api/v1/compare", params=params)
    assert response.status_code == status
    body = response.json()
    assert body["status"] == status and message in body["error"] and list(body)[:2] == ["error", "status"]
    page = paper_client.get("/compare", params=params, headers=HTML)
    assert page.status_code == status and page.headers["content-type"].startswith("text/html")


def test_compare_through_the_cli(paper_db, perturbed, capsys):
    assert main(["compare", "--db", str(paper_db), "--a", SMALL, "--b", f"{SMALL}@3", "--json", "--top", "3"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert (body["a"]["run_id"], body["b"]["run_id"]) == (6, 3)
    assert (body["agreement"]["n_a"], body["agreement"]["n_b"], body["agreement"]["n_both"]) == (1483, 1533, 1433)
    assert body["disagreements"][0]["difference"] == pytest.approx(SHIFT)
    assert main(["compare", "--db", str(paper_db), "--a", SMALL, "--b", f"{SMALL}@3"]) == 0
    text = capsys.readouterr().out
    assert "universal in both: 1433; Jaccard 0.9052" in text and "L0N2436" in text
    assert main(["compare", "--db", str(paper_db), "--a", SMALL, "--b", MEDIUM]) == 2
    assert capsys.readouterr().err == (
        f"universal-neurons: error: A is {SMALL} and B is {MEDIUM}: only two runs of the same model can be compared\n"
    )
    assert main(["compare", "--db", str(paper_db), "--a", f"{SMALL}@999", "--b", SMALL]) == 2
    assert capsys.readouterr().err == "universal-neurons: error: no run 999\n"
