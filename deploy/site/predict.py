"""``carefl site predict``: use a consortium's global model on new data, at the site, on its own device.

    carefl site predict --config site.toml --model RUN/final_model.pt --input DICOM_FOLDER --out DIR
    carefl site predict --config site.toml --model RUN/final_model.pt [--input EXTRACT] --out DIR

What it does follows the model's task (shared_models/registry.py → shared_models/tasks.py):

- segmentation (``seg``): ``--input`` is one DICOM series folder, or a folder of series folders (one series each).
  Every series is read as training reads it (``read_image``), resampled and cropped/padded to the run's grid
  exactly as ``preprocess`` does (its grid's affine kept), predicted whole-volume by the U-Net, and the label
  map is mapped back onto the source series' own grid (nearest neighbour: for each source voxel, the label of
  the grid voxel at the same patient position; outside the model's field of view: background). The result is
  one DICOM SEG per series (highdicom, BINARY, one frame per source slice and segment) that references the
  source images and their FrameOfReferenceUID, with the model's label names as segments, so a viewer loads it
  over the series: ``DIR/<series folder>.seg.dcm``.
- EHR (``ehr``: heart disease; ``ehr-seq``: visit histories): ``--input`` is an extract in the site's own format
  (default: the site's dataset file of site.toml), read by the training loader. ``ehr`` rows are scaled with the
  site's training statistics, as in a run; ``ehr-seq`` visits with the run's ``feature_stats.json`` (beside the
  model). Output: ``DIR/risk-scores.csv``: ``row`` (the line of the file) or ``patient_id``, and ``score``.

A model card (``model-card.json`` and ``model-card.md``) is written beside the outputs, and its essentials go
into every SEG (SeriesDescription, ContentDescription, the AlgorithmIdentificationSequence with name
``carefl <model>`` and the model's sha256 prefix as version). Nothing leaves the site and nothing is charged to
the privacy ledger (nothing is released); one ``predict`` record in the site's signed audit log says what was
done by counts and hashes only, never a value, a path or a patient id.

(Over 400 lines on purpose: reading an input the way training reads it, predicting, and writing the result
back in the clinic's own format is one job per task, and the model card is shared by all of them.)
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client import training
from client.errors import SiteError
from client.site import SiteConfig, load_site_config
from deploy.site.report import DEFAULT_SEG_SHAPE, load_global_model, run_feature_stats
from shared_models.registry import get_spec
from shared_models.tasks import BINARY, SEGMENTATION, get_task

CARD_JSON = "model-card.json"
CARD_MD = "model-card.md"
SCORES_FILE = "risk-scores.csv"
SUMMARY_FILE = "summary.json"  # server/run_dir.py: SUMMARY_FILE
AUDIT_KEY = "audit-signing.key"  # the site kit's key of its audit log (deploy/coordinator/provision.py)
HASH_PREFIX = 16  # characters of the model's sha256 in the SEG's algorithm version


@dataclass
class Prediction:
    task: str
    model: str
    outputs: list[Path] = field(default_factory=list)
    card: Path | None = None
    inputs: int = 0      # series or rows/patients scored
    device: str = "cpu"
    audited: bool = False


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# -- the model card ------------------------------------------------------------------------------

def _summary_beside(model_path: Path) -> dict:
    try:
        summary = json.loads((Path(model_path).parent / SUMMARY_FILE).read_text(encoding="utf-8"))
        return summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        return {}


def _metrics(summary: dict) -> dict:
    """The federation's validation metrics of summary.json (pooled and mean-centre), each with its noise std."""
    out = {}
    for key, value in sorted(summary.items()):
        if key.startswith(("pooled_", "mean_")) and not key.endswith("_std") and isinstance(value, (int, float)):
            std = summary.get(f"{key}_std")
            out[key] = {"value": value, **({"noise_std": std} if isinstance(std, (int, float)) else {})}
    return out


