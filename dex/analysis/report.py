"""``dex report FOLDER``: one self-contained HTML page (figures embedded as data URIs, no external resource) of
whatever the folder holds: a pretraining run (its config, curves and summary; a MedMoE run's expert load per
report type), a benchmark (its tables and figures), an analysis (its tables and figures), a vision-language
evaluation (``dex vl-eval``'s tables); sub-folders holding any of these are included too."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import yaml

from dex.analysis import plots
from dex.config import read_yaml
from dex.train.runs import run_objective_class

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; } td.num { text-align: right; }
img { max-width: 100%; display: block; margin: 1em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
nav a { margin-right: 1em; }
"""
SCRIPT = """
document.querySelectorAll('img').forEach(function (img) {
  img.title = 'click to open at full size';
  img.style.cursor = 'zoom-in';
  img.addEventListener('click', function () { window.open(img.src); });
});
document.getElementById('generated').textContent = document.images.length + ' figures, ' +
  document.querySelectorAll('table').length + ' tables';
"""


def _image(path: Path | bytes) -> str:
    data = path if isinstance(path, bytes) else path.read_bytes()
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def markdown_to_html(text: str, folder: Path) -> str:
    """The Markdown dex writes (headings, paragraphs, pipe tables, images of files in ``folder``) as HTML."""
    out, table = [], []

    def flush_table() -> None:
        if not table:
            return
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table
                if not re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())]
        head, *body = rows
        out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
        for row in body:
            cells = "".join(f'<td class="{"num" if re.fullmatch(r"[-+0-9. ±()]+", c) else ""}">{html.escape(c)}</td>'
                            for c in row)
            out.append(f"<tr>{cells}</tr>")
        out.append("</table>")
        table.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        flush_table()
        image = re.fullmatch(r"!\[[^\]]*\]\(([^)]+)\)", line.strip())
        if image and (folder / image.group(1)).is_file():
            out.append(_image(folder / image.group(1)))
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    return "\n".join(out)


def _run_section(folder: Path) -> str:
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    config = read_yaml(folder / "config.yaml")
    parts = [f"<h2>Pretraining run {html.escape(folder.name)}</h2>"]
    if rows:
        first, last = rows[0], rows[-1]
        objective = run_objective_class(folder)
        terms = objective.loss_terms
        parts.append(f"<p>{last['step']} steps ({last.get('skipped', 0)} skipped); loss {first['loss']:.4f} -> "
                     f"{last['loss']:.4f}; " + ", ".join(f"{t} {last[t]:.4f}" for t in terms) +
                     f"; {last.get('images_per_s', 0):.0f} images/s.</p>")
        buffer = io.BytesIO()
        plots.training_curves(rows, buffer, plots.run_top_k(config.get("model_args") or {}), terms,
                              objective.routing_log_keys)
        parts.append(_image(buffer.getvalue()))
        warnings = [w for r in rows for w in r.get("warnings", [])]
        if warnings:
            parts.append("<p>Warnings: " + html.escape("; ".join(warnings)) + "</p>")
        if last.get("expert_load_by_type"):
            parts.append(_load_by_type(last["expert_load_by_type"], last["step"], folder))
    parts.append("<h3>Config</h3><pre>" + html.escape(yaml.safe_dump(config, sort_keys=False)) + "</pre>")
    return "\n".join(parts)


def _load_by_type(table: dict[str, list[int]], step: int, folder: Path) -> str:
    """MedMoE's report router at the last logged step: per report type, the images sent to each expert."""
    experts = len(next(iter(table.values())))
    lines = [f"### Expert load by report type (images of the last logged batch, step {step})", "",
             "| report type | " + " | ".join(f"expert {k}" for k in range(experts)) + " |",
             "| --- |" + " ---: |" * experts]
    lines += [f"| {name} | " + " | ".join(map(str, counts)) + " |" for name, counts in table.items()]
    return markdown_to_html("\n".join(lines), folder)


def _benchmark_section(report: Path) -> str:
    parts = [f"<h2>Benchmark {html.escape(report.parent.name)}</h2>"]
    for md in sorted(report.glob("*.md")):
        parts.append(markdown_to_html(md.read_text(), report))
        figure = md.with_suffix(".png")
        if figure.is_file():
            parts.append(_image(figure))
    if (report / "radar.png").is_file():
        parts.append("<h3>Per-task scores (Fig. 4)</h3>" + _image(report / "radar.png"))
    return "\n".join(parts)


def sections(folder: Path) -> list[tuple[str, str]]:
    """(title, HTML) for the folder and its sub-folders, in a stable order."""
    found = []
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if (path / "log.jsonl").is_file() and (path / "config.yaml").is_file():
            found.append((f"run {path.name}", _run_section(path)))
        if any(path.glob("table1_modalities*.md")):
            found.append((f"benchmark {path.parent.name}", _benchmark_section(path)))
        if (path / "analysis.md").is_file():
            title = path.name if "analysis" in path.name else f"analysis {path.name}"
            found.append((title, markdown_to_html((path / "analysis.md").read_text(), path)))
        if (path / "vl_metrics.md").is_file():
            found.append((f"vl-eval {path.name}", markdown_to_html((path / "vl_metrics.md").read_text(), path)))
    return found


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    folder = Path(folder)
    found = sections(folder)
    if not found:
        raise ValueError(f"{folder}: no pretraining run, benchmark, analysis or vision-language evaluation found to "
                         "report on")
    out = Path(out) if out else folder / "report.html"
    nav = "".join(f'<a href="#s{i}">{html.escape(title)}</a>' for i, (title, _) in enumerate(found))
    body = "\n".join(f'<section id="s{i}">{content}</section>' for i, (_, content) in enumerate(found))
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>dex report: "
            f"{html.escape(folder.name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>dex report: {html.escape(folder.name)}</h1><p id='generated'></p><nav>{nav}</nav>{body}"
            f"<script>{SCRIPT}</script></body></html>\n")
    out.write_text(page)
    return out
