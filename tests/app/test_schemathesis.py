"""Property-based API testing: schemathesis generates requests from the OpenAPI schema; no answer may be a 5xx,
and every answer must match the schema's status codes, content types and response schemas.

The number of examples per operation is bounded (`EXAMPLES`) to keep the suite fast.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 24
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_no_operation_answers_with_a_server_error(client):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures = []
    calls = []
    for operation in operations:
        fixed = {"model": "tiny-a"} if "{model}" in operation.path else None
        # valid and invalid requests, with the model fixed to a real one half of the time so that requests get
        # past the model lookup into the handlers
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE, path_parameters=fixed),
            operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=fixed),
            operation.as_strategy(GenerationMode.POSITIVE),
        )

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            response = case.call()
            calls.append(response.status_code)
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {type(exc).__name__}: {exc}")
    if failures:
        pytest.fail("\n\n".join(failures))
    assert len(calls) >= 5 * len(operations), "schemathesis generated too few requests"
    assert {200, 404, 422} <= set(calls)
