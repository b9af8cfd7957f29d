"""One verdict for an EHR file with damaged rows (issue 20, §1).

`carefl site validate`, the training loader (``client.tasks.load_task``, as a ClientApp builds a site's task)
and `carefl site start`'s pre-flight read an extract with ONE function (``ehr_extract.read_extract``) and
apply ONE rule for refusing it as a whole (``ehr_extract.file_rule``), so they give the same verdict and name
the same lines. Both EHR kinds: the UCI heart-disease files (task ``ehr``: no damaged row allowed) and a
schema-driven visit extract (task ``ehr-seq``: damaged rows excluded unless more than half the rows are).

Real files only: real UCI lines from $CAREFL_DATA (skipped when absent) and the synthetic diabetes-visits
generator, damaged and written to ``tmp_path``; the CLI runs in a subprocess.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from pathlib import Path

import pytest
from flwr.app import DEFAULT_TTL, Context, MessageType, Metadata, RecordDict
from flwr.app.message import make_message

from client import client_app
from client.errors import DataFormatError
from client.ingest import ehr_extract, heart_disease
from client.ingest.ehr_extract import ExtractRejected
from client.site import load_site_config, write_site_config
from client.tasks import load_task
from deploy.datasets.synthetic_ehr import synthesize
from shared_models.schema import builtin_schema
from tests import helpers

SECRET = "XYZZY123"  # a damaged cell: no message may ever show it
SEQ_TASK = {"task": "ehr-seq", "schema": "diabetes-visits"}


# ---- helpers ----

def _expand(listed: str) -> set[int]:
    """``2, 5-7`` → {2, 5, 6, 7}."""
    rows: set[int] = set()
    for part in listed.split(","):
        a, _, b = part.strip().partition("-")
        rows |= set(range(int(a), int(b or a) + 1))
    return rows


def _verdict(text: str) -> str:
    """The verdict line (``rows: … read, … — usable|refused: …``) of an output or an error message."""
    found = re.findall(r"^\s*(?:\S+: )?(rows: \d+ read, .*)$", text, flags=re.M)
    assert len(found) == 1, text
    return found[0]


def _damaged(verdict: str) -> set[int]:
    """The rows a verdict line names as damaged."""
    if ", all damaged" in verdict:
        return _expand(re.search(r"excluded \(lines ([\d, -]+)\)", verdict).group(1))
    match = re.search(r"\d+ damaged \(lines ([\d, -]+)\)", verdict)
    return _expand(match.group(1)) if match else set()


def _named(text: str, file_name: str) -> set[int]:
    """The lines a refusal names one by one: ``<file> line N…``."""
    return {int(n) for n in re.findall(rf"{re.escape(file_name)} line (\d+)\b", text)}


def _query():
    """A query instruction from the coordinator, as the SuperNode hands it to the ClientApp (run 7)."""
    metadata = Metadata(run_id=7, message_id="query-1", src_node_id=1, dst_node_id=42, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=DEFAULT_TTL, message_type=MessageType.QUERY)
    return make_message(metadata=metadata, content=RecordDict({}))


def _cli(args: list[str], tmp_path: Path):
    return helpers.run_carefl(args, tmp_path, timeout=180, env={"COLUMNS": "4000"})


def _validate(toml: Path, dataset: str, tmp_path: Path):
    return _cli(["site", "validate", "--config", str(toml), "--dataset", dataset], tmp_path)


def _start(toml: Path, tmp_path: Path):
    """`carefl site start` with no kit: its pre-flight lists every problem (kit, coordinator, data) and stops
    before any process is started."""
    return _cli(["site", "start", "--kit", str(tmp_path / "no-kit"), "--config", str(toml)], tmp_path)


# ---- task ehr: the UCI heart-disease files ----

@pytest.fixture
def cleveland_lines(data_dir) -> list[str]:
    lines = heart_disease.centre_file(data_dir, "cleveland").read_text(encoding="ascii").splitlines()
    return [line for line in lines if line.strip()][:40]


def _damage_heart(lines: list[str], bad: dict[int, tuple[int | None, str]]) -> list[str]:
    """Line number → (field index, new cell) or (None, extra cell appended)."""
    out = list(lines)
    for number, (index, cell) in bad.items():
        fields = out[number - 1].split(",")
        if index is None:
            fields.append(cell)
        else:
            fields[index] = cell
        out[number - 1] = ",".join(fields)
    return out


def _heart_site(tmp_path: Path, lines: list[str]) -> tuple[Path, Path]:
    data = tmp_path / "data" / "processed.cleveland.data"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(lines) + "\n", encoding="ascii")
    toml = write_site_config(tmp_path / "site" / "site.toml", "cleveland", data, device="cpu",
                             epsilon_budget=10.0, delta=1e-4)
    return data, toml


def test_a_heart_file_with_three_damaged_rows_gets_one_verdict_from_validate_loader_and_start(
        tmp_path, cleveland_lines):
    lines = _damage_heart(cleveland_lines, {5: (None, "1"),       # 15 fields
                                            12: (4, SECRET),      # chol: not a number
                                            27: (2, "7")})        # cp: not an allowed code
    data, toml = _heart_site(tmp_path, lines)
    bad = {5, 12, 27}

    # the validator
    validated = _validate(toml, "heart-disease", tmp_path)
    assert validated.returncode == 1, validated.stdout + validated.stderr
    verdict = _verdict(validated.stdout)
    assert "— refused: 3 of 40 rows damaged" in verdict and "allows none" in verdict
    assert _damaged(verdict) == bad

    # the training loader: the task a ClientApp builds for the site
    with pytest.raises(ExtractRejected) as info:
        load_task(load_site_config(toml), {"task": "ehr"})
    assert isinstance(info.value, DataFormatError)  # a SiteError: only its public sentence leaves the site
    message = str(info.value)
    assert _verdict(message) == verdict  # same verdict, same lines
    assert _named(message, data.name) == bad  # and each named with its problem
    assert f"{data.name} line 5: 15 columns, expected 14" in message
    assert f"{data.name} line 12, column 'chol': not a number" in message
    assert f"{data.name} line 27, column 'cp': not one of the allowed codes (1, 2, 3, 4)" in message

    # `carefl site start`'s pre-flight
    started = _start(toml, tmp_path)
    assert started.returncode == 2, started.stdout + started.stderr
    assert "cannot start the site agent" in started.stdout
    assert _verdict(started.stdout) == verdict
    assert _named(started.stdout, data.name) == bad

    for text in (validated.stdout, validated.stderr, message, started.stdout, started.stderr):
        assert SECRET not in text


def test_every_damaged_heart_row_is_named_not_only_the_first_ten(tmp_path, cleveland_lines):
    bad = {n: (7, "inf") for n in range(3, 40, 3)}  # thalach: 13 rows not finite
    data, toml = _heart_site(tmp_path, _damage_heart(cleveland_lines, bad))
    validated = _validate(toml, "heart-disease", tmp_path)
    assert validated.returncode == 1
    verdict = _verdict(validated.stdout)
    assert _damaged(verdict) == set(bad) and "refused" in verdict
    assert f"column 'thalach': not a finite number: 13 row(s): {', '.join(map(str, sorted(bad)))}" in validated.stdout
    with pytest.raises(ExtractRejected) as info:
        load_task(load_site_config(toml), {"task": "ehr"})
    assert _verdict(str(info.value)) == verdict
    assert _named(str(info.value), data.name) == set(bad)


def test_a_clean_heart_file_is_usable_everywhere_and_its_exclusions_are_audited_by_count(
        tmp_path, data_dir, caplog):
    """Rows with a missing value (FLamby drops them) are excluded, not damaged: validate and the loader both
    call the file usable; the audit record counts them by reason, the site's own log names their lines."""
    lines = [line for line in heart_disease.centre_file(data_dir, "hungarian").read_text().splitlines()
             if line.strip()][:60]
    data = tmp_path / "data" / "processed.hungarian.data"
    data.parent.mkdir(parents=True)
    data.write_text("\n".join(lines) + "\n", encoding="ascii")
    toml = write_site_config(tmp_path / "site" / "site.toml", "hungarian", data, device="cpu",
                             epsilon_budget=10.0, delta=1e-4)
    report = ehr_extract.read_extract(data, builtin_schema("heart-disease")).report
    assert report.ok and report.rows_excluded > 0 and not report.damaged_rows

    validated = _validate(toml, "heart-disease", tmp_path)
    verdict = _verdict(validated.stdout)
    assert verdict == report.verdict() and verdict.endswith("none damaged — usable")

    caplog.set_level(logging.INFO, logger="carefl.site")
    task = load_task(load_site_config(toml), {"task": "ehr"})
    assert task.excluded == report.rows_excluded
    assert f"{data.name}: {verdict}" in caplog.text  # count and every line, at the site

    reply = client_app.query(_query(), Context(run_id=7, node_id=42, node_config={"site-config": str(toml)},
                                               state=RecordDict(), run_config={}))
    assert not reply.has_error(), reply.error.reason
    records = [json.loads(line) for line in (toml.parent / "audit.jsonl").read_text().splitlines()]
    [exclusions] = [r["payload"] for r in records if r["event"] == "data-exclusions"]
    assert exclusions == {"run_id": "7", "dataset": "heart-disease", "excluded": report.rows_excluded,
                          "reasons": report.counts()["problems"]}  # counts only, as task ehr-seq's record
    assert "line" not in json.dumps(exclusions)


