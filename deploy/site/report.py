"""A site's own report on a global model, from its own test split. It is never sent anywhere.

    carefl site report --config site.toml --model final_model.pt --out DIR

What it draws follows the task's metric family (shared_models/tasks.py), not its name:

- binary tasks (``ehr``: heart disease, ``ehr-seq``: visit histories): ROC curve and confusion matrix
  (threshold 0.5) on the site's test split, with the metrics the site would report. The test split is
  read by the task's dataset kind (``BINARY_TEST_SPLITS``), the same split the site evaluates in a run.
- segmentation (``seg``: hippocampus): for a few test cases, the axial slice with the most ground truth,
  with the true and the predicted masks overlaid on the image, and each case's Dice.

These are patient-level results (per-patient scores, images of the site's own cases), so they stay
on the site's disk: ``DIR/site-report.html`` (self-contained, plots inline) and the same plots as
PNG files beside it. Nothing is charged to the privacy ledger because nothing is released; what a
site sends the coordinator stays the aggregate metrics of ``client_app.evaluate``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from client import segmentation, training
from client.errors import SiteError
from client.site import SiteConfig, load_site_config
from shared_models.metrics import binary_report
from shared_models.registry import UnknownModelError, build_model, get_spec
from shared_models.tasks import BINARY, SEGMENTATION, Task, get_task
from shared_models.report_html import e, figure_png, new_figure, page, png_img

REPORT_FILE = "site-report.html"
DEFAULT_SEG_SHAPE = "48,64,48"  # the app's default run config (pyproject.toml)
LABEL_COLOURS = ("#00000000", "#f2c200", "#e4002b", "#00a0e4", "#7ac143")  # label 0 transparent
FEATURE_STATS_FILE = "feature_stats.json"  # the run's pooled feature statistics (server/feature_stats.py: STATS_FILE)


@dataclass
class SiteReport:
    html: Path
    images: list[Path] = field(default_factory=list)
    task: str = ""


def load_global_model(path: Path) -> tuple[str, torch.nn.Module]:
    """The model of a ``final_model.pt`` (or a coordinator checkpoint's format), ready to evaluate."""
    path = Path(path)
    if not path.is_file():
        raise SiteError(f"model file {path} not found")
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise SiteError(f"{path} is not a model file torch can read safely ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or "model" not in saved or "state_dict" not in saved:
        raise SiteError(f"{path} is not a carefl global model (expected the final_model.pt of a run)")
    try:
        model = build_model(str(saved["model"]), **dict(saved.get("model_kwargs") or {}))
        model.load_state_dict(saved["state_dict"])
    except UnknownModelError as exc:
        raise SiteError(f"{path}: {exc}") from None
    except (RuntimeError, TypeError) as exc:
        raise SiteError(f"{path}: the weights do not fit model '{saved['model']}' ({type(exc).__name__})") from None
    return str(saved["model"]), model.eval()


def _run_config_beside(model_path: Path) -> dict:
    """The run config in the summary.json next to the model, when the whole run directory is there."""
    try:
        return dict(json.loads((Path(model_path).parent / "summary.json").read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_site_report(config: Path, model_path: Path, out: Path, cases: int = 4,
                      seg_shape: str | None = None, seg_spacing: float | None = None) -> SiteReport:
    """Evaluate the global model on this site's test split and write the local report into ``out``."""
    site = load_site_config(config)
    model_name, model = load_global_model(model_path)
    study = get_task(get_spec(model_name).task)
    task = study.name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = training.pick_device(site.device)
    run_config = _run_config_beside(model_path)
    if study.metric_family == BINARY:
        body, images = _binary_section(site, study, model, device, out, run_config, Path(model_path))
    elif study.metric_family == SEGMENTATION:
        shape = segmentation.parse_shape(seg_shape or run_config.get("seg-shape", DEFAULT_SEG_SHAPE))
        spacing = float(seg_spacing or run_config.get("seg-spacing", 1.0))
        body, images = _seg_section(site, study, model, device, out, cases, shape, spacing)
    else:
        raise SiteError(f"the site report draws the metric families {BINARY} and {SEGMENTATION}; model "
                        f"'{model_name}' is for task '{task}' ({study.metric_family})")
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"<h1>carefl site report: {e(site.site_id)}</h1>"
            f'<p class="bad">Stays at this site. It shows patient-level results on the site\'s own test data; '
            f"do not send it to the coordinator or to other sites.</p>"
            f'<p class="muted">generated {e(generated)} · model <code>{e(model_name)}</code> from '
            f"<code>{e(Path(model_path).resolve())}</code> · site config <code>{e(Path(config).resolve())}</code>"
            f" · device {e(device)}</p>")
    target = out / REPORT_FILE
    target.write_text(page(f"carefl site report {site.site_id}", head + body), encoding="utf-8")
    return SiteReport(target, images, task)


def _save(fig, out: Path, name: str, alt: str) -> tuple[str, Path]:
    png = figure_png(fig)
    path = out / name
    path.write_bytes(png)
    return png_img(png, alt), path


def _metrics_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{e(k)}</th><td class=num>{e(v)}</td></tr>" for k, v in rows) + "</table>"


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


# -- binary tasks --------------------------------------------------------------------------------

@dataclass
class BinaryTest:
    """A site's test split of a binary task, scored by the global model."""
    dataset: str
    scores: np.ndarray       # the model's probability of the positive class, per test patient
    labels: np.ndarray       # 0/1
    positives: str           # HTML: who the positives are, e.g. "with heart disease (label 1 = UCI num &gt; 0)"
    classes: tuple[str, str]  # the negative and the positive class, in words


def _heart_disease_test(site: SiteConfig, study: Task, model, device, run_config: dict, model_path: Path) -> BinaryTest:
    """The site's UCI heart-disease test split (FLamby's), as ``client/tasks.py: EhrTask`` evaluates it."""
    data = site.load_heart_disease()
    try:
        scores = training.predict(model, data.x_test, device)
    except RuntimeError:
        raise SiteError(f"the model does not fit this site's data ({data.n_features} features)") from None
    return BinaryTest(study.dataset_name(), scores, data.y_test.astype(int),
                      "with heart disease (label 1 = UCI num &gt; 0)", ("no disease", "disease"))


def _visit_history_test(site: SiteConfig, study: Task, model, device, run_config: dict, model_path: Path) -> BinaryTest:
    """The test patients of a schema-driven visit extract, split and encoded as ``client/tasks.py: EhrSeqTask``
    does in a run: by a hash of the patient id, with the run's pooled feature statistics (``feature_stats.json``
    of the run directory, beside the model)."""
    from torch.utils.data import DataLoader

    from client.ingest import ehr_encode
    from client.tasks import load_task
    from shared_models.schema import SchemaError
    from shared_models.sequence import HistoryDataset

    stats = run_feature_stats(model_path, study.name)
    config = {**study.defaults(), **run_config, "task": study.name}
    try:
        task = load_task(site, config, stats.to_json())
        stats.check(task.schema)
    except (SchemaError, ValueError) as exc:
        raise SiteError(f"{study.name}: {exc}") from None
    seqs, labels = ehr_encode.histories(task.extract, stats, task.test_patients)
    if not seqs:
        raise SiteError(f"site '{site.site_id}' has no test patients in {task.schema.name}")
    data = HistoryDataset(seqs, labels, max_len=task.schema.visits.max_visits or None)
    model.to(device).eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(x.to(device), n.to(device)).cpu()
                                for x, n, _ in DataLoader(data, batch_size=256)])
    except (RuntimeError, TypeError):
        raise SiteError(f"the model does not fit this site's visit histories ({data.x.shape[-1]} features)") from None
    column = task.schema.label.column
    positive = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in task.schema.label.positive)
    return BinaryTest(task.schema.name, torch.sigmoid(logits).numpy().astype(np.float64), labels.astype(int),
                      f"with {e(column)} (label {e(positive)}); the test patients are the "
                      f"{task.TEST_PERCENT}% chosen by a hash of the patient id, as in training",
                      (f"no {column}", column))


