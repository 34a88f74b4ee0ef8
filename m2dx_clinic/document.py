"""A small document model rendered both as Markdown and as a self-contained HTML page.

The model card and the checkpoint report are read in two ways: as text in a repository or a chat
(Markdown) and in a browser with the figures (HTML). Writing each document once, as a list of
blocks, keeps the two renderings saying exactly the same thing.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

CSS = (
    "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;line-height:1.45;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td.t,th.t{text-align:left}"
    "th{background:#f3f3f3}tr.rec{background:#e6f4e6;font-weight:bold}tr.err{background:#fbe3e3}"
    "tr.warn{background:#fff6d6}.warning{color:#8a5a00}figure{margin:1em 0}"
    "figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:13px;color:#555}"
    "dt{font-weight:bold;margin-top:.4em}dd{margin-left:1.2em}"
)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)  # HTML class per row ("rec", "warn", "err" or "")
    text_columns: tuple[int, ...] = (0,)  # left-aligned columns


@dataclass
class Document:
    """Blocks in order: ("h", level, text), ("p", text), ("ul", items), ("warn", items), ("table", Table),
    ("img", file, caption), ("dl", [(term, definition)])."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> "Document":
        self.blocks.append(("h", level, text))
        return self

    def paragraph(self, text: str) -> "Document":
        self.blocks.append(("p", text))
        return self

    def bullets(self, items: Sequence[str]) -> "Document":
        if items:
            self.blocks.append(("ul", list(items)))
        return self

    def warnings(self, items: Sequence[str]) -> "Document":
        if items:
            self.blocks.append(("warn", list(items)))
        return self

    def table(self, table: Table) -> "Document":
        self.blocks.append(("table", table))
        return self

    def image(self, file: str, caption: str) -> "Document":
        self.blocks.append(("img", file, caption))
        return self

    def definitions(self, items: Sequence[tuple[str, str]]) -> "Document":
        self.blocks.append(("dl", list(items)))
        return self

    # ------------------------------------------------------------------ renderings
    def markdown(self) -> str:
        def cell(text: str) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif kind == "p":
                lines += [block[1], ""]
            elif kind in ("ul", "warn"):
                prefix = "- **warning:** " if kind == "warn" else "- "
                lines += [prefix + item for item in block[1]] + [""]
            elif kind == "table":
                t: Table = block[1]
                lines += ["| " + " | ".join(cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows] + [""]
            elif kind == "img":
                lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
            elif kind == "dl":
                lines += [f"- **{term}**: {text}" for term, text in block[1]] + [""]
        return "\n".join(lines).rstrip() + "\n"

    def html(self) -> str:
        e = html.escape
        parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
                 f"<title>{e(self.title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append(f"<h{block[1]}>{e(block[2])}</h{block[1]}>")
            elif kind == "p":
                parts.append(f"<p>{e(block[1])}</p>")
            elif kind in ("ul", "warn"):
                css = " class='warning'" if kind == "warn" else ""
                prefix = "warning: " if kind == "warn" else ""
                parts.append(f"<ul{css}>" + "".join(f"<li>{e(prefix + item)}</li>" for item in block[1]) + "</ul>")
            elif kind == "table":
                t = block[1]
                head = "".join(f"<th class='t'>{e(h)}</th>" if i in t.text_columns else f"<th>{e(h)}</th>"
                               for i, h in enumerate(t.header))
                rows = []
                for r, row in enumerate(t.rows):
                    css = t.row_classes[r] if r < len(t.row_classes) else ""
                    tds = "".join(f"<td class='t'>{e(str(c))}</td>" if i in t.text_columns else f"<td>{e(str(c))}</td>"
                                  for i, c in enumerate(row))
                    rows.append(f"<tr class='{css}'>{tds}</tr>")
                parts.append(f"<table><tr>{head}</tr>{''.join(rows)}</table>")
            elif kind == "img":
                parts.append(f"<figure><img src='{e(block[1])}' alt='{e(block[2])}'>"
                             f"<figcaption>{e(block[2])}</figcaption></figure>")
            elif kind == "dl":
                parts.append("<dl>" + "".join(f"<dt>{e(t)}</dt><dd>{e(d)}</dd>" for t, d in block[1]) + "</dl>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"
