"""The run report and the site report, on run directories written by the real apps in-process.

Each run is as short as it can be and still prove something: two EHR rounds with DP in which one
site's budget refuses round 2 (an error in the report), one non-DP round, one imaging round, one ehr-seq round.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from client.client_app import app as client_app
from client.site import write_site_config
from deploy.cli.main import app as cli
from deploy.demo.inprocess import InProcessGrid
from privacy.ledger import PrivacyLedger
from server import live_report
from server.report import REPORT_FILE, ReportError, load_run, write_report
from server.server_app import app as server_app
from server.settings import RunConfigError, RunSettings
from tests.helpers import default_run_config, hippocampus_cases, site_config

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
URL = re.compile(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", re.IGNORECASE)


def _serve(nodes: dict, out, app=client_app, **overrides):
    cfg = default_run_config(**{"num-server-rounds": 2, "local-steps": 10, "out-dir": str(out), "round-timeout": 5,
                                "noise-multiplier": 1.0, "target-epsilon": 0.0, **overrides})
    server_app(InProcessGrid(app, nodes, cfg),
               Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    return out


def spent_elsewhere_before(site: str, server_round: int):
    """The real ClientApp; just before ``site`` trains ``server_round``, another study spends most of that
    site's lifetime budget, so its own ledger refuses the round (the study had fit at discovery)."""
    def app(msg, context):
        config = msg.content.config_records.get("config")
        path = Path(context.node_config["site-config"])
        if (msg.metadata.message_type == "train" and path.parent.name == site
                and int(config["server-round"]) == server_round):
            PrivacyLedger(path.parent / "privacy-ledger.sqlite").charge(
                "heart-disease", run_id="another-study", server_round=1, noise_multiplier=0.8, clip_norm=1.0,
                sample_rate=0.1, steps=3000, delta=1e-4, budget=math.inf, accountant="rdp")
        return client_app(msg, context)
    return app


@pytest.fixture(scope="module")
def ehr_run(tmp_path_factory):
    """Two DP rounds, TensorBoard on; switzerland's second round is refused by its ledger (another study
    spent its budget in between). RDP accounting: the report does not depend on the accountant, and PRV's
    composition of every charge at each of the run's 13 ledger charges took most of this fixture's time."""
    folder = tmp_path_factory.mktemp("ehr")
    configs = {"cleveland": site_config(folder / "sites", "cleveland", accountant="rdp"),
               "hungarian": site_config(folder / "sites", "hungarian", accountant="rdp"),
               "switzerland": site_config(folder / "sites", "switzerland", epsilon_budget=20.0, accountant="rdp")}
    nodes = {10 + i: {"site-config": str(p)} for i, p in enumerate(configs.values())}
    return _serve(nodes, folder / "run", spent_elsewhere_before("switzerland", 2), tensorboard=True), configs


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """One imaging round on two sites of three hippocampus cases each (small crops)."""
    from deploy.datasets import hippocampus

    folder = tmp_path_factory.mktemp("seg")
    configs = {}
    for site, cases in hippocampus.split_sites(hippocampus_cases()[:6], 2).items():
        rows = [(c.case_id, c.image, c.label, "test" if i == 2 else "train") for i, c in enumerate(cases)]
        manifest = hippocampus.write_manifest(folder / site / "hippocampus.csv", rows)
        configs[site] = write_site_config(folder / site / "site.toml", site, manifest, device="cpu",
                                          dataset="hippocampus", manifest=True, labels=[0, 1, 2],
                                          epsilon_budget=50.0, delta=1e-3, max_sample_rate=0.6,
                                          min_noise_multiplier=0.3, evaluation="exact")  # one test case each
    nodes = {20 + i: {"site-config": str(p)} for i, p in enumerate(configs.values())}
    out = _serve(nodes, folder / "run", **{"task": "seg", "model": "seg-unet3d", "num-server-rounds": 1,
                                           "local-steps": 1, "batch-size": 1, "lr": 0.05, "noise-multiplier": 0.5,
                                           "seg-shape": "16,24,16"})
    return out, configs


