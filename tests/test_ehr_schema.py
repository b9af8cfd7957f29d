"""Study schemas and schema-driven ingestion of site extracts, on real files.

The heart-disease tests read the real UCI files ($CAREFL_DATA; skipped when absent); the others
write real CSV extracts with the synthetic generator (deploy/datasets/synthetic_ehr.py) or by hand.
"""

from __future__ import annotations

import csv
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.ingest import ehr_encode, ehr_extract
from client.ingest import heart_disease
from client.ingest.ehr_extract import ExtractRejected
from deploy.datasets.synthetic_ehr import ROW_VIOLATIONS, profiles, synthesize, write_violation_extract
from shared_models.feature_stats import FeatureStats, NumericStats
from shared_models.schema import SchemaError, builtin_schema, load_schema, parse_schema
from tests import helpers

import tomllib

VISITS = builtin_schema("diabetes-visits")

SMALL = """
[study]
name = "toy"
version = 2

[patient]
id = "pid"

[label]
column = "y"
values = ["no", "yes"]
positive = ["yes"]

[[features]]
name = "age"
kind = "numeric"
unit = "years"
min = 18
max = 110

[[features]]
name = "smoker"
kind = "categorical"
values = ["never", "current"]
"""


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


# ---- the schema itself ----

def test_shipped_schemas_load_and_fix_the_model_width():
    heart = builtin_schema("heart-disease")
    assert len(ehr_encode.feature_names(heart)) == 13
    assert heart.extract.header is False and heart.missing.markers == ("?",)
    names = ehr_encode.feature_names(VISITS)
    assert names[:2] == ("age", "sex=F") and names[-1] == "smoker:missing"
    assert len(names) == 4 + 2 + 3 + 6  # numeric, sex, smoker, one missing indicator per feature
    assert VISITS.visits.time == "visit_date" and VISITS.patient_id == "patient_id"


def test_every_schema_problem_is_listed_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(textwrap.dedent("""
        [study]
        version = true

        [visits]
        time = "t"
        label = "first-visit"

        [label]
        column = "y"
        values = [0, 1]
        positive = [2]

        [missing]
        policy = "guess"

        [extract]
        header = false

        [[features]]
        name = "bmi"
        kind = "numeric"
        min = 80
        max = 12

        [[features]]
        name = "smoker"
        kind = "categorical"
        values = ["never", "never"]
        unit = "packs"

        [[features]]
        name = "bmi"
        kind = "text"

        [[features]]
        name = "y"
        kind = "date"
        earliest = "yesterday"

        [extras]
        x = 1
        """), encoding="utf-8")
    with pytest.raises(SchemaError) as info:
        load_schema(bad)
    expected = ["unknown table 'extras'", "[study] name is missing", "[study] version must be",
                "[visits] label must be one of", "[visits] needs [patient] id", "[label] positive must be among",
                "[missing] policy must be one of", "header = false needs columns", "feature 'bmi' unit is missing",
                "feature 'bmi': min must be below max", "feature 'smoker' values lists a value twice",
                "key 'unit' does not apply to a categorical feature", "kind must be one of",
                "feature 'y' earliest must be a date", "column 'y' is named twice"]
    for text in expected:
        assert any(text in p for p in info.value.problems), (text, info.value.problems)
    assert str(bad) in str(info.value)


def test_hash_is_stable_across_formats_and_formatting_and_changes_with_meaning(tmp_path):
    base = parse_schema(tomllib.loads(SMALL))
    # A golden value: the canonical form must not drift between versions or processes.
    assert base.sha256 == "b23d950fdfea3ba2ae7b307e7626474b7f68c26ed2c0c8fa672adc01f23e7a77"
    reformatted = SMALL.replace("min = 18", "min = 18.0  # adults only").replace("version = 2", 'version = "2"')
    reordered = reformatted.replace('name = "toy"\nversion = "2"', 'version = "2"\nname = "toy"')
    assert parse_schema(tomllib.loads(reordered)).sha256 == base.sha256
    import yaml
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(tomllib.loads(SMALL), sort_keys=True), encoding="utf-8")
    assert load_schema(tmp_path / "toy.yaml").sha256 == base.sha256
    changed = [SMALL.replace("max = 110", "max = 100"),
               SMALL.replace('values = ["never", "current"]', 'values = ["current", "never"]'),
               SMALL.replace('positive = ["yes"]', 'positive = ["no"]'),
               SMALL + '\n[missing]\npolicy = "impute-mean"\n']
    hashes = {parse_schema(tomllib.loads(text)).sha256 for text in changed}
    assert len(hashes) == len(changed) and base.sha256 not in hashes


