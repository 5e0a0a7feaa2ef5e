"""The HTML report: self-contained, well-formed, and legible in a real browser where one is installed."""
import html.parser
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch

import fxopt
from models import Redundant


class Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    x = torch.randn(8, 8)
    model = Redundant().eval()

    def checksum(m):
        return float(m(x).sum())
    out = fxopt.compile(model, (x,), report=str(path), metric=checksum, latency_repeats=3)
    return out, path, path.read_text()


def test_report_is_self_contained(report):
    _, _, text = report
    p = Collector()
    p.feed(text)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    for name, value in p.attrs:
        if name in ("src", "href"):
            assert not re.match(r"(https?:)?//", value or ""), (name, value)
    assert "@import" not in text and "url(http" not in text


def test_report_contents(report):
    out, _, text = report
    h = out.fxopt_history
    for needle in ("Original vs final", "parameters", "model bytes", "FLOPs at the example sizes (s77=8)",
                   "latency on the example inputs", "metric: checksum", "Passes", h.pipeline,
                   "Graphs before and after each change", "max |error| vs original after each pass",
                   "parameters per top-level module", "FLOPs per op family"):
        assert needle in text, needle
    assert text.count("<details") == sum(1 for r in h.records if r.changed)


def test_every_svg_in_the_report_is_well_formed(report):
    _, _, text = report
    svgs = re.findall(r"<svg.*?</svg>", text, re.S)
    assert len(svgs) >= 4
    for svg in svgs:
        assert ET.fromstring(svg).tag.endswith("svg")


def test_history_report_method_and_rolled_back_pass(tmp_path):
    @fxopt.graph_pass("t-report-bad")
    def bad(gm, ctx):
        for n in gm.graph.nodes:
            if n.target is torch.ops.aten.relu.default:
                n.target = torch.ops.aten.sigmoid.default
                return True
        return False
    x = torch.randn(8, 8)
    with pytest.warns(UserWarning, match="t-report-bad"):
        out = fxopt.compile(Redundant().eval(), (x,), recipe="cleanup,t-report-bad")
    path = out.fxopt_history.report(str(tmp_path / "r.html"))
    text = open(path).read()
    assert "rolled-back" in text and "t-report-bad" in text and "changed the outputs" in text


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (.ci/run installs Debian's chromium)")
def test_report_renders_offline_in_headless_chromium(report, tmp_path):
    _, path, _ = report
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", f"file://{path}"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "Original vs final" in dom and "<svg" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1400,2000", f"file://{path}"],
                   capture_output=True, timeout=120)
    assert shot.exists()
    from PIL import Image
    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not a blank page
    assert os.path.getsize(shot) > 20_000