@pytest.fixture(scope="module")
def ehr_seq_run(tmp_path_factory):
    """One ehr-seq round on two synthetic visit-extract sites (pooled feature statistics first)."""
    from deploy.datasets.synthetic_ehr import synthesize

    folder = tmp_path_factory.mktemp("ehr-seq")
    configs = {site: write_site_config(folder / "sites" / site / "site.toml", site, path, device="cpu",
                                       dataset="diabetes-visits", epsilon_budget=50.0, delta=1e-4, accountant="rdp")
               for site, path in synthesize(folder / "data", sites=2, seed=1, patients=60).items()}
    nodes = {30 + i: {"site-config": str(p)} for i, p in enumerate(configs.values())}
    out = _serve(nodes, folder / "run", **{"task": "ehr-seq", "model": "ehr-gru-attn", "schema": "diabetes-visits",
                                           "num-server-rounds": 1, "local-steps": 2, "optimizer": "adam",
                                           "lr": 0.01, "stats-noise-multiplier": 5.0})
    return out, configs


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _self_contained(page: str) -> None:
    assert not URL.search(page), URL.search(page)
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)
    assert all(png.startswith(PNG) for png in _images(page))


def test_every_run_writes_a_report_with_curves_epsilon_errors_and_final_table(ehr_run):
    out, _ = ehr_run
    page = (out / REPORT_FILE).read_text(encoding="utf-8")  # written by the ServerApp itself
    _self_contained(page)
    # federation curves, per-site test metrics, the sites' agreement with the consensus, ε per site (no training
    # loss: it never leaves a site)
    assert len(_images(page)) == 4 and "Training loss" not in page
    assert "no site was flagged" in page
    for section in ("Final results", "Federation metrics per round", "Test metrics per site and round",
                    "Agreement between the sites' updates", "Privacy: ε per site and round",
                    "Errors and missing replies"):
        assert section in page
    for site in ("cleveland", "hungarian", "switzerland"):
        assert f"<td>{site}</td>" in page
    assert "completed: 2 of 2 round(s)" in page and "pooled (all test patients)" in page
    assert "σ = 1 asked of every site" in page
    # switzerland's refused round 2 is listed with the site's own (safe) reason
    assert re.search(r"<td class=num>2</td><td>switzerland</td><td>train: refused by site privacy policy", page)
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['per_site']['cleveland']['epsilon']:.3f} (δ=0.0001)" in page


def test_tensorboard_logs_each_round_per_site_and_federation(ehr_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = ehr_run
    events = EventAccumulator(str(out / live_report.TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"federation/pooled_auc", "accuracy/cleveland", "epsilon/switzerland", "auc/hungarian"} <= tags
    assert [s.step for s in events.Scalars("federation/pooled_auc")] == [1, 2]
    assert [s.step for s in events.Scalars("epsilon/switzerland")] == [1]  # round 2 was refused


def test_carefl_report_regenerates_with_baselines(ehr_run, tmp_path):
    run = shutil.copytree(ehr_run[0], tmp_path / "run")
    (run / REPORT_FILE).unlink()
    (run / "baselines.json").write_text(json.dumps({"centralised": {"pooled_auc": 0.8761, "pooled_accuracy": 0.81},
                                                    "local only": 0.7123}))
    result = runner.invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / REPORT_FILE).read_text(encoding="utf-8")
    _self_contained(page)
    # a row of the final table each; a bare number is the headline metric (pooled AUC for EHR)
    assert "baseline: centralised</td>" in page and "<td class=num>0.876</td>" in page
    assert "baseline: local only</td>" in page and "<td class=num>0.712</td>" in page
    other = tmp_path / "elsewhere" / "r.html"
    assert runner.invoke(cli, ["report", str(run), "--out", str(other)]).exit_code == 0
    assert other.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_partial_run_without_summary(ehr_run, tmp_path):
    run = shutil.copytree(ehr_run[0], tmp_path / "run")
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # a writer mid-append
    (run / "rounds.jsonl").write_text((run / "rounds.jsonl").read_text().splitlines()[0] + "\n")
    page = write_report(run).read_text(encoding="utf-8")
    _self_contained(page)
    assert "in progress or stopped: 1 of 2 round(s) recorded" in page  # config from the audit log
    assert "each site&#x27;s latest round without an error" in page
    assert all(f"<td>{s}</td>" in page for s in ("cleveland", "hungarian", "switzerland"))


def test_bad_run_dir_is_one_clear_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for target, says in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "not a carefl run directory"),
                         (tmp_path / "file.txt", "is not a directory")):
        result = runner.invoke(cli, ["report", str(target)])
        text = " ".join(result.output.split())  # rich wraps at the terminal's width
        assert result.exit_code == 2 and text.startswith("error:") and says in text and "Traceback" not in text
        assert result.exception is None or isinstance(result.exception, SystemExit)
    with pytest.raises(ReportError):
        load_run(tmp_path / "empty")


