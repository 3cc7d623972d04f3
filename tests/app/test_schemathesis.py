"""Property-based API testing: schemathesis runs as ``schemathesis run --checks all`` would (every phase, every
registered check), in-process against the fixture app, and must report nothing.

That makes the OpenAPI schema a complete statement of what the server accepts (issue 8): a schema-valid request
must not be refused (positive_data_acceptance), a schema-violating one must be (negative_data_rejection), and
the coverage phase tries each bound, enum and pattern at its edge. Path parameters are drawn from the fixture's
real models and neurons most of the time, so that requests get past the 404 lookups into the handlers.

Every check of ``schemathesis.checks.CHECKS`` is enabled, so a check added by a newer schemathesis is run too.
Some have nothing to look at in this API and pass trivially; they stay enabled so that they would notice if
that changed: ignored_auth and object_level_authorization (no security schemes: the API is public and
read-only), use_after_free and ensure_resource_availability (no operation creates or deletes a resource: the
stateful phase finds no such links), missing_required_header (no required headers). The one check left out,
max_response_time, is not in the registry: a time limit is no property of the schema, and on shared CI cores it
would only be flaky.

The number of examples per operation is bounded (`EXAMPLES`) and the generation seed fixed: the test takes
about half a minute on two cores. Run it with a larger `EXAMPLES` and other seeds to search harder.
"""

from __future__ import annotations

from collections import Counter

import schemathesis
from schemathesis.checks import CHECKS
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

EXAMPLES = 15
SEED = 20240308
#: What positive_data_acceptance takes as "accepted". Its defaults (2xx, 3xx, 401, 403, 404, 409, 429, 5xx)
#: plus 413: a live text within the schema's bounds can still be longer than the server's live_max_chars or
#: live_max_tokens, which are settings of the running server (and a token count is no JSON Schema keyword);
#: every live operation documents its 413.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "5xx"]
#: Interventions also take 422 for two rules no JSON Schema can state, both documented in their 422: a position
#: past the text's tokens (how many there are depends on the tokenizer), and ``mean`` in a run that stores no
#: mean activations (the fixture's run 1). Only these operations; negative_data_rejection still runs on them.
INTERVENE_PATHS = r"/(intervene|_partials/intervene)$"
#: Real path values, drawn with this probability (the rest are generated: unknown models, neurons out of range).
REAL = {"model": ["tiny-a", "tiny-a-permuted", "tiny-b"], "layer": [0, 1], "neuron": [0, 3, 63]}
REAL_PROBABILITY = 0.8


def config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "cache": {"enabled": False},  # no state kept between runs (it would write .schemathesis/ here)
            "suppress-health-check": ["all"],
            "generation": {"max-examples": EXAMPLES, "database": "none"},
            "checks": {
                **{name: {"enabled": True} for name in CHECKS.get_all_names()},
                "positive_data_acceptance": {"enabled": True, "expected-statuses": ACCEPTED},
            },
            # The stateful phase infers links from the schema (dependency-analysis), not from URLs in answers:
            # location-headers inference also follows every same-origin URL found in a body, and reads the
            # scatter's documented URL *template* (neuron_url_template: /models/m/neurons/{layer}/{neuron}, to
            # fill in) as a real URL, sending "{layer}" back as a layer and calling the 422 a rejected valid request.
            "phases": {"stateful": {"inference": {"algorithms": ["dependency-analysis"]}}},
            "operations": [
                {
                    "include-path-regex": INTERVENE_PATHS,
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "422"]}},
                }
            ],
            "dictionaries": {name: {"values": values} for name, values in REAL.items()},
            "parameters": {f"path.{name}": {"dictionary": name, "probability": REAL_PROBABILITY} for name in REAL},
        }
    )


def test_schemathesis_with_every_check_reports_nothing(client):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app, config=config())
    failures: list[str] = []
    checks_run: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    statuses[interaction.response.status_code] += 1
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    checks_run[check.name] += 1
                    if check.failure_info is not None:
                        case = event.recorder.cases[case_id].value
                        failures.append(
                            f"{case.operation.label} [{check.name}] {check.failure_info.failure.title}: "
                            f"{check.failure_info.failure.message}\n    {check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"schemathesis error: {event}")
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert set(CHECKS.get_all_names()) <= set(checks_run), "a registered check did not run"
    assert {200, 307, 404, 405, 422} <= set(statuses), statuses
    assert statuses[200] >= 100, statuses
