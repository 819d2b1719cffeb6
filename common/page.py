"""A report page: headings, paragraphs, tables, code, numbered figures and a box of things to do, rendered twice, as
Markdown and as HTML (report.py builds the coursework report with it). Every path of this machine in the text is
shown relative (`folders`: absolute prefix -> what to show), so the page can be handed in as it is. Imports no torch.
"""
from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

from .errors import UserError


class Report:
    """The page's blocks, (kind, *parts) with a caption last for tables and figures, in page order."""

    def __init__(self, build_dir: Path, folders: dict[str, str]):
        self.blocks, self.build_dir = [], build_dir
        self.folders = sorted(folders.items(), key=lambda item: -len(item[0]))  # the longest prefix first
        (build_dir / "figures").mkdir(parents=True)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def table(self, header: list[str], rows: list[list[str]], caption: str) -> None:
        self.blocks.append(("table", header, rows, caption))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text.rstrip("\n")))

    def figure(self, source: Path, name: str, caption: str) -> None:
        """Copy `source` to figures/<name> and show it. A missing source is an error, not a silent gap."""
        if not source.exists():
            raise UserError(f"{source} is missing: run the report without --no-analysis (or the analysis "
                            f"script on {source.parent.parent})")
        shutil.copyfile(source, self.build_dir / "figures" / name)
        self.blocks.append(("figure", f"figures/{name}", name.removesuffix(".png").replace("_", " "), caption))

    def relative(self, part):
        """Text (or lists of it: table rows, the box's items) with every folder of this machine shown relative."""
        if isinstance(part, list):
            return [self.relative(item) for item in part]
        if isinstance(part, str):
            for absolute, shown in self.folders:
                part = part.replace(absolute, shown)
        return part

    def numbered(self) -> list[tuple]:
        """The blocks with paths shown relative, and figures and tables numbered in the order they appear
        ("Figure 3. caption"; a block inserted early, such as the key numbers, numbers the rest after it)."""
        counts, out = {"figure": 0, "table": 0}, []
        for kind, *parts in self.blocks:
            parts = self.relative(parts)
            if kind in counts:
                counts[kind] += 1
                parts[-1] = f"{kind.title()} {counts[kind]}. {parts[-1]}"
            out.append((kind, *parts))
        return out

    def markdown(self) -> str:
        def row(cells: list[str]) -> str:
            return "| " + " | ".join(cells) + " |"

        render = {
            "heading": lambda level, text: "#" * level + " " + text,
            "para": lambda text: text,
            "table": lambda header, rows, caption: "\n".join(
                [row(header), "|" + " --- |" * len(header)] + [row(cells) for cells in rows]) + f"\n\n{caption}",
            "code": lambda text: f"```python\n{text}\n```",
            "box": lambda title, items: "\n".join([f"> **{title}**", ">"] + [f"> - {item}" for item in items]),
            "figure": lambda path, alt, caption: f"![{alt}]({path})\n\n*{caption}*"}
        return "\n\n".join(render[kind](*parts) for kind, *parts in self.numbered()) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:  # `code` and **bold**, the only Markdown used in the text
            text = html.escape(text)
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
            return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

        def row(tag: str, cells: list[str]) -> str:
            return "<tr>" + "".join(f"<{tag}>{inline(cell)}</{tag}>" for cell in cells) + "</tr>"

        render = {
            "heading": lambda level, text: f"<h{level}>{inline(text)}</h{level}>",
            "para": lambda text: f"<p>{inline(text)}</p>",
            "table": lambda header, rows, caption: (f"<table><thead>{row('th', header)}</thead><tbody>"
                                                    + "".join(row("td", cells) for cells in rows)
                                                    + f"</tbody></table><p>{inline(caption)}</p>"),
            "code": lambda text: f"<pre><code>{html.escape(text)}</code></pre>",
            "box": lambda title, items: (f'<aside class="todo"><strong>{inline(title)}</strong><ul>'
                                         + "".join(f"<li>{inline(item)}</li>" for item in items) + "</ul></aside>"),
            "figure": lambda path, alt, caption: (f'<figure><img src="{html.escape(path)}" alt="{html.escape(alt)}">'
                                                  f"<figcaption>{inline(caption)}</figcaption></figure>")}
        body = "\n".join(render[kind](*parts) for kind, *parts in self.numbered())
        style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.45}"
                 "img{max-width:100%;max-height:900px;height:auto}figure{margin:1.5em 0}"
                 "figcaption{font-style:italic;color:#333}"
                 "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}"
                 "code{background:#f2f2f2;padding:0 .2em}pre{background:#f2f2f2;padding:.6em;overflow-x:auto}"
                 "pre code{padding:0}.todo{border:2px solid #c60;background:#fff6ec;padding:.6em 1em;margin:1em 0}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                f"</title><style>{style}</style></head>\n<body>\n{body}\n</body></html>\n")