def test_non_dp_run_states_that_no_epsilon_holds(tmp_path):
    nodes = {10 + i: {"site-config": str(site_config(tmp_path / "sites", c, allow_non_dp=True))}
             for i, c in enumerate(("cleveland", "hungarian"))}
    out = _serve(nodes, tmp_path / "run", **{"num-server-rounds": 1, "dp": False, "noise-multiplier": 0.0,
                                             "personalise": "finetune", "finetune-steps": 5})
    page = (out / REPORT_FILE).read_text(encoding="utf-8")
    _self_contained(page)
    assert "Differential privacy was off" in page and page.count(">no DP<") == 2
    assert len(_images(page)) == 2  # federation and per-site metrics; no ε plot, no training loss, and with two
    assert "no consensus records" in page  # sites no consensus to agree with
    # personalisation: each site's fine-tuned model has its own rows beside the global model's
    assert "<th>cleveland, fine-tuned at the site</th>" in page
    assert "<th>pooled (all test patients), fine-tuned at each site</th>" in page


def test_tensorboard_is_a_checked_run_config_switch():
    assert RunSettings.from_run_config(default_run_config()).tensorboard is False
    assert RunSettings.from_run_config(default_run_config(tensorboard=True)).tensorboard is True
    with pytest.raises(RunConfigError, match="'tensorboard' must be true or false"):
        RunSettings.from_run_config(default_run_config(tensorboard="yes"))


def test_a_run_that_stops_still_leaves_its_report(tmp_path):
    # RDP accounting, as in ``ehr_run``: PRV's composition of the other study's 3000 steps took most of this time
    nodes = {10: {"site-config": str(site_config(tmp_path / "sites", "cleveland", accountant="rdp"))},
             11: {"site-config": str(site_config(tmp_path / "sites", "switzerland", epsilon_budget=20.0,
                                                 accountant="rdp"))}}
    with pytest.raises(Exception, match="switzerland"):  # round 2: one valid update, two needed, no retry
        _serve(nodes, tmp_path / "run", spent_elsewhere_before("switzerland", 2), **{"round-retries": 0})
    page = (tmp_path / "run" / REPORT_FILE).read_text(encoding="utf-8")
    _self_contained(page)
    assert "stopped after 1 of 2 round(s): round 2: only 1 valid update(s), min-sites is 2" in page
    assert "switzerland failed first: refused by site privacy policy" in page
    # the stopped round, per site: switzerland's refusal; cleveland trained (and was charged), not aggregated
    assert re.search(r"<td class=num>2</td><td>switzerland</td><td>train: refused by site", page)
    assert re.search(r"<td class=num>2</td><td>cleveland</td><td>round 2 did not complete", page)
    assert "ehr-logreg" in page  # the run's config, from the coordinator's audit log (no summary.json)


def test_a_report_that_cannot_render_never_fails_the_run(tmp_path, monkeypatch, caplog):
    def broken(run_dir, out=None):
        raise RuntimeError("disk full")

    monkeypatch.setattr(live_report, "write_report", broken)
    reporter = live_report.RunReporter(tmp_path, refresh_seconds=0)
    reporter.round_done(1)
    reporter.close()
    assert "run report not written (RuntimeError: disk full)" in caplog.text


