"""``dex report``: one self-contained page of a real tiny pretraining run, its benchmark and its analysis, rendered
in headless Chromium: every figure loads, the page's script runs without error, nothing is fetched."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from dex.analysis import plots
from dex.analysis.report import markdown_to_html, write_report
from dex.cli import main
from dex.train.objective import Objective, RunConfig, register_objective
from tests.train.test_pretrain import TINY_ARGS


@pytest.fixture(scope="module")
def project(phantom_collection, tmp_path_factory):
    """A folder holding a tiny pretraining run, a one-task benchmark of it against scratch, and its analysis."""
    root = tmp_path_factory.mktemp("project")
    run = root / "run"
    assert main(["pretrain", "configs/pretrain_demo.yaml", "--set", *TINY_ARGS, "samples_per_epoch=16",
                 f"data={phantom_collection / 'curated'}", f"out_dir={run}"]) == 0
    suite = {"out_dir": str(root / "bench"), "seeds": [0], "baseline": "scratch",
             "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "steps_per_epoch": 3,
                          "mirror": "none"},
             "encoders": {"scratch": {"source": "scratch", "img_size": 32,
                                      "model_args": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}},
                          "dex": str(run)},
             "tasks": [str(phantom_collection / "raw" / "tasks" / "photo-lesion-type")]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    assert main(["benchmark", str(root / "suite.yaml")]) == 0
    assert main(["analyze", str(run), str(phantom_collection / "curated"), "--out", str(root / "analysis"),
                 "--per-modality", "4", "--cost-model", "dex_vit_tiny_patch16_256"]) == 0
    assert main(["report", str(root)]) == 0
    return root


def test_report_holds_every_section_with_embedded_figures(project):
    page = (project / "report.html").read_text()
    assert "Pretraining run run" in page and "Benchmark bench" in page and "Routing (Fig. 9)" in page
    assert "model_args:" in page  # the run's config
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:|//)', page)  # nothing outside the file


def test_report_renders_in_headless_chromium(project):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        except sync_api.Error as err:
            pytest.skip(f"no Chromium to render with ({str(err).splitlines()[0]}); apt-get install chromium")
        page = browser.new_page()
        errors, requests = [], []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("request", lambda request: requests.append(request.url))
        page.goto((project / "report.html").as_uri(), wait_until="load")
        figures = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        summary = page.text_content("#generated")
        browser.close()
    assert errors == []
    assert len(figures) >= 6 and all(complete and width > 100 and height > 100 for complete, width, height in figures)
    assert summary.startswith(f"{len(figures)} figures")  # the page's script ran
    assert all(url.startswith(("file:", "data:")) for url in requests)


def test_markdown_tables_headings_and_images(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    html = markdown_to_html("# Title\n\ntext <b>\n\n| x | y |\n| --- | ---: |\n| a | 1.5 |\n\n![a](a.png)\n", tmp_path)
    assert "<h2>Title</h2>" in html and "<p>text &lt;b&gt;</p>" in html
    assert "<th>x</th><th>y</th>" in html and '<td class="num">1.5</td>' in html
    assert 'src="data:image/png;base64,' in html


def test_report_of_an_empty_folder_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no pretraining run, benchmark, analysis or vision-language evaluation" in capsys.readouterr().err
    with pytest.raises(ValueError, match=str(tmp_path)):
        write_report(tmp_path)


@register_objective
class RoutedToy(Objective):
    """All that dex report reads of a method: its name, loss terms and routing log keys (never built)."""

    name = "routed_toy"
    config_class = RunConfig
    loss_terms = ("fit",)
    routing_log_keys = ("toy_share", "toy_agreement")


def test_the_routing_panel_shows_the_keys_the_objective_declares(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("objective: routed_toy\n")
    rows = [{"step": step, "loss": 1.0 / step, "fit": 0.5 / step, "toy_share": 0.1 * step, "toy_agreement": 0.5,
             "load_entropy": 0.9} for step in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.append(figure))
    write_report(tmp_path)
    routing = [ax for ax in figures[0].axes if ax.get_title() == "routing of the heads"]
    assert len(routing) == 1 and [t.get_text() for t in routing[0].get_legend().get_texts()] == ["toy_share",
                                                                                                  "toy_agreement"]
    assert list(routing[0].lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])  # load_entropy: not declared
