"""Self-contained HTML pages (`mmkit report`, `mmkit compare --html`): one file, inline CSS and SVG,
no script and nothing fetched when it is viewed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from mmkit import __version__

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto;
       max-width: 1100px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.section td { font-weight: bold; background: #f6f6f6; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg text { font-family: system-ui, sans-serif; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.bar { display: inline-block; height: 10px; background: #4292c6; vertical-align: middle; }
.verdict { font-size: 15px; padding: 8px 12px; background: #eef5fb; border-left: 4px solid #2171b5; }
.warning { color: #8a5a00; }
footer { margin-top: 32px; color: #888; font-size: 12px; }
"""


def page(title: str, subtitle: str, body: Iterable[str]) -> str:
    """A whole HTML document."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{escape(title)}</h1><p class=\"sub\">{escape(subtitle)}</p>{''.join(body)}"
            f"<footer>written by mmkit {escape(__version__)}</footer></body></html>\n")


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, numeric_from: int = 1, raw: bool = False,
          attrs: str = "") -> str:
    """A table; cells from column `numeric_from` on are right-aligned. `raw`: cells are HTML already."""
    cell = (lambda v: v) if raw else escape

    def align(i: int) -> str:
        return ' class="num"' if i >= numeric_from else ""

    head = "".join(f"<th{align(i)}>{escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{align(i)}>{cell(v)}</td>" for i, v in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
