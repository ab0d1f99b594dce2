"""Replace one marked section of a Markdown file, so several bench scripts can share one document."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: str | Path, key: str, body: str, title: str) -> None:
    path = Path(path)
    start, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else f"# {title}\n\n"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)
