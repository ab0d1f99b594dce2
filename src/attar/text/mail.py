"""The readable body of a raw e-mail (RFC 822 text): what a language model should read of a mail.

Decision: the headers (``From``, ``Received``, ``Message-ID``, ...) are dropped: they are routing noise, mostly
addresses, hashes and dates, and would dominate a model of mail text. The body is every ``text/plain`` part
(transfer encoding and charset decoded); a mail without one falls back to its ``text/html`` parts with tags,
scripts and styles removed. Attachments (images, signatures, other types) are skipped. Whitespace runs are kept
as they are inside lines, trailing spaces are cut and runs of blank lines become one blank line.
"""

from __future__ import annotations

import email
import re
from email import policy
from html.parser import HTMLParser


class _Text(HTMLParser):
    """The text of an HTML document (tags dropped, ``<script>``/``<style>`` skipped, blocks on their own lines)."""

    _BLOCK = {"p", "br", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self.skip:
            self.skip -= 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(data)


def html_text(html: str) -> str:
    p = _Text()
    try:
        p.feed(html)
        p.close()
    except Exception:  # noqa: BLE001 - broken markup in spam: keep what was read
        pass
    return "".join(p.out)


def _content(part) -> str:
    try:
        return str(part.get_content())
    except Exception:  # noqa: BLE001 - an unknown charset or a broken encoding: decode the raw bytes leniently
        raw = part.get_payload(decode=True) or b""
        return raw.decode("latin-1", errors="replace")


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def mail_body(raw: str) -> str:
    """The body of the raw mail ``raw`` without its headers (module doc); ``""`` when it has no text part."""
    msg = email.message_from_string(raw, policy=policy.default)
    parts = [p for p in msg.walk() if not p.is_multipart() and p.get_content_disposition() != "attachment"]
    plain = [_content(p) for p in parts if p.get_content_type() == "text/plain"]
    if any(t.strip() for t in plain):
        return _tidy("\n\n".join(plain))
    html = [html_text(_content(p)) for p in parts if p.get_content_type() == "text/html"]
    return _tidy("\n\n".join(html))
