"""`fastbon demo --quick` (what CI runs): it runs through the CLI, writes its CSV and PNG, and its numbers are sane."""

import contextlib
import csv
import io

import pytest

from fastbon import cli
from fastbon.demos.demo import RULES
from fastbon.demos.options import QUICK_NS, SEARCH_QUICK_NS, SEARCH_QUICK_PROBLEMS


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = cli.main(["demo", "--quick", "--out", str(out)])
    return out, exit_code, printed.getvalue()


def test_quick_demo_exits_cleanly_and_writes_csv_and_png(quick_demo):
    out, exit_code, printed = quick_demo
    assert exit_code == 0
    assert "embedded default model" in printed and "trained from scratch" in printed
    assert "verifier" in printed and "speedup" in printed
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "demo.csv") as handle:
        assert [int(row["n"]) for row in csv.DictReader(handle)] == list(QUICK_NS)


def read_rows(out):
    with open(out / "demo.csv") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def test_quick_demo_numbers_are_sane(quick_demo):
    out, _, _ = quick_demo
    for row in read_rows(out):
        for rule in RULES:
            assert 0.0 <= row[rule] <= 1.0, (rule, row)
        # pass@n contains sample 0, so the verifier can never do worse than the first sample
        assert row["verifier"] >= row["first_sample"], row
        assert row["generated_tokens"] >= row["n"] * row["problems"], "every sample generates at least one token"
        assert row["fastbon_s"] > 0 and row["fastbon_tokens_per_s"] > 0 and row["speedup"] > 0, row
        if row["n"] == 1:
            # one sample per problem: every rule has to pick it
            assert len({row[rule] for rule in RULES}) == 1, row


@pytest.fixture(scope="module")
def quick_search_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = cli.main(["demo", "--search", "--quick", "--out", str(out)])
    return out, exit_code, printed.getvalue()


def test_quick_search_demo_writes_a_row_per_method_and_budget(quick_search_demo):
    from fastbon.demos.demo_search import METHOD_LABELS

    out, exit_code, printed = quick_search_demo
    assert exit_code == 0
    assert "embedded chain model" in printed and "best-of-n, final verifier" in printed
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "search.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["method"], int(row["n"])) for row in rows) == sorted(
        (method, n) for method in METHOD_LABELS for n in SEARCH_QUICK_NS)
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0, row
        assert int(row["problems"]) == SEARCH_QUICK_PROBLEMS and float(row["seconds"]) > 0, row
        assert int(row["generated_tokens"]) >= int(row["problems"]), "every pick generates at least one token"
    best_of_n = [row for row in rows if row["method"].startswith("best_of_n/")]
    # one generate call per n, re-ranked four ways: the rows share its tokens and its time
    assert len({(row["n"], row["generated_tokens"], row["seconds"]) for row in best_of_n}) == len(SEARCH_QUICK_NS)