# ---- the real heart-disease extract through the schema ----

@pytest.mark.parametrize("centre", heart_disease.CENTRES)
def test_heart_disease_schema_reproduces_the_flamby_loader_exactly(centre):
    path = heart_disease.centre_file(helpers.data_dir(), centre)
    extract = ehr_extract.load_extract(path, builtin_schema("heart-disease"))
    reference = heart_disease.load_centre(path)
    rows = heart_disease.read_rows(path)
    kept = ~np.isnan(rows[:, [i for i, c in enumerate(heart_disease.COLUMNS) if c not in heart_disease.DROPPED]]
                     ).any(axis=1)
    x_ref, y_ref = heart_disease.encode(rows[kept])
    # same rows, same 13 columns in the same order, before any scaling
    np.testing.assert_array_equal(ehr_encode.raw_matrix(extract), x_ref)
    np.testing.assert_array_equal(extract.labels, y_ref)
    assert extract.report.rows_read == reference.rows_read
    assert extract.report.rows_excluded == reference.rows_incomplete
    np.testing.assert_array_equal(extract.rows, np.flatnonzero(kept) + 1)
    # and FLamby's split + train z-score, with statistics passed in (here: the site's own)
    train, test = heart_disease.split_indices(extract.labels)
    x, y = ehr_encode.tabular(extract, ehr_encode.local_stats(extract, train))
    np.testing.assert_array_equal(x[train], reference.x_train)
    np.testing.assert_array_equal(x[test], reference.x_test)
    np.testing.assert_array_equal(y[train], reference.y_train)
    np.testing.assert_array_equal(y[test], reference.y_test)


def test_a_headerless_file_read_as_headed_names_no_value(tmp_path):
    schema = builtin_schema("heart-disease")
    path = heart_disease.centre_file(helpers.data_dir(), "cleveland")
    report = ehr_extract.read_extract(path, schema, fmt=ehr_extract.ExtractFormat(header=True)).report
    assert report.rows_kept == 0 and len(report.fatal) >= 14
    assert any("looks like data" in h for h in report.hints)
    first_line = path.read_text(encoding="ascii").splitlines()[0].split(",")
    assert not _leaked(str(report), {c for c in first_line if not c.isdigit()})


# ---- every kind of violation: one complete report, no crash, no value ----

def _leaked(text: str, values: set[str]) -> set[str]:
    """The values that occur in ``text`` as a whole token (not as part of a longer word or number)."""
    return {v for v in values if re.search(rf"(?<![\w.:-]){re.escape(v)}(?![\w.:-])", text)}


def _cell_values(path: Path, schema) -> set[str]:
    """Every cell of the file that is not a schema word or a bare integer (which row numbers and counts
    share): decimals, dates, ids, free text — none may appear in a report."""
    schema_words = set(schema.columns) | {"notes"}
    for f in schema.features:
        schema_words |= {str(v) for v in f.values}
    with path.open(newline="", encoding="utf-8") as fh:
        cells = {c.strip() for row in list(csv.reader(fh))[1:] for c in row}
    return {c for c in cells if c and c not in schema_words and not c.isdigit()}


def test_violation_extract_gives_one_complete_report_without_any_value(tmp_path):
    path = write_violation_extract(tmp_path / "violations.csv", seed=3)
    extract = ehr_extract.read_extract(path, VISITS)  # never raises for content
    report = extract.report
    assert any("header column 9 is not in the schema" in f for f in report.fatal)
    assert any("column 'sbp' is missing" in f for f in report.fatal)
    reasons = " | ".join(reason for _, reason in report.problems)
    for kind in ROW_VIOLATIONS:
        assert kind in reasons, kind
    assert report.rows_kept == 0 and len(extract) == 0 and not report.ok
    with pytest.raises(ExtractRejected) as info:
        ehr_extract.load_extract(path, VISITS)
    assert info.value.report.problems == report.problems

    values = _cell_values(path, VISITS)
    assert {"high", "sometimes", "95.3", "2021-13-45", "called back", "stray"} <= values
    assert any(v.startswith("MET-") for v in values)
    for text in (str(report), str(info.value), str(report.counts())):
        assert not _leaked(text, values)
    counts = report.counts()
    assert "row" not in str(counts["problems"]) and "violations.csv" not in str(counts)


