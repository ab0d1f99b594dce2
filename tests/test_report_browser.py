"""report.html of a real run, opened in headless Chromium: the results table and both figures load and show.

Two looks at the page: a copy of it with a small script appended (in the run folder, so the figures' relative paths
resolve as they do for the report) writes what the browser made of each image (loaded? natural size? laid-out box?)
and of the table into the DOM, which ``--dump-dom`` prints after the load event; and a screenshot of the report
itself, whose pixels must not be blank where the browser put the table and the images.
"""

import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from attar.cli import app
from conftest import digits_kd_recipe

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium is not installed (/usr/bin/chromium: `apt-get install -y chromium`; `make test` "
           "installs it when run as root)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,2400", "--force-device-scale-factor=1"]

RECIPE = digits_kd_recipe("browser")

PROBE = """<pre id="attar-probe"></pre><script>
window.addEventListener("load", () => {
  const box = e => { const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  const shown = e => { const s = getComputedStyle(e); return s.display !== "none" && s.visibility === "visible"
                                                              && parseFloat(s.opacity) > 0; };
  document.getElementById("attar-probe").textContent = JSON.stringify({
    imgs: [...document.images].map(i => ({src: i.getAttribute("src"), complete: i.complete,
                                          natural: [i.naturalWidth, i.naturalHeight], box: box(i), shown: shown(i)})),
    tables: [...document.querySelectorAll("table")].map(t => ({box: box(t), rows: t.rows.length, shown: shown(t)})),
  });
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)  # a fresh profile each time
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90)


def _probe(tmp_path: Path, report: Path) -> dict:
    page = report.with_name("probe.html")
    page.write_text(report.read_text().replace("</body>", PROBE + "\n</body>"))
    res = _chromium(tmp_path, "--dump-dom", page.as_uri())
    m = re.search(r'<pre id="attar-probe">(.*?)</pre>', res.stdout, re.S)
    assert m and m.group(1), f"Chromium printed no probe (rc {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(m.group(1))


def _not_blank(shot: Image.Image, b: dict) -> bool:
    """The region ``b`` of the screenshot has real content: many colours, and a fair share of non-white pixels."""
    region = shot.crop((int(b["x"]), int(b["y"]), int(b["x"] + b["w"]), int(b["y"] + b["h"]))).convert("L")
    hist = region.histogram()
    dark = sum(hist[:200]) / max(1, sum(hist))
    return sum(1 for n in hist if n) > 20 and dark > 0.01


def test_report_html_renders_table_and_figures(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    home = tmp_path / "home"
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--home", str(home), "--quiet"])
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in home.iterdir() if (p / "run.json").exists()]
    report = run_dir / "report.html"

    got = _probe(tmp_path, report)
    (table,) = got["tables"]
    assert table["shown"] and table["rows"] == 3 and table["box"]["w"] > 300 and table["box"]["h"] > 40
    assert sorted(i["src"] for i in got["imgs"]) == ["accuracy_vs_params.png", "learning_curves.png"]
    for img in got["imgs"]:
        assert img["complete"] and img["natural"][0] > 100 and img["natural"][1] > 100, img  # 0: broken image
        assert img["shown"] and img["box"]["w"] > 100 and img["box"]["h"] > 100, img
        assert img["box"]["x"] >= 0 and img["box"]["x"] + img["box"]["w"] <= 1280, img  # inside the page width

    shot_path = tmp_path / "shot.png"
    res = _chromium(tmp_path, f"--screenshot={shot_path}", report.as_uri())
    assert shot_path.exists(), f"no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    with Image.open(shot_path) as shot:
        shot.load()
    assert shot.size == (1280, 2400)
    for b in [table["box"]] + [i["box"] for i in got["imgs"]]:
        assert b["y"] + b["h"] <= shot.size[1], b  # all on the screenshot
        assert _not_blank(shot, b), b
    # the check sees a broken figure: without its PNG the browser reports a natural width of 0
    (run_dir / "learning_curves.png").unlink()
    broken = {i["src"]: i for i in _probe(tmp_path, report)["imgs"]}
    assert broken["learning_curves.png"]["natural"][0] == 0 and broken["accuracy_vs_params.png"]["natural"][0] > 0
