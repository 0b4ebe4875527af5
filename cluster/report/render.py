"""The report's two files from its panels: ``report.md`` (figures linked) and ``report.html`` (figures
embedded, one file that opens anywhere). Both open with the panels' findings, then what the runs do not
allow, then each panel that was made."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from cluster.report.panel import Panel


def _findings(panels: list[Panel]) -> list[str]:
    return [finding for panel in panels for finding in panel.findings]


def _notes(panels: list[Panel], notes: list[str]) -> list[str]:
    return notes + [note for panel in panels for note in panel.notes]


def render_markdown(heading: str, summary: str, panels: list[Panel], notes: list[str]) -> str:
    lines = [f"# {heading}", "", summary, ""]
    if findings := _findings(panels):
        lines += ["## Findings", ""] + [f"- {finding}" for finding in findings] + [""]
    if notes := _notes(panels, notes):
        lines += ["## What the runs do not allow", ""] + [f"- {note}" for note in notes] + [""]
    for panel in (p for p in panels if p.shown):
        lines += [f"## {panel.title}", ""]
        if panel.figure:
            lines += [f"![{panel.title}]({panel.figure})", ""]
        for table in panel.tables:
            lines += [f"**{table.title}**", "", "| " + " | ".join(table.header) + " |",
                      "|" + "---|" * len(table.header)]
            lines += ["| " + " | ".join(row) + " |" for row in table.rows]
            lines.append("")
    return "\n".join(lines)


def render_html(heading: str, summary: str, panels: list[Panel], notes: list[str], out: Path) -> str:
    esc = html.escape
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(heading)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>{esc(heading)}</h1>", f"<p>{esc(summary)}</p>",
    ]
    if findings := _findings(panels):
        parts += ["<h2>Findings</h2><ul>"] + [f"<li>{esc(f)}</li>" for f in findings] + ["</ul>"]
    if notes := _notes(panels, notes):
        parts += ["<h2>What the runs do not allow</h2><ul>"] + [f"<li>{esc(n)}</li>" for n in notes] + ["</ul>"]
    for panel in (p for p in panels if p.shown):
        parts.append(f"<h2>{esc(panel.title)}</h2>")
        if panel.figure:
            encoded = base64.b64encode((out / panel.figure).read_bytes()).decode("ascii")
            parts.append(f'<img alt="{esc(panel.title)}" src="data:image/png;base64,{encoded}">')
        for table in panel.tables:
            parts.append(f"<table><caption>{esc(table.title)}</caption><tr>")
            parts += [f"<th>{esc(h)}</th>" for h in table.header]
            parts.append("</tr>")
            for row in table.rows:
                parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