def test_row_violations_are_excluded_counted_and_the_rest_is_used(tmp_path):
    path = write_violation_extract(tmp_path / "violations.csv", seed=3, header_problems=False)
    extract = ehr_extract.load_extract(path, VISITS)
    report = extract.report
    assert report.ok and not report.fatal
    bad_rows = {row for rows in report.examples.values() for row in rows}
    assert report.rows_excluded == len(bad_rows) and report.rows_kept == len(extract)
    assert not bad_rows & set(extract.rows.tolist())
    assert "duplicate visit (same patient, same time)" in {r for _, r in report.problems}
    seqs, y = ehr_encode.histories(extract, ehr_encode.local_stats(extract))
    assert len(seqs) == len(set(extract.patient_ids)) and set(np.unique(y)) <= {0.0, 1.0}


def test_duplicate_patient_ids_in_a_one_row_per_patient_table(tmp_path):
    schema = parse_schema(tomllib.loads(SMALL))
    path = _write(tmp_path / "toy.csv", [["pid", "age", "smoker", "y"], ["a1", "40", "never", "no"],
                                         ["a2", "50", "current", "yes"], ["a1", "41", "never", "no"],
                                         ["a3", "", "never", "no"]])
    extract = ehr_extract.load_extract(path, schema)
    assert extract.report.problems == {("pid", "duplicate patient id"): 2,
                                       ("age", "missing value (policy drop-row)"): 1}
    assert extract.report.examples[("pid", "duplicate patient id")] == [2, 4]
    assert extract.patient_ids == ("a2",) and extract.labels.tolist() == [1.0]