def test_seg_run_report_and_site_overlays(seg_run, tmp_path):
    out, configs = seg_run
    page = (out / REPORT_FILE).read_text(encoding="utf-8")
    _self_contained(page)
    assert "mean foreground Dice" in page and "pooled (all test cases)" in page
    assert all(f'<td>{s} <span class="bad">evaluation not DP</span></td>' in page for s in configs)

    site, config = next(iter(configs.items()))
    result = runner.invoke(cli, ["site", "report", "--config", str(config), "--model", str(out / "final_model.pt"),
                                 "--out", str(tmp_path / "local"), "--cases", "2"])
    assert result.exit_code == 0, result.output
    local = (tmp_path / "local" / "site-report.html").read_text(encoding="utf-8")
    _self_contained(local)
    assert f"site report: {site}" in local and "Stays at this site" in local
    assert (tmp_path / "local" / "case-1.png").read_bytes().startswith(PNG)
    assert len(_images(local)) == 1  # the site has one test case


def test_ehr_site_report_roc_and_confusion_matrix(ehr_run, tmp_path):
    out, configs = ehr_run
    result = runner.invoke(cli, ["site", "report", "--config", str(configs["cleveland"]),
                                 "--model", str(out / "final_model.pt"), "--out", str(tmp_path / "local")])
    assert result.exit_code == 0, result.output
    for name in ("roc.png", "confusion-matrix.png"):
        assert (tmp_path / "local" / name).read_bytes().startswith(PNG)
    page = (tmp_path / "local" / "site-report.html").read_text(encoding="utf-8")
    _self_contained(page)
    assert len(_images(page)) == 2 and "104 test patients" in page and "AUC" in page
    # nothing of it went into the coordinator's run directory
    assert not list(out.glob("site-report*")) and not list(out.glob("roc*.png"))

    missing = runner.invoke(cli, ["site", "report", "--config", str(configs["cleveland"]),
                                  "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")])
    text = " ".join(missing.output.split())
    assert missing.exit_code == 2 and "nope.pt not found" in text and "Traceback" not in text


def test_ehr_seq_site_report_roc_and_confusion_matrix(ehr_seq_run, tmp_path):
    from deploy.site.report import FEATURE_STATS_FILE
    from server.feature_stats import STATS_FILE

    assert FEATURE_STATS_FILE == STATS_FILE
    out, configs = ehr_seq_run
    site, config = next(iter(configs.items()))
    result = runner.invoke(cli, ["site", "report", "--config", str(config), "--model", str(out / "final_model.pt"),
                                 "--out", str(tmp_path / "local")])
    assert result.exit_code == 0, result.output
    for name in ("roc.png", "confusion-matrix.png"):
        assert (tmp_path / "local" / name).read_bytes().startswith(PNG)
    page = (tmp_path / "local" / "site-report.html").read_text(encoding="utf-8")
    _self_contained(page)
    assert f"site report: {site}" in page and "Test split of diabetes-visits" in page
    assert len(_images(page)) == 2 and "with complication (label 1)" in page and "AUC" in page

    # without the run's pooled feature statistics the visits cannot be encoded: one clear line
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "final_model.pt", alone / "final_model.pt")
    missing = runner.invoke(cli, ["site", "report", "--config", str(config), "--model", str(alone / "final_model.pt"),
                                  "--out", str(tmp_path / "x")])
    text = " ".join(missing.output.split())
    assert missing.exit_code == 2 and "put the run's feature_stats.json beside the model" in text, text
    assert "Traceback" not in text


