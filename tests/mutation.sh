#!/usr/bin/env bash
# Mutation testing with mutmut 3, one module group at a time, in a scratch copy of the working tree (docs/testing.md).
#
#   bash tests/mutation.sh universality            # one group; see MUTATION_GROUPS below
#   MUTATION_DIR=/tmp/una-mutation TIMEOUT=900 bash tests/mutation.sh correlation
#   EXTRA_TESTS=tests/unit/test_store_mutations.py bash tests/mutation.sh store      # more tests in the selection
#   EXTRA_MODE=replace EXTRA_TESTS=tests/app/test_queries_mutations.py bash tests/mutation.sh queries  # only those
#   MUTANT_GLOBS='precompute.correlation.xǁCorrelationEngineǁ_finish_tile*' bash tests/mutation.sh correlation
#       (only the mutants of these functions are run: mutmut's names, space-separated globs)
#
# Not part of `make test` or CI: a group takes minutes to an hour. The copy (and mutmut's mutants/ folder and cache)
# lives under $MUTATION_DIR, never in the checkout. mutmut reads its [mutmut] section from the copy's setup.cfg,
# which this script writes; pyproject.toml has no [tool.mutmut] table.
set -euo pipefail
set -f  # no pathname expansion: the globs below are mutmut's

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MUTMUT="${MUTMUT:-$ROOT/.venv/bin/mutmut}"
MUTATION_DIR="${MUTATION_DIR:-/tmp/una-mutation}"
TIMEOUT="${TIMEOUT:-900}"
group="${1:?usage: tests/mutation.sh GROUP (see MUTATION_GROUPS in this script)}"

# group -> "files to mutate (globs, relative to the root) | the fast tests that cover them"
declare -A MUTATION_GROUPS=(
    [correlation]="precompute/correlation.py | tests/unit/test_correlation.py"
    [universality]="precompute/universality.py | tests/unit/test_universality.py"
    [moments]="precompute/moments.py | tests/unit/test_stats.py"
    [stats]="precompute/stages/stats.py | tests/unit/test_stats.py"
    [families]="precompute/features.py precompute/stages/families.py | tests/unit/test_features.py tests/unit/test_paper_definitions.py"
    [weights]="precompute/weights.py | tests/unit/test_weights.py"
    [roles]="precompute/stages/roles.py precompute/causal.py | tests/unit/test_roles.py"
    [store]="precompute/store.py | tests/unit/test_store.py tests/unit/test_published.py"
    [queries]="app/queries/*.py | tests/app/test_threshold.py tests/app/test_api_contract.py tests/app/test_pages.py"
)
spec="${MUTATION_GROUPS[$group]:?unknown group $group; groups: ${!MUTATION_GROUPS[*]}}"
mutate="${spec%%|*}"
tests="${spec#*|}"
if [[ "${EXTRA_MODE:-}" == replace ]]; then
    tests="${EXTRA_TESTS:?EXTRA_MODE=replace needs EXTRA_TESTS}"
else
    tests="$tests ${EXTRA_TESTS:-}"
fi

work="$MUTATION_DIR/$group"
rm -rf "$work"
mkdir -p "$work"
# tracked and untracked files that git does not ignore: what a commit would hold
(cd "$ROOT" && git ls-files -co --exclude-standard -z | while IFS= read -r -d '' file; do
    [[ -e "$file" ]] && printf '%s\0' "$file"
done | xargs -0 cp --parents -t "$work")

{
    echo "[mutmut]"
    echo "source_paths="
    printf '    %s\n' precompute app cli
    echo "only_mutate="
    for glob in $mutate; do printf '    %s\n' "$glob"; done
    echo "also_copy="
    printf '    %s\n' templates static alembic alembic.ini
    echo "pytest_add_cli_args_test_selection="
    for test in $tests; do printf '    %s\n' "$test"; done
    # A temporary folder inside the copy, emptied by every run.
    # A mutant's time limit is 15 times the run time of the tests that cover it plus this constant: a module
    # fixture's precompute counts only for its first test, so a mutant covered by a later one needs the slack.
    echo "timeout_constant=120"
    # torch in a process forked after it ran (mutmut's default "fork") can hang: fork from a server that only
    # imported the tests
    echo "process_isolation=forkserver"
    echo "pytest_add_cli_args="
    printf '    %s\n' -p no:cacheprovider "--basetemp=$work/pytest-tmp"
} > "$work/setup.cfg"

cd "$work"
echo "mutmut $("$MUTMUT" --version 2>/dev/null || true) on $mutate with $tests (limit ${TIMEOUT}s)"
status=0
# shellcheck disable=SC2086  # the globs are words (set -f above keeps the shell from expanding them)
timeout "$TIMEOUT" "$MUTMUT" run --max-children 1 ${MUTANT_GLOBS:-} || status=$?
"$MUTMUT" results --all true >"$work/results.txt" || true
echo "exit status $status (124: stopped at the time limit); results in $work/results.txt"
awk -F': ' '{print $NF}' "$work/results.txt" | sort | uniq -c