def test_empty_and_header_only_files_and_parquet_are_refused_with_the_reason(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    _write(tmp_path / "header.csv", [list(VISITS.columns)])
    (tmp_path / "site.parquet").write_bytes(b"PAR1")
    (tmp_path / "latin1.csv").write_bytes("patient_id,visit_date\nM\xfcller,2020-01-01\n".encode("latin-1"))
    for name, reason in (("empty.csv", "empty file"), ("header.csv", "no data rows"),
                         ("site.parquet", "Parquet extracts are not supported"), ("latin1.csv", "not UTF-8")):
        with pytest.raises(ExtractRejected) as info:
            ehr_extract.load_extract(tmp_path / name, VISITS)
        assert reason in str(info.value), name
        assert "Müller" not in str(info.value)


# ---- encoding with supplied statistics ----

def test_sites_encode_identically_with_shared_statistics(tmp_path):
    paths = synthesize(tmp_path, sites=2, seed=5, patients=40)
    a, b = (ehr_extract.load_extract(p, VISITS) for p in paths.values())
    shared = ehr_encode.local_stats(a)  # stands in for federated statistics
    names = ehr_encode.feature_names(VISITS)
    age, smoker = names.index("age"), names.index("smoker=current")
    xb = ehr_encode.encode(b, shared)
    assert xb.shape == (len(b), len(names))
    expected_age = (b.values["age"] - shared.numeric["age"].mean) / (shared.numeric["age"].std + 1e-9)
    np.testing.assert_allclose(xb[:, age], expected_age.astype(np.float32), rtol=1e-6)
    own = ehr_encode.encode(b, ehr_encode.local_stats(b))  # b's own statistics would encode differently
    assert not np.allclose(own[:, age], xb[:, age])
    observed = ~np.isnan(b.values["smoker"])
    np.testing.assert_array_equal(xb[observed, smoker], (b.values["smoker"][observed] == 2).astype(np.float32))
    # missing values: mean-imputed (0 after z-scoring) with the indicator set
    x = ehr_encode.encode(a, shared)
    missing_bmi = np.isnan(a.values["bmi"])
    assert missing_bmi.any()
    assert np.all(x[missing_bmi, names.index("bmi")] == 0) and np.all(x[missing_bmi, names.index("bmi:missing")] == 1)
    assert np.all(x[~missing_bmi, names.index("bmi:missing")] == 0)
    # statistics for another schema, or incomplete ones, are refused by name
    with pytest.raises(ValueError, match="another schema"):
        ehr_encode.encode(a, FeatureStats("0" * 64, shared.numeric, shared.categories))
    partial = {k: v for k, v in shared.numeric.items() if k != "hba1c"}
    with pytest.raises(ValueError, match="feature 'hba1c' has no mean/std"):
        ehr_encode.encode(a, FeatureStats(VISITS.sha256, partial, shared.categories))
    # a feature with std 0 in the statistics is only centred, never divided by ~0
    flat = FeatureStats(VISITS.sha256, {**shared.numeric, "age": NumericStats(60.0, 0.0)}, shared.categories)
    np.testing.assert_allclose(ehr_encode.encode(a, flat)[:, age], (a.values["age"] - 60.0).astype(np.float32))


def test_histories_are_sorted_by_visit_time_truncated_and_labelled_by_rule(tmp_path):
    raw = tomllib.loads(SMALL.replace('[label]', '[visits]\ntime = "t"\nlabel = "last-visit"\nmax_visits = 2\n\n[label]'))
    schema = parse_schema(raw)
    path = _write(tmp_path / "visits.csv", [
        ["pid", "t", "age", "smoker", "y"],
        ["p1", "2020-03-01", "42", "never", "yes"], ["p2", "2021-01-01T10:00", "60", "current", "no"],
        ["p1", "2020-01-01", "40", "never", "no"], ["p1", "2020-02-01", "41", "current", "no"],
    ])
    extract = ehr_extract.load_extract(path, schema)
    stats = FeatureStats(schema.sha256, {"age": NumericStats(0.0, 1.0)}, {"smoker": (1.0, 1.0)})
    seqs, y = ehr_encode.histories(extract, stats)
    assert [s[:, 0].tolist() for s in seqs] == [[41.0, 42.0], [60.0]]  # time order, 2 most recent kept
    assert y.tolist() == [1.0, 0.0]  # last visit's label
    # rule "constant": p1's visits disagree, so all of p1's visits are excluded and counted
    constant = parse_schema(tomllib.loads(SMALL.replace('[label]', '[visits]\ntime = "t"\n\n[label]')))
    report = ehr_extract.read_extract(path, constant).report
    assert report.problems == {("y", "label differs between visits of one patient"): 3}


# ---- the generator and its command ----

def test_synthetic_sites_are_deterministic_and_differ_in_population(tmp_path):
    runner = CliRunner()
    from deploy.cli.main import app
    for out in ("a", "b"):
        result = runner.invoke(app, ["data", "synth-ehr", "--out", str(tmp_path / out), "--seed", "11",
                                     "--patients", "120", "--violations"])
        assert result.exit_code == 0, result.output
    names = [p.name for p in profiles(3)]
    for name in names:
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    assert VISITS.sha256 in result.output.replace("\n", "")
    other = synthesize(tmp_path / "c", sites=3, seed=12, patients=120)
    assert other["metro"].read_bytes() != (tmp_path / "a" / "metro.csv").read_bytes()
    sites = {n: ehr_extract.load_extract(tmp_path / "a" / f"{n}.csv", VISITS) for n in names}
    for extract in sites.values():
        assert extract.report.rows_excluded == 0
    age = {n: np.nanmean(e.values["age"]) for n, e in sites.items()}
    assert age["rural"] > age["coastal"] > age["metro"]  # age mix
    prevalence = {n: np.mean(ehr_encode.histories(e, ehr_encode.local_stats(e))[1]) for n, e in sites.items()}
    assert prevalence["rural"] > prevalence["metro"]
    result = runner.invoke(app, ["data", "validate-extract", str(tmp_path / "a" / "violations.csv")])
    assert result.exit_code == 1 and "column 'sbp' is missing" in result.output
    # the same report from the site's own config: the dataset is named after its study schema
    from client.site import write_site_config
    for extract, code in (("violations.csv", 1), ("metro.csv", 0)):
        site_toml = write_site_config(tmp_path / extract / "site.toml", "metro", tmp_path / "a" / extract,
                                      dataset="diabetes-visits", epsilon_budget=4.0)
        result = runner.invoke(app, ["site", "validate", "--config", str(site_toml), "--dataset", "diabetes-visits"])
        assert result.exit_code == code, result.output
    assert "column 'sbp' is missing" not in result.output and "usable" in result.output


def test_a_headed_file_read_as_headerless_is_refused_with_a_hint(tmp_path):
    schema = parse_schema(tomllib.loads(SMALL))
    path = _write(tmp_path / "toy.csv", [["pid", "age", "smoker", "y"], ["a1", "40", "never", "no"]])
    headerless = ehr_extract.ExtractFormat(header=False, columns=("pid", "age", "smoker"))
    report = ehr_extract.read_extract(path, schema, fmt=headerless).report
    assert "the extract's column list lacks 'y'" in report.fatal
    assert any("row 1 looks like a header" in h for h in report.hints)
    assert report.problems == {(ehr_extract.ROW, "wrong number of fields (expected 3)"): 2}
