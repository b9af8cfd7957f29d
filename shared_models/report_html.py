"""Self-contained HTML reports: one file, plots inline as base64 PNG, no external URL.

Shared by the privacy audit report (privacy/auditor/report.py), the coordinator's run report
(server/report.py) and a site's local report (deploy/site/report.py). Figures are plain
``matplotlib.figure.Figure`` objects rendered by Agg: no pyplot, so no global state and no GUI
backend, and the caller's matplotlib backend is left alone. matplotlib is imported on first use.
"""

from __future__ import annotations

import base64
import html
import io

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:70em;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#0a7a26;font-weight:600}.bad{color:#b00020;font-weight:600}.warn{color:#a66300;font-weight:600}
.muted{color:#666}.nowrap{white-space:nowrap}code{font-size:.9em}img{max-width:100%}
"""

# Site colours: one per site, the same in every plot of a report (matplotlib's tab10 order).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def e(value) -> str:
    """HTML-escape any value (attributes too)."""
    return html.escape(str(value), quote=True)


def new_figure(width: float, height: float, dpi: int = 100):
    """A matplotlib Figure that belongs to no pyplot state (nothing to close, safe in any thread)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi)


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (no metadata: the file carries no software URL or date)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def png_img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">'


def figure_img(fig, alt: str) -> str:
    """The figure as an ``<img>`` whose PNG is inline."""
    return png_img(figure_png(fig), alt)


def page(title: str, body: str) -> str:
    """A whole HTML document: UTF-8, the shared style, no script, nothing fetched."""
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
