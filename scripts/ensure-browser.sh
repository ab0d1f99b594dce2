#!/usr/bin/env bash
# Installs headless Chromium (Debian package chromium) for tests/test_report_browser.py, which opens a run's
# report.html in it. Optional: without it that test skips with a reason, so this never fails the set-up.
set -uo pipefail
BROWSER=/usr/bin/chromium
if [ -x "$BROWSER" ]; then exit 0; fi
CMD="apt-get update && apt-get install -y chromium"
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "Chromium is missing (the report.html browser test uses it): running '$CMD'"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then exit 0; fi
  echo "Could not install chromium; tests/test_report_browser.py will skip." >&2
else
  echo "Chromium is missing, so tests/test_report_browser.py will skip. Install it with: sudo $CMD" >&2
fi
exit 0