# How a binary task's test split is read, by the task's dataset kind (shared_models/tasks.py).
BINARY_TEST_SPLITS = {"heart-disease": _heart_disease_test, "ehr-extract": _visit_history_test}


def _binary_section(site: SiteConfig, study: Task, model, device, out: Path, run_config: dict,
                    model_path: Path) -> tuple[str, list[Path]]:
    from sklearn.metrics import roc_curve

    if study.dataset_kind not in BINARY_TEST_SPLITS:
        raise SiteError(f"the site report cannot read the test split of task '{study.name}' (dataset kind "
                        f"'{study.dataset_kind}'; it reads {', '.join(BINARY_TEST_SPLITS)})")
    test = BINARY_TEST_SPLITS[study.dataset_kind](site, study, model, device, run_config, model_path)
    scores, labels = test.scores, test.labels
    negative, positive = test.classes
    report = binary_report(scores, labels)
    n, n_pos = len(labels), int(labels.sum())
    parts = [f"<h2>Test split of {e(test.dataset)}</h2>",
             f"<p>{n} test patients, {n_pos} {test.positives}. Threshold 0.5 on the model's probability.</p>",
             _metrics_table([("accuracy", _fmt(report["accuracy"])), ("AUC", _fmt(report["auc"])),
                             ("sensitivity", _fmt(report["sensitivity"])),
                             ("specificity", _fmt(report["specificity"])), ("F1", _fmt(report["f1"]))])]
    images = []
    fig = new_figure(5.2, 4.8)
    ax = fig.subplots()
    if 0 < n_pos < n:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, color="#1f77b4", linewidth=2, label=f"global model (AUC {report['auc']:.3f})")
        ax.plot([1 - report["specificity"]], [report["sensitivity"]], "o", color="#d62728", markersize=8,
                label="threshold 0.5")
    else:
        ax.text(0.5, 0.5, "one class only in the test split:\nno ROC curve", ha="center", va="center")
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999", linewidth=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 − specificity)",
           ylabel="true positive rate (sensitivity)")
    ax.set_title(f"ROC on {site.site_id}'s test split ({n} patients)", fontsize=10)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    roc_img, path = _save(fig, out, "roc.png", "ROC curve")
    images.append(path)

    counts = np.array([[report["tn"], report["fp"]], [report["fn"], report["tp"]]], dtype=int)
    fig = new_figure(4.8, 4.4)
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    for (i, j), count in np.ndenumerate(counts):
        share = count / max(counts[i].sum(), 1)
        ax.text(j, i, f"{count}\n({share:.0%} of row)", ha="center", va="center", fontsize=11,
                color="white" if count > counts.max() / 2 else "black")
    sep = " " if max(len(negative), len(positive)) <= 10 else "\n"  # longer class names: two lines, no overlap
    ax.set_xticks([0, 1], [f"predicted{sep}{negative}", f"predicted{sep}{positive}"])
    ax.set_yticks([0, 1], [negative, positive])
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (threshold 0.5)", fontsize=10)
    fig.tight_layout()
    cm_img, path = _save(fig, out, "confusion-matrix.png", "confusion matrix")
    images.append(path)
    parts.append(f'<div style="display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start">{roc_img}{cm_img}</div>')
    return "".join(parts), images