def model_card(model_path: Path, model_name: str, task: str, sha256: str, labels: dict[int, str] | None) -> dict:
    summary = _summary_beside(model_path)
    per_site = summary.get("per_site") if isinstance(summary.get("per_site"), dict) else {}
    privacy = {site: {k: v.get(k) for k in ("epsilon", "delta") if k in v}
               for site, v in per_site.items() if isinstance(v, dict)}
    dp = summary.get("dp") if isinstance(summary.get("dp"), dict) else {}
    card = {
        "model": model_name, "task": task, "model_file": Path(model_path).name, "model_sha256": sha256,
        "run_id": summary.get("run_id"), "dataset": summary.get("dataset"), "strategy": summary.get("strategy"),
        "rounds": summary.get("rounds"), "rounds_completed": summary.get("rounds_completed"),
        "sites": summary.get("sites"), "privacy": privacy,
        "dp": {k: dp.get(k) for k in ("enabled", "unit", "noise_multiplier", "clip_norm") if k in dp},
        "validation_metrics": _metrics(summary), "init_model": summary.get("init_model"),
        "labels": {str(k): v for k, v in (labels or {}).items()} or None,
        "summary_found": bool(summary),
        "note": "predictions of a federated model, made at this site; they stay at this site",
    }
    return card


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def card_markdown(card: dict) -> str:
    lines = [f"# Model card: {card['model']} (task {card['task']})", "",
             f"- run: {_fmt(card['run_id'])}, strategy {_fmt(card['strategy'])}, rounds completed "
             f"{_fmt(card['rounds_completed'])} of {_fmt(card['rounds'])}",
             f"- sites: {', '.join(card['sites'] or []) or '—'}",
             f"- model file: {card['model_file']}, sha256 {card['model_sha256']}",
             f"- initial public model: {_fmt(json.dumps(card['init_model']) if card['init_model'] else None)}"]
    if card["dp"]:
        lines.append(f"- differential privacy: {', '.join(f'{k} {_fmt(v)}' for k, v in card['dp'].items())}")
    if card["privacy"]:
        lines += ["", "| site | ε | δ |", "|---|---|---|"]
        lines += [f"| {s} | {_fmt(p.get('epsilon'))} | {_fmt(p.get('delta'))} |" for s, p in card["privacy"].items()]
    if card["validation_metrics"]:
        lines += ["", "| validation metric | value | noise std |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(m['value'])} | {_fmt(m.get('noise_std'))} |"
                  for k, m in card["validation_metrics"].items()]
    if card["labels"]:
        lines += ["", "labels: " + ", ".join(f"{k} = {v}" for k, v in card["labels"].items())]
    if not card["summary_found"]:
        lines += ["", "No summary.json was found beside the model: run, privacy and metrics are unknown."]
    lines += ["", card["note"] + "."]
    return "\n".join(lines) + "\n"


def card_line(card: dict) -> str:
    """The card in a few words, for a DICOM LO attribute (64 characters): run, rounds, the largest ε, sha256."""
    eps = [p["epsilon"] for p in card["privacy"].values() if isinstance(p.get("epsilon"), (int, float))]
    return (f"carefl run {_fmt(card['run_id'])} {_fmt(card['rounds_completed'])}r "
            f"eps<={_fmt(max(eps)) if eps else '?'} sha256 {card['model_sha256'][:8]}")[:64]


def _write_card(out: Path, card: dict) -> Path:
    target = out / CARD_JSON
    target.write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    (out / CARD_MD).write_text(card_markdown(card), encoding="utf-8")
    return target


# -- the entry point -----------------------------------------------------------------------------

def predict(config: Path, model_path: Path, input_path: Path | None, out: Path, dataset: str | None = None,
            kit: Path | None = None, progress=None) -> Prediction:
    """Predict with ``model_path`` on ``input_path`` at the site of ``config``; outputs and card in ``out``."""
    site = load_site_config(config)
    model_path = Path(model_path)
    model_name, model = load_global_model(model_path)
    study = get_task(get_spec(model_name).task)
    name = dataset or study.dataset_name() or str(_summary_beside(model_path).get("dataset") or "")
    if not name:  # ehr-seq: the dataset is the study schema's, named in the run's summary or by --dataset
        raise SiteError(f"model '{model_name}' (task {study.name}): give --dataset, the site's dataset it scores")
    if dataset is not None:
        ds = site.dataset(dataset)
        if (ds.manifest is not None) != (study.metric_family == SEGMENTATION):
            raise SiteError(f"model '{model_name}' is for task '{study.name}', but dataset '{dataset}' of site "
                            f"'{site.site_id}' is {'an imaging' if ds.manifest is not None else 'a tabular'} dataset")
    sha = sha256_file(model_path)
    device = training.pick_device(site.device)
    out = Path(out)
    if study.metric_family == SEGMENTATION:
        if input_path is None:
            raise SiteError(f"model '{model_name}' segments images: give --input, a DICOM series folder or a folder "
                            f"of series folders")
        labels = _label_names(name, model)
        card = model_card(model_path, model_name, study.name, sha, labels)
        out.mkdir(parents=True, exist_ok=True)
        result = _predict_seg(site, name, model, model_path, Path(input_path), out, card, labels, device, progress)
    elif study.metric_family == BINARY and study.name in ("ehr", "ehr-seq"):
        source = Path(input_path) if input_path is not None else _site_file(site, name)
        if source.is_dir():
            raise SiteError(f"input {source} is a folder; model '{model_name}' (task {study.name}) scores an "
                            f"extract file")
        card = model_card(model_path, model_name, study.name, sha, None)
        out.mkdir(parents=True, exist_ok=True)
        result = (_predict_ehr if study.name == "ehr" else _predict_ehr_seq)(
            site, name, study, model, model_path, source, out, device)
    else:
        raise SiteError(f"carefl site predict serves segmentation and EHR models; model '{model_name}' is for "
                        f"task '{study.name}'")
    result.model = model_name
    result.card = _write_card(out, card)
    result.device = str(device)
    result.audited = _audit(site, Path(config), kit, result, sha, card)
    return result


