"""A report page: headings, paragraphs, tables, code, numbered figures and a box of things to do, rendered twice, as
Markdown and as HTML (report.py builds the coursework report with it). Every path of this machine in the text is
shown relative, so the page can be handed in as it is. Imports no torch.
"""
from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

from .errors import UserError


class Report:
    """Blocks of text, tables, code and figures, rendered as Markdown and HTML. Every path of this machine in the
    text is shown relative (`folders`: absolute prefix -> what to show), so the report can be handed in as it is."""

    def __init__(self, build_dir: Path, folders: dict[str, str]):
        self.blocks, self.build_dir = [], build_dir
        self.folders = sorted(folders.items(), key=lambda item: -len(item[0]))  # the longest prefix first
        (build_dir / "figures").mkdir(parents=True)

    def relative(self, text: str) -> str:
        for absolute, shown in self.folders:
            text = text.replace(absolute, shown)
        return text

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def table(self, header: list[str], rows: list[list[str]], caption: str) -> None:
        """A table, then its caption, numbered in page order when rendered ("Table 2. caption")."""
        self.blocks.append(("table", header, rows, caption))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text.rstrip("\n")))

    def figure(self, source: Path, name: str, caption: str) -> None:
        """Copy `source` to figures/<name> and show it, numbered in page order when rendered ("Figure 3. caption").
        A missing source is an error, not a silent gap."""
        if not source.exists():
            raise UserError(f"{source} is missing: run the report without --no-analysis (or the analysis "
                            f"script on {source.parent.parent})")
        shutil.copyfile(source, self.build_dir / "figures" / name)
        self.blocks.append(("figure", f"figures/{name}", caption, name.removesuffix(".png").replace("_", " ")))

    def numbered(self) -> list[tuple]:
        """The blocks with paths shown relative, and figures and tables numbered in the order they appear (a block
        inserted early, such as the key numbers, numbers the rest after it)."""
        counts, out = {"figure": 0, "table": 0}, []
        for block in self.blocks:
            block = [self.relative(part) if isinstance(part, str) else part for part in block]
            if block[0] in counts:
                counts[block[0]] += 1
                at = 2 if block[0] == "figure" else 3  # the caption
                block[at] = f"{block[0].title()} {counts[block[0]]}. {block[at]}"
            out.append(block)
        return out

    def markdown(self) -> str:
        out = []
        for block in self.numbered():
            if block[0] == "heading":
                out.append("#" * block[1] + " " + block[2])
            elif block[0] == "para":
                out.append(block[1])
            elif block[0] == "table":
                header, rows = block[1], block[2]
                out.append("\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                                     + ["| " + " | ".join(map(self.relative, row)) + " |" for row in rows])
                           + f"\n\n{block[3]}")
            elif block[0] == "code":
                out.append(f"```python\n{block[1]}\n```")
            elif block[0] == "box":
                out.append("\n".join([f"> **{block[1]}**", ">"] + [f"> - {self.relative(item)}" for item in block[2]]))
            else:
                out.append(f"![{block[3]}]({block[1]})\n\n*{block[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:  # `code` and **bold**, the only Markdown used in the text
            text = html.escape(text)
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
            return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

        body = []
        for block in self.numbered():
            if block[0] == "heading":
                body.append(f"<h{block[1]}>{inline(block[2])}</h{block[1]}>")
            elif block[0] == "para":
                body.append(f"<p>{inline(block[1])}</p>")
            elif block[0] == "table":
                head = "".join(f"<th>{inline(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{inline(self.relative(c))}</td>" for c in row) + "</tr>"
                               for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
                            f"<p>{inline(block[3])}</p>")
            elif block[0] == "code":
                body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
            elif block[0] == "box":
                items = "".join(f"<li>{inline(self.relative(item))}</li>" for item in block[2])
                body.append(f'<aside class="todo"><strong>{inline(block[1])}</strong><ul>{items}</ul></aside>')
            else:
                body.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[3])}">'
                            f"<figcaption>{inline(block[2])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.45}"
                 "img{max-width:100%;max-height:900px;height:auto}figure{margin:1.5em 0}"
                 "figcaption{font-style:italic;color:#333}"
                 "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}"
                 "code{background:#f2f2f2;padding:0 .2em}pre{background:#f2f2f2;padding:.6em;overflow-x:auto}"
                 "pre code{padding:0}.todo{border:2px solid #c60;background:#fff6ec;padding:.6em 1em;margin:1em 0}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                f"</title><style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
