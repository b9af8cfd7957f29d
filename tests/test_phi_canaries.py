"""PHI canaries: identifying values the test plants in a site's data (DICOM header values, a case id,
folder and file names, a CSV cell) appear in no reply a site sends, no log line, no run-directory file
(metrics, summary, audit log, report.html) and no site audit log or ledger.

Real studies on real files (the MSD hippocampus cases written as DICOM, the UCI heart-disease files),
with the real ServerApp and ClientApps in one process (deploy/demo/inprocess.py): every reply is
captured as the bytes Flower would send.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pydicom
from flwr.app import Context, RecordDict

from client.client_app import app as client_app
from client.ingest.heart_disease import centre_file
from client.site import write_site_config
from deploy.datasets import hippocampus
from deploy.datasets.dicomize import dicomize_case
from deploy.demo.inprocess import InProcessGrid
from deploy.site.flower_seam import as_transported
from server.server_app import app as server_app
from tests.helpers import data_dir, default_run_config

CANARY = "QZXV"  # every planted value contains it; nothing else in carefl or its data does
PLANTED = {"PatientName": "QZXV^Canary", "PatientID": "QZXV-0001", "InstitutionName": "QZXV General",
           "ReferringPhysicianName": "QZXV^Referrer", "StudyDescription": "QZXV brain study",
           "SeriesDescription": "QZXV T1 series", "AccessionNumber": "QZXV42"}


class CapturingGrid(InProcessGrid):
    """The in-process grid, keeping every reply as serialised bytes (what would go on the wire)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wire: list[bytes] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            content = reply.error.reason.encode() if reply.has_error() else _serialised(reply.content)
            self.wire.append(content)
        return replies


def _serialised(record) -> bytes:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    return b"".join(obj.deflate() for obj in get_all_nested_objects(as_transported(record)).values())


def _identified_dicom_site(folder: Path, site_id: str, site_cases) -> Path:
    """A site whose DICOM series carry identifying header values, in folders named after the patient."""
    rows = []
    for k, case in enumerate(site_cases):
        case_id = f"QZXV_{site_id}_{k}"
        series, seg = dicomize_case(case.image, case.label, folder / f"{CANARY}-Doe-John" / site_id, case_id,
                                    {1: "anterior", 2: "posterior"})
        for path in list(series.glob("*.dcm")) + [seg]:
            ds = pydicom.dcmread(path)
            for keyword, value in PLANTED.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
            assert str(pydicom.dcmread(path).PatientID) == PLANTED["PatientID"]  # planted where a reader sees it
        for n, path in enumerate(sorted(series.glob("*.dcm"))):
            path.rename(path.with_name(f"{CANARY}_slice_{n:03d}.dcm"))
        rows.append((case_id, series, seg, "test" if k == len(site_cases) - 1 else "train"))
    manifest = hippocampus.write_manifest(folder / site_id / "hippocampus.csv", rows)
    return write_site_config(folder / site_id / "site.toml", site_id, manifest, dataset="hippocampus", manifest=True,
                             labels=[0, 1, 2], require_deidentified=False, epsilon_budget=50.0, delta=1e-3,
                             max_sample_rate=1.0, min_noise_multiplier=0.3, device="cpu")


def _heart_disease_site(folder: Path, site_id: str, centre: str, poisoned: bool) -> Path:
    """A heart-disease site whose file sits in a folder named after a patient; ``poisoned``: one CSV cell
    holds a patient's name (the site must refuse the file without echoing the cell)."""
    target = folder / f"{CANARY}-Roe-Jane" / site_id / centre_file(data_dir(), centre).name
    target.parent.mkdir(parents=True)
    shutil.copy(centre_file(data_dir(), centre), target)
    if poisoned:
        lines = target.read_text().splitlines()
        cells = lines[5].split(",")
        cells[3] = f"{CANARY} Roe"
        lines[5] = ",".join(cells)
        target.write_text("\n".join(lines) + "\n")
    return write_site_config(folder / site_id / "site.toml", site_id, target, epsilon_budget=10.0, delta=1e-4,
                             device="cpu")


def _study(tmp_path: Path, configs: dict[str, Path], run_config: dict, caplog) -> tuple[CapturingGrid, Path]:
    out = tmp_path / "run"
    cfg = default_run_config(**run_config, **{"out-dir": str(out)})
    nodes = {30 + i: {"site-config": str(p)} for i, p in enumerate(configs.values())}
    grid = CapturingGrid(client_app, nodes, cfg)
    with caplog.at_level(logging.DEBUG):
        server_app(grid, Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    return grid, out


def _assert_no_canary(grid: CapturingGrid, files: list[Path], caplog) -> None:
    assert grid.wire and not [i for i, sent in enumerate(grid.wire) if CANARY.encode() in sent]
    assert CANARY not in caplog.text
    checked = [p for p in files if p.is_file()]
    assert checked and not [p for p in checked if CANARY.encode() in p.read_bytes()]


def test_identifying_dicom_values_and_names_never_leave_a_segmentation_site(tmp_path, cases, caplog):
    split = hippocampus.split_sites(hippocampus.private_cases(cases)[:6], 2)
    configs = {s: _identified_dicom_site(tmp_path / "sites", s, c) for s, c in split.items()}
    grid, out = _study(tmp_path, configs, {
        "task": "seg", "model": "seg-unet3d", "num-server-rounds": 1, "local-epochs": 1, "local-steps": 0,
        "batch-size": 2, "lr": 0.05, "noise-multiplier": 0.5, "target-epsilon": 0.0, "clip-norm": 1.0,
        "seg-shape": "24,32,24", "round-timeout": 5}, caplog)
    assert (out / "summary.json").exists() and (out / "report.html").exists()
    site_files = [f for s in configs for f in (tmp_path / "sites" / s).glob("*") if f.suffix in (".jsonl", ".sqlite")]
    _assert_no_canary(grid, list(out.rglob("*")) + site_files, caplog)


def test_a_name_in_a_csv_cell_or_a_folder_never_leaves_a_heart_disease_site(tmp_path, caplog):
    configs = {"clean": _heart_disease_site(tmp_path / "sites", "clean", "cleveland", poisoned=False),
               "poisoned": _heart_disease_site(tmp_path / "sites", "poisoned", "hungarian", poisoned=True)}
    grid, out = _study(tmp_path, configs, {"num-server-rounds": 1, "local-steps": 5, "min-sites": 1,
                                           "round-timeout": 5, "sites": ""}, caplog)
    assert (out / "summary.json").exists() and (out / "report.html").exists()
    refused = [w for w in grid.wire if b"site error" in w]
    assert refused  # the poisoned site refused its file; the reason says so without the cell
    site_files = [f for s in configs for f in (tmp_path / "sites" / s).glob("*") if f.suffix in (".jsonl", ".sqlite")]
    _assert_no_canary(grid, list(out.rglob("*")) + site_files, caplog)