# -- imaging -------------------------------------------------------------------------------------

def _test_case_ids(site: SiteConfig, dataset, spec) -> list[str]:
    """Ids of the valid test cases, in the order ``load_site_images`` returns them."""
    from client.ingest.imaging.manifest import read_manifest
    from client.ingest.imaging.preprocess import PreprocessCache

    cache = PreprocessCache(site.cache_dir / dataset.name, spec, set(dataset.labels) or {0, 1})
    return [c.case_id for c in read_manifest(dataset.manifest)
            if c.split != "train" and (cache.folder / f"{cache.key(c)}.npz").exists()]


def _overlay_cmap():
    from matplotlib.colors import ListedColormap

    return ListedColormap(LABEL_COLOURS)


def _seg_section(site: SiteConfig, study: Task, model, device, out: Path, cases: int, shape, spacing: float):
    from client.ingest.imaging.preprocess import PreprocessSpec
    from shared_models.seg_metrics import dice_per_class

    dataset = site.dataset(study.dataset_name())
    spec = PreprocessSpec(spacing=(spacing,) * 3, shape=shape)
    images = segmentation.load_site_images(site, dataset, spec)
    test = images.test
    ids = _test_case_ids(site, dataset, spec)
    if len(ids) != len(test):
        ids = [f"test case {i + 1}" for i in range(len(test))]
    model.to(device).eval()
    try:
        with torch.no_grad():
            num_classes = int(model(test[0][0][None].to(device)).shape[1])
    except RuntimeError:
        raise SiteError("the model does not fit this site's preprocessed volumes (a 3-D U-Net is needed)") from None
    overall = segmentation.evaluate(model, test, device, num_classes)
    table = [("test cases", str(len(test))), ("mean foreground Dice", _fmt(overall["mean-dice"]))]
    table += [(f"Dice, label {c}", _fmt(overall[f"dice-{c}"])) for c in range(1, num_classes) if f"dice-{c}" in overall]
    parts = [f"<h2>Test split of {e(dataset.name)}</h2>",
             f"<p>{len(test)} valid test case(s) at {e('×'.join(map(str, shape)))} voxels of {spacing:g} mm "
             f"(as in training); {images.excluded} case(s) excluded by validation.</p>", _metrics_table(table),
             f"<h2>Predicted and true masks ({min(cases, len(test))} case(s))</h2>",
             '<p class="muted">Each row: one test case, the axial slice with the most ground truth. Colours: '
             'label 1 yellow, label 2 red.</p>']
    cmap = _overlay_cmap()
    written = []
    for i in range(min(cases, len(test))):
        image, label = test[i]
        with torch.no_grad():
            pred = model(image[None].to(device)).argmax(1).cpu()[0].numpy()
        truth = label[0].numpy()
        dice = dice_per_class(pred[None], truth[None], num_classes)
        z = int(np.argmax((truth > 0).reshape(truth.shape[0], -1).sum(1)))
        if not (truth[z] > 0).any():
            z = int(np.argmax((pred > 0).reshape(pred.shape[0], -1).sum(1)))
        fig = new_figure(9, 3.4)
        axes = fig.subplots(1, 3)
        slice_ = image[0, z].numpy()
        for ax, (title, mask) in zip(axes, (("image", None), ("true mask", truth[z]), ("predicted mask", pred[z]))):
            ax.imshow(slice_, cmap="gray", interpolation="nearest")
            if mask is not None:
                ax.imshow(mask, cmap=cmap, vmin=0, vmax=len(LABEL_COLOURS) - 1, alpha=0.55, interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.set_axis_off()
        dice_text = ", ".join(f"label {c} {dice[c]:.2f}" for c in range(1, num_classes))
        fig.suptitle(f"{ids[i]} · slice {z} · Dice {dice_text}", fontsize=10)
        fig.tight_layout()
        img, path = _save(fig, out, f"case-{i + 1}.png", f"overlay of {ids[i]}")
        written.append(path)
        parts.append(img)
    return "".join(parts), written


def run_feature_stats(model_path: Path, task: str):
    """The run's pooled feature statistics (``feature_stats.json`` beside its model), which a visit-sequence
    model's inputs are encoded with; one clear error when they are not there."""
    from shared_models.feature_stats import FeatureStats

    stats_path = model_path.parent / FEATURE_STATS_FILE
    try:
        return FeatureStats.from_json(json.loads(stats_path.read_text(encoding="utf-8"))["stats"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SiteError(f"task {task} encodes visits with its run's pooled feature statistics: put the run's "
                        f"{FEATURE_STATS_FILE} beside the model ({stats_path} is missing or unreadable)") from None
