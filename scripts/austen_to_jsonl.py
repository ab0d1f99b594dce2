"""Convert janeaustenr's R lazy-load database (data/Rdata.rdx + Rdata.rdb) into one JSONL file per novel.

Usage: python scripts/austen_to_jsonl.py <janeaustenr data folder> <output folder>   (needs PyPI rdata; R is not)

The .rdx index is a gzip-compressed RDS object listing each variable's (offset, length) in the .rdb; each object
there is 4 bytes of big-endian uncompressed length followed by a zlib stream of an RDS serialisation. Each novel is a
character vector with one line of text per element; lines are joined into paragraphs at blank lines (whitespace
collapsed) and written as ``{"text": paragraph}`` lines to ``<output>/<novel>.jsonl``. Prints the counts."""

import gzip
import json
import struct
import sys
import warnings
import zlib
from pathlib import Path

import rdata


def _rds(raw: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": it is one
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def main(src: Path, out: Path) -> None:
    index = _rds(gzip.decompress((src / "Rdata.rdx").read_bytes()))
    db = (src / "Rdata.rdb").read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    total_words = 0
    for name, (off, length) in sorted(index["variables"].items()):
        blob = db[int(off): int(off) + int(length)]
        size = struct.unpack(">I", blob[:4])[0]
        raw = zlib.decompress(blob[4:])
        if len(raw) != size:
            raise SystemExit(f"{name}: {len(raw)} bytes decompressed, the index says {size}")
        lines = [str(s) for s in _rds(raw)]
        paragraphs, cur = [], []
        for line in lines + [""]:
            if line.strip():
                cur.append(line.strip())
            elif cur:
                paragraphs.append(" ".join(" ".join(cur).split()))
                cur = []
        words = sum(len(p.split()) for p in paragraphs)
        total_words += words
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs),
                                           encoding="utf-8")
        print(f"{name}: {len(lines)} lines, {len(paragraphs)} paragraphs, {words} words")
    print(f"austen: {len(index['variables'])} novels, {total_words} words")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
