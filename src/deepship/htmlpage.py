"""One self-contained HTML page for every report (data report, evaluation report): tables, and
matplotlib plots embedded as base64 PNGs, so a report is a single file that can be mailed."""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;font-size:90%}"
         ".pass{background:#e6f4ea;border:2px solid #1e8e3e;padding:.6em}"
         ".fail{background:#fce8e6;border:2px solid #d93025;padding:.6em}"
         ".none{background:#f1f3f4;border:2px solid #9aa0a6;padding:.6em}img.plot{max-width:100%}")

# Marks the page with how many plots decoded (data-plots="ok/total") and warns on the page when one
# did not: a reader sees a broken report instead of a silently missing figure, and tests can check it.
PLOT_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) ok++; });
  document.body.dataset.plots = ok + '/' + imgs.length;
  if (ok < imgs.length) {
    var p = document.createElement('p'); p.className = 'fail';
    p.textContent = (imgs.length - ok) + ' plot(s) failed to render';
    document.body.insertBefore(p, document.body.firstChild);
  }
});
</script>"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def img_tag(png: bytes, alt: str, css_class: str = "plot") -> str:
    return f'<img class="{css_class}" alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def figure_tag(fig: Any, alt: str) -> str:
    """Render a matplotlib figure to an embedded PNG and close it (figures hold memory until closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return img_tag(buf.getvalue(), alt)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: reports render on hosts without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}{PLOT_CHECK}</body></html>\n")