def test_many_sites_are_drawn_as_their_range_not_one_line_each(tmp_path, monkeypatch):
    from server import report_plots

    run = tmp_path / "run"
    run.mkdir()
    records = [{"round": r, "site": f"sim-{i:04d}", "accuracy": 0.5 + i / 100, "auc": 0.6, "train_loss": 0.7,
                "dp": 1.0, "epsilon": 0.1 * r, "delta": 1e-4} for r in (1, 2) for i in range(40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    (run / "rounds.jsonl").write_text("".join(json.dumps({"round": r, "mean_centre_accuracy": 0.7}) + "\n" for r in (1, 2)))
    drawn, band = [], report_plots._site_band
    monkeypatch.setattr(report_plots, "_site_band", lambda ax, data, key: drawn.append(key) or band(ax, data, key))
    page = write_report(run).read_text(encoding="utf-8")
    _self_contained(page)
    assert {"accuracy", "auc", "epsilon"} <= set(drawn)


def test_quality_metrics_are_drawn_on_their_natural_scale(seg_run, monkeypatch):
    """Dice (and accuracy, AUC) panels span 0–1, so a rise from 0.01 to 0.03 looks as small as it is;
    a loss keeps its own scale."""
    from server import report_plots

    out, _ = seg_run
    drawn = []
    monkeypatch.setattr(report_plots, "figure_img", lambda fig, alt: drawn.append(fig) or "")
    run = load_run(out)
    report_plots.plot_federation(run)
    report_plots.plot_sites(run, ["dice"], "t", "a")
    federation, sites = drawn
    assert federation.axes[0].get_ylim() == (0.0, 1.02) and sites.axes[0].get_ylim() == (0.0, 1.02)
    from matplotlib.figure import Figure

    loss = Figure().subplots()
    loss.plot([1, 2], [5.0, 7.0])
    report_plots._on_unit_scale(loss, "train_loss")
    assert loss.get_ylim()[1] > 7.0


def test_figures_show_their_noise_std_and_exact_sites_are_marked_not_dp(tmp_path, monkeypatch):
    from server import report_plots

    run = tmp_path / "run"
    run.mkdir()
    records = [{"round": r, "site": site, "accuracy": 0.7, "accuracy_std": std, "auc": 0.8, "auc_std": std,
                "num_test": 100.0, "num_test_std": 2 * std, "eval_dp": float(std > 0), "dp": 1.0,
                "epsilon": 0.5 * r, "delta": 1e-4} for r in (1, 2) for site, std in (("a", 0.05), ("b", 0.0))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    (run / "rounds.jsonl").write_text("".join(json.dumps({"round": r, "pooled_accuracy": 0.7,
                                                          "pooled_accuracy_std": 0.03}) + "\n" for r in (1, 2)))
    bands, noise_band = [], report_plots._noise_band
    monkeypatch.setattr(report_plots, "_noise_band",
                        lambda ax, data, key, *a, **k: bands.append((key, noise_band(ax, data, key, *a, **k))))
    page = write_report(run).read_text(encoding="utf-8")
    _self_contained(page)
    assert "0.700 ± 0.050" in page and "0.700 ± 0.030" in page  # a site's figure, the pooled one
    assert "<td>b <span class=\"bad\">evaluation not DP</span></td>" in page and "<td>a</td>" in page
    assert "Evaluation not DP at b" in page
    drawn = {key for key, band in bands if band is not None}
    assert {"pooled_accuracy", "accuracy", "auc"} <= drawn  # ± one std shaded where a std was stated


def test_a_bug_in_any_command_is_one_line_and_the_traceback_goes_to_a_file(monkeypatch, capsys, tmp_path):
    """No Python traceback reaches a person from a `carefl` command: a bug is named in one line that points
    to a file holding the traceback for a bug report."""
    import sys

    from deploy.cli import main as cli_main

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("server.report.write_report", broken)  # the command imports it when it runs
    monkeypatch.setattr(cli_main.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["carefl", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main()
    shown = capsys.readouterr()
    assert exit_info.value.code == 1
    assert "internal error" in shown.out and "KeyError" in shown.out and "Traceback" not in shown.out + shown.err
    written = list(tmp_path.glob("carefl-error-*.txt"))
    assert len(written) == 1 and "Traceback" in written[0].read_text() and "a bug" in written[0].read_text()