# ---- task ehr-seq: a schema-driven visit extract ----

def _seq_site(tmp_path: Path, damage) -> tuple[Path, Path, int]:
    """A synthetic diabetes-visits extract with ``damage(line number, row) -> row`` applied; (file, site.toml,
    data rows)."""
    [source] = synthesize(tmp_path / "synthetic", sites=1, seed=4, patients=30).values()
    with source.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    out = [header] + [damage(number, header, row) for number, row in enumerate(rows[1:], start=2)]
    data = tmp_path / "data" / "visits.csv"
    data.parent.mkdir(parents=True)
    with data.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(out)
    toml = write_site_config(tmp_path / "site" / "site.toml", "metro", data, device="cpu",
                             dataset="diabetes-visits", epsilon_budget=10.0, delta=1e-4)
    return data, toml, len(rows) - 1


def _set(header: list[str], row: list[str], column: str, cell: str) -> list[str]:
    row = list(row)
    row[header.index(column)] = cell
    return row


def test_a_visit_extract_with_three_damaged_rows_is_usable_for_all_three_naming_them(tmp_path, caplog):
    def damage(number, header, row):
        if number == 4:
            return _set(header, row, "hba1c", SECRET)       # not a number
        if number == 9:
            return _set(header, row, "smoker", "sometimes")  # not an allowed value
        if number == 15:
            return row + ["stray"]                           # wrong number of fields
        return row

    data, toml, n = _seq_site(tmp_path, damage)
    bad = {4, 9, 15}

    validated = _validate(toml, "diabetes-visits", tmp_path)
    assert validated.returncode == 1  # rows were excluded: listed, exit 1
    verdict = _verdict(validated.stdout)
    assert verdict == f"rows: {n} read, {n - 3} kept, 3 excluded (lines 4, 9, 15), all damaged — usable"

    caplog.set_level(logging.INFO, logger="carefl.site")
    task = load_task(load_site_config(toml), SEQ_TASK)
    report = task.extract.report
    assert report.verdict() == verdict and set(report.damaged_rows) == bad
    assert not set(task.extract.rows.tolist()) & bad  # excluded from training
    assert f"{data.name}: {verdict}" in caplog.text  # logged at the site: count and lines, no value
    assert task.excluded == 3
    assert task.exclusion_reasons() == report.counts()["problems"]  # what the audit record holds: counts

    started = _start(toml, tmp_path)
    assert started.returncode == 2 and "cannot start the site agent" in started.stdout
    assert f"dataset diabetes-visits: {verdict}" in started.stdout  # usable: reported, not a problem
    assert "diabetes-visits" not in started.stdout.split("cannot start the site agent")[1]

    for text in (validated.stdout, caplog.text, started.stdout):
        assert SECRET not in text