def _site_file(site: SiteConfig, name: str) -> Path:
    ds = site.dataset(name)
    if ds.path is None:
        raise SiteError(f"dataset '{name}' of site '{site.site_id}' has no path; give --input")
    return ds.path


# -- the audit record ----------------------------------------------------------------------------

def _audit(site: SiteConfig, config: Path, kit: Path | None, result: Prediction, sha: str, card: dict) -> bool:
    """One ``predict`` record in the site's signed audit log: counts and hashes, never a value or a path."""
    from privacy.audit import AuditLog
    from privacy.audit.log import AuditLogError

    if site.audit_log is None:
        return False
    key = (Path(kit) if kit else config.parent) / AUDIT_KEY
    outputs = hashlib.sha256("\n".join(sorted(sha256_file(p) for p in result.outputs)).encode()).hexdigest()
    payload = {"task": result.task, "model": result.model, "model_sha256": sha, "run_id": card.get("run_id"),
               "inputs": result.inputs, "outputs": len(result.outputs), "outputs_sha256": outputs,
               "card_sha256": sha256_file(result.card), "device": result.device.split(":")[0]}
    try:
        AuditLog(site.audit_log, site.site_id, key if key.is_file() else None).append("predict", payload)
    except (AuditLogError, OSError, ValueError) as exc:
        raise SiteError(f"audit log {site.audit_log}: the prediction was made but could not be logged "
                        f"({type(exc).__name__}: {exc})") from None
    return True


# -- segmentation --------------------------------------------------------------------------------

def _label_names(dataset: str, model) -> dict[int, str]:
    """Names of the model's foreground labels: hippocampus' for the demo dataset, else ``label k``."""
    try:
        with torch.no_grad():
            classes = int(model.eval()(torch.zeros(1, 1, 16, 16, 16)).shape[1])
    except (RuntimeError, TypeError, IndexError):
        raise SiteError("the model is not a 3-D segmentation network (one image channel in, classes out)") from None
    if dataset == "hippocampus":
        from deploy.datasets.hippocampus import LABELS
        if classes == len(LABELS):
            return {k: v for k, v in LABELS.items() if k}
    return {k: f"label {k}" for k in range(1, classes)}


def series_folders(root: Path) -> list[Path]:
    """``root`` itself when it holds a DICOM series, else each sub-folder holding one (sorted)."""
    if not root.is_dir():
        raise SiteError(f"input {root}: not a folder (give a DICOM series folder, or a folder of series folders)")
    if _is_series(root):
        return [root]
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and _is_series(p)]
    if not found:
        raise SiteError(f"input {root}: no DICOM series found (neither its files nor its sub-folders are DICOM)")
    return found


def _is_series(folder: Path) -> bool:
    import pydicom

    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
             and p.name.upper() != "DICOMDIR"]
    for path in files[:3]:
        try:
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            return True
        except Exception:  # noqa: BLE001 - not DICOM: try the next file
            continue
    return False


def model_grid(volume, spacing: tuple[float, float, float], shape: tuple[int, int, int]):
    """The volume on the model's grid, exactly as ``preprocess`` makes it: ([1, z, y, x] float32, grid affine)."""
    from client.ingest.imaging.preprocess import PreprocessSpec, normalise, on_model_grid

    img = on_model_grid(volume.array, volume.affine, PreprocessSpec(tuple(spacing), tuple(shape)), "bilinear")
    return normalise(img.numpy(), volume.modality), np.asarray(img.affine, dtype=np.float64)


