"""HTML building blocks. Every piece of text passes through `esc` (html.escape with quotes), so
user-controlled strings (prompts, model ids, battery names) can never become markup. Pages carry a
Content-Security-Policy that forbids scripts and any network fetch, and link one stylesheet, `style.css`,
written beside them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

CSS_FILE = "style.css"
# No scripts, no network: only same-folder (or file:) images and the one stylesheet.
CSP = (
    "default-src 'none'; img-src 'self' file:; style-src 'self' file:; script-src 'none'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'"
)


def esc(value: Any) -> str:
    """Text as safe HTML (also inside double- or single-quoted attributes)."""
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    """A number to `digits` significant digits; ±infinity as "∞" / "−∞" (a real value, e.g. a KL divergence
    to a target that rules a class out); NaN, None and non-numbers (missing) as an em dash."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return "—" if math.isnan(x) else f"{x:.{digits}g}"


def interval(value: Any, lo: Any, hi: Any) -> str:
    """'0.42 [0.31, 0.55]' (the bounds left out where unknown)."""
    if num(lo) == "—" or num(hi) == "—":
        return num(value)
    return f"{num(value)} [{num(lo)}, {num(hi)}]"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    """A data table in a horizontally scrolling wrapper; every cell is escaped."""
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (
        f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def definition_list(items: Iterable[tuple[str, Any]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def figure(src: str, alt: str, caption: str, size: tuple[int, int] | None = None) -> str:
    """A figure image with alt text and a caption; `src` is a relative path made by the dashboard."""
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return (
        f'<figure class="plot"><img src="{esc(src)}" alt="{esc(alt)}"{dims} loading="lazy">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def gallery(items: Sequence[str], caption: str = "") -> str:
    """Figures side by side on wide screens, one per row on narrow ones."""
    cap = f'<p class="note">{esc(caption)}</p>' if caption else ""
    return f'<div class="figs">{"".join(items)}</div>{cap}'


def note(text: str, kind: str = "note") -> str:
    return f'<p class="{esc(kind)}">{esc(text)}</p>'


def section(title: str, body: str, anchor: str = "") -> str:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{body}</section>"


def paragraphs(*texts: str) -> str:
    return "".join(f"<p>{esc(t)}</p>" for t in texts)


def page(title: str, body: str, nav: Sequence[tuple[str, str]], current: str) -> str:
    """A whole HTML document. `nav` holds (href, label) pairs; `current` is this page's href."""
    mark = ' aria-current="page"'
    links = "".join(
        f'<li><a href="{esc(href)}"{mark if href == current else ""}>{esc(label)}</a></li>'
        for href, label in nav
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">
<meta name="referrer" content="no-referrer">
<title>{esc(title)} · evalsuite</title>
<link rel="stylesheet" href="{CSS_FILE}">
</head>
<body>
<header><p class="brand">evalsuite audit</p><nav aria-label="Dashboard pages"><ul>{links}</ul></nav></header>
<main>
<h1>{esc(title)}</h1>
{body}
</main>
<footer><p>Built by evalsuite from results folders only: no model was loaded to make this page.</p></footer>
</body>
</html>
"""


CSS = """\
:root { --fg: #1b1b1f; --muted: #55575e; --bg: #ffffff; --panel: #f4f5f7; --line: #d5d7dd;
  --accent: #0057a3; --warn-bg: #fff4d6; --warn-line: #b58100; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--fg); background: var(--bg); }
header { background: var(--panel); border-bottom: 1px solid var(--line); padding: .5rem 1rem; }
.brand { margin: 0 0 .25rem; font-weight: 700; }
nav ul { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: .25rem .9rem; }
nav a { color: var(--accent); text-decoration: none; padding: .2rem 0; display: inline-block; }
nav a[aria-current="page"] { font-weight: 700; border-bottom: 2px solid var(--accent); }
main { max-width: 72rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.6rem; margin: .5rem 0 1rem; overflow-wrap: anywhere; }
h2 { font-size: 1.3rem; margin: 2rem 0 .5rem; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
h3 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; overflow-wrap: anywhere; }
p, li, dd { overflow-wrap: anywhere; }
a { color: var(--accent); }
.note { color: var(--muted); }
.alert { background: var(--warn-bg); border-left: 4px solid var(--warn-line); padding: .5rem .75rem; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; margin: 0; }
.facts dt { font-weight: 600; }
.facts dd { margin: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(18rem, 1fr)); gap: 1rem; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: .75rem 1rem; }
.card h2 { margin-top: 0; }
figure.plot { margin: 1rem 0; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 21rem), 1fr));
  gap: .5rem 1rem; align-items: start; }
.figs figure.plot { margin: .5rem 0; }
figure.plot img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .3rem; }
.table-wrap { overflow-x: auto; margin: .5rem 0 1rem; }
table { border-collapse: collapse; font-size: .9rem; min-width: 50%; }
caption { text-align: left; color: var(--muted); padding-bottom: .25rem; }
th, td { border: 1px solid var(--line); padding: .3rem .5rem; text-align: left; vertical-align: top; }
thead th { background: var(--panel); }
table.sxs { min-width: 0; }
table.sxs th, table.sxs td { padding: .25rem; text-align: center; }
table.sxs th[scope="row"] { white-space: nowrap; }
table.sxs td.seed { width: 6.5rem; min-width: 4rem; max-width: 6.5rem; text-align: left; font-size: .75rem;
  line-height: 1.3; overflow-wrap: anywhere; word-break: break-all; }
table.sxs td.seed code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
table.sxs td.none { color: var(--muted); vertical-align: middle; }
figure.shot { position: relative; display: block; width: 9rem; margin: 0 auto; line-height: 0; }
figure.shot img { display: block; width: 100%; height: auto; outline: 1px solid var(--line);
  background: var(--panel); }
figure.shot img.px { image-rendering: pixelated; }
svg.faces { position: absolute; left: 0; top: 0; width: 100%; height: 100%; overflow: visible;
  pointer-events: none; }
svg.faces rect { fill: none; stroke: #ffd21f; stroke-width: 2px; filter: drop-shadow(0 0 1px #000); }
svg.faces rect.more { stroke-dasharray: 4 3; }
figure.shot figcaption { position: absolute; left: 0; right: 0; bottom: 0; margin: 0; padding: .1rem .25rem;
  font-size: .72rem; line-height: 1.25; text-align: left; color: #fff; background: rgba(0, 0, 0, .62);
  overflow-wrap: anywhere; }
figure.shot figcaption .nf { display: block; color: #ffe58a; }
.pair { display: flex; gap: .5rem; align-items: flex-start; }
.pair figure { margin: 0; width: 88px; }
.pair img { width: 88px; height: auto; image-rendering: pixelated; border: 1px solid var(--line); }
.dups { display: grid; grid-template-columns: repeat(auto-fill, minmax(15rem, 1fr)); gap: 1rem; }
footer { color: var(--muted); font-size: .85rem; border-top: 1px solid var(--line); padding: 1rem;
  text-align: center; }
@media (max-width: 40rem) {
  main { padding: .6rem; }
  h1 { font-size: 1.3rem; }
  .facts { grid-template-columns: 1fr; }
  .facts dd { margin-bottom: .4rem; }
  .cards { grid-template-columns: 1fr; }
  figure.shot { width: 5.5rem; }
  table.sxs td.seed { width: 4.5rem; max-width: 4.5rem; }
  table { font-size: .8rem; }
}
"""