def test_a_visit_extract_mostly_damaged_is_refused_by_all_three_naming_every_line(tmp_path):
    def damage(number, header, row):
        return _set(header, row, "bmi", SECRET) if number % 3 else row  # two rows in three: not a number

    data, toml, n = _seq_site(tmp_path, damage)
    bad = {number for number in range(2, n + 2) if number % 3}
    assert len(bad) > n / 2

    validated = _validate(toml, "diabetes-visits", tmp_path)
    assert validated.returncode == 1
    verdict = _verdict(validated.stdout)
    assert f"— refused: {len(bad)} of {n} rows damaged; schema diabetes-visits v1 allows at most 50%" in verdict
    assert _damaged(verdict) == bad

    with pytest.raises(ExtractRejected) as info:
        load_task(load_site_config(toml), SEQ_TASK)
    assert _verdict(str(info.value)) == verdict
    assert _named(str(info.value), data.name) == bad

    started = _start(toml, tmp_path)
    assert started.returncode == 2
    assert _verdict(started.stdout) == verdict and _named(started.stdout, data.name) == bad

    for text in (validated.stdout, str(info.value), started.stdout):
        assert SECRET not in text


# ---- the rule itself ----

def test_one_rule_per_schema_decides_and_policy_exclusions_are_not_damage(tmp_path):
    assert ehr_extract.file_rule(builtin_schema("heart-disease")).max_damaged == 0.0
    assert ehr_extract.file_rule(builtin_schema("diabetes-visits")) == ehr_extract.FileRule()
    # rows with '?' in a kept column are left out by the drop-row policy, never counted as damage
    path = tmp_path / "processed.va.data"
    line = "63,1,4,140,260,0,1,112,1,3,2,?,?,2"
    path.write_text("\n".join([line] * 6 + [line.replace("140", "?")] * 3) + "\n", encoding="ascii")
    report = ehr_extract.read_extract(path, builtin_schema("heart-disease")).report
    assert (report.rows_read, report.rows_kept, report.damaged_rows, report.excluded_rows) == (9, 6, [], [7, 8, 9])
    assert report.ok and report.verdict() == "rows: 9 read, 6 kept, 3 excluded (lines 7-9), none damaged — usable"
    assert report.counts()["rows_damaged"] == 0 and report.counts()["refused"] == []