def to_source_grid(labels: np.ndarray, grid_affine: np.ndarray, source_affine: np.ndarray,
                   source_shape: tuple[int, int, int], step=None) -> np.ndarray:
    """A label map on the model's grid → the source grid, nearest neighbour by patient position (background
    where the source voxel lies outside the grid). ``step`` is called after each source slice."""
    to_grid = np.linalg.inv(grid_affine) @ np.asarray(source_affine, dtype=np.float64)  # source index → grid index
    nz, ny, nx = source_shape
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    out = np.zeros(source_shape, dtype=np.uint8)
    bounds = np.array(labels.shape)[:, None, None]
    for z in range(nz):
        idx = (to_grid[:3, 0, None, None] * z + to_grid[:3, 1, None, None] * yy
               + to_grid[:3, 2, None, None] * xx + to_grid[:3, 3, None, None])
        idx = np.rint(idx).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < bounds), axis=0)
        out[z][inside] = labels[idx[0][inside], idx[1][inside], idx[2][inside]]
        if step is not None:
            step()
    return out


def source_datasets(folder: Path, volume) -> list:
    """The series' DICOM datasets in the z order of ``read_image`` (by position along the slice normal)."""
    import pydicom

    from client.ingest.imaging.dicom_series import series_files

    datasets = [pydicom.dcmread(p) for p in series_files(folder)]
    normal = np.asarray(volume.affine, dtype=np.float64)[:3, 0]
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
        return datasets  # an enhanced multi-frame image: frames placed by plane positions
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
    if len(datasets) != volume.shape[0]:
        raise SiteError(f"series {folder.name}: {len(datasets)} files for {volume.shape[0]} slices")
    return datasets


def _predict_seg(site: SiteConfig, dataset: str, model, model_path: Path, root: Path, out: Path, card: dict,
                 labels: dict[int, str], device, progress) -> Prediction:
    from client import segmentation
    from client.ingest.imaging.io import read_image

    run_config = _summary_beside(model_path).get("config") or {}
    shape = segmentation.parse_shape(str(run_config.get("seg-shape", DEFAULT_SEG_SHAPE)))
    spacing = (float(run_config.get("seg-spacing", 1.0)),) * 3
    modalities = site.datasets[dataset].modality if dataset in site.datasets else ()
    folders = series_folders(root)
    result = Prediction(task="seg", model=card["model"], inputs=len(folders))
    model.to(device).eval()
    names, used = [], set()
    for folder in folders:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name)[:60] or "series"
        while stem in used:
            stem += "_"
        used.add(stem)
        names.append(stem)
    for folder, stem in zip(folders, names):
        volume = read_image(folder, modalities=modalities)
        task_id = progress.add_task(f"series {folder.name}", total=volume.shape[0] + 2) if progress else None
        advance = (lambda: progress.advance(task_id)) if progress else None
        x, grid_affine = model_grid(volume, spacing, shape)
        if advance:
            advance()
        try:
            with torch.no_grad():
                grid_labels = model(torch.from_numpy(x)[None].to(device)).argmax(1)[0].cpu().numpy().astype(np.uint8)
        except RuntimeError:
            raise SiteError(f"series {folder.name}: the model does not fit its volume on the "
                            f"{'x'.join(map(str, shape))} grid (a 3-D U-Net is needed)") from None
        if advance:
            advance()
        mask = to_source_grid(grid_labels, grid_affine, volume.affine, volume.shape, advance)
        result.outputs.append(write_seg(folder, volume, mask, labels, card, out / f"{stem}.seg.dcm"))
    return result


def write_seg(folder: Path, volume, mask: np.ndarray, labels: dict[int, str], card: dict, target: Path) -> Path:
    """One DICOM SEG (BINARY, every slice and segment, empty ones too) over the source series."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from client.ingest.imaging.volume import ImagingError

    sources = source_datasets(folder, volume)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"carefl {card['model']}"[:64], family=codes.cid7162.ArtificialIntelligence,
        version=card["model_sha256"][:HASH_PREFIX], source="carefl federated model")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=str(labels[k])[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(f"L{k}", "99CAREFL", str(labels[k])[:64]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for k in sorted(labels)]
    pixels = mask.copy()
    pixels[pixels > max(labels, default=0)] = 0
    plane_positions = None
    if len(sources) == 1 and volume.shape[0] > 1:  # multi-frame source: say where each frame lies
        affine = np.asarray(volume.affine, dtype=np.float64)
        plane_positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                    (affine @ np.array([z, 0.0, 0.0, 1.0]))[:3].tolist())
                           for z in range(volume.shape[0])]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=900,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="carefl",
            manufacturer_model_name=f"carefl {card['model']}"[:64], software_versions=card["model_sha256"][:HASH_PREFIX],
            device_serial_number="none", content_description=card_line(card)[:64],
            content_label="CAREFL", series_description=f"carefl {card['model']} run {_fmt(card['run_id'])}"[:64],
            plane_positions=plane_positions, omit_empty_frames=False)
    except Exception as exc:  # noqa: BLE001 - highdicom's reasons name attributes, never values
        raise ImagingError(folder, f"could not build the DICOM SEG ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    seg.save_as(target)
    return target


# -- EHR -----------------------------------------------------------------------------------------

def _scores(model, x: np.ndarray, device, features: int) -> np.ndarray:
    try:
        return training.predict(model, x.astype(np.float32), device)
    except RuntimeError:
        raise SiteError(f"the model does not fit the extract ({features} features)") from None


def _predict_ehr(site: SiteConfig, dataset: str, study, model, model_path: Path, source: Path, out: Path,
                 device) -> Prediction:
    """Heart disease: every kept row of ``source``, scaled with the site's training statistics (as in a run)."""
    from client.ingest import ehr_encode, heart_disease

    extract = heart_disease.read_centre(source)
    x = ehr_encode.raw_matrix(extract)
    reference = _site_file(site, dataset)
    _, _, _, _, x_site, _, train_idx, _ = heart_disease._parsed(reference)  # the loader's own parse and split
    if site.num_shards > 1:
        usable = max(1, min(site.num_shards, len(train_idx) // heart_disease.MIN_SHARD_ROWS))
        train_idx = np.array_split(np.sort(train_idx), usable)[site.shard % usable]
    mean, std = x_site[train_idx].mean(axis=0), x_site[train_idx].std(axis=0)
    scores = _scores(model, (x - mean) / (std + heart_disease.Z_EPS), device, x.shape[1])
    target = out / SCORES_FILE
    _write_csv(target, "row", [int(r) for r in extract.rows], scores)
    return Prediction(task=study.name, model=study.name, outputs=[target], inputs=len(scores))


def _predict_ehr_seq(site: SiteConfig, dataset: str, study, model, model_path: Path, source: Path, out: Path,
                     device) -> Prediction:
    """Visit histories: one score per patient of ``source``, encoded with the run's pooled feature statistics."""
    from torch.utils.data import DataLoader

    from client.ingest import ehr_encode
    from client.ingest.ehr_extract import load_extract
    from shared_models.schema import SchemaError, builtin_schema
    from shared_models.sequence import HistoryDataset

    stats = run_feature_stats(model_path, study.name)
    try:
        schema = builtin_schema(dataset)
        stats.check(schema)
    except (SchemaError, ValueError) as exc:
        raise SiteError(f"{study.name}: {exc}") from None
    extract = load_extract(source, schema)
    groups = ehr_encode.patient_rows(extract)
    seqs, labels = ehr_encode.histories(extract, stats, groups)
    if not seqs:
        raise SiteError(f"extract {source}: no patient to score")
    data = HistoryDataset(seqs, labels, max_len=schema.visits.max_visits or None)
    model.to(device).eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(x.to(device), n.to(device)).cpu() for x, n, _ in DataLoader(data, batch_size=256)])
    except (RuntimeError, TypeError):
        raise SiteError(f"the model does not fit the extract's visit histories ({data.x.shape[-1]} features)") from None
    ids = extract.patient_ids or ()
    patients = [ids[g[-1]] if ids else int(extract.rows[g[-1]]) for g in groups]
    target = out / SCORES_FILE
    _write_csv(target, "patient_id" if ids else "row", patients, torch.sigmoid(logits).numpy().astype(np.float64))
    return Prediction(task=study.name, model=study.name, outputs=[target], inputs=len(patients))


def _write_csv(target: Path, id_column: str, ids: list, scores: np.ndarray) -> None:
    with open(target, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([id_column, "score"])
        for rid, score in zip(ids, scores):
            writer.writerow([rid, f"{float(score):.6f}"])
