"""Tests of probe.html: report.html for runs and comparisons, in the page source and in a
real browser (headless Chromium over the DevTools protocol, without any Python package)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import probe
from conftest import make_image, make_tree
from probe.cli import main
from probe.html import REPORT_FILE, Caps, esc, script_json, write_report
from probe.run_files import write_manifest

HOSTILE = '<b>"odd" & \'class\''  # a class folder name that must be escaped everywhere
SECTIONS = ["settings", "metrics", "plots", "mistakes", "map", "neighbours", "duplicates",
            "skipped"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_hostile_dataset(root: Path) -> Path:
    """Split folders, a hostile class name, a non-UTF-8 file name, an undecodable file, the
    same picture in train and in test, and a mislabelled test image."""
    make_tree(root, classes=("cat", HOSTILE, "fox"), per_class=12, splits=True)
    make_image(root / os.fsdecode(b"train/cat/caf\xe9-\xff.png"), seed=7)
    (root / "train" / "fox" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    shutil.copy(root / "train" / "cat" / "cat_0.jpg", root / "test" / "cat" / "leaked.jpg")
    # a fox filed as a cat: a mistake even when the classes' tints separate them perfectly
    make_image(root / "test" / "cat" / "fox_filed_as_cat.png", seed=999, tint=2)
    return root


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A logistic run (random-weight vgg16 at 32 px) on the hostile dataset; one image of
    its test split is deleted afterwards."""
    base = tmp_path_factory.mktemp("report")
    root = make_hostile_dataset(base / "images")
    cache = probe.extract(root, "vgg16", weights="none", image_size=32, cache_dir=base / "cache")
    run = probe.fit(cache, "logreg")
    (root / "test" / "fox" / "fox_5.JPEG").unlink()
    write_report(run.path)
    return run


def test_fit_writes_a_report_with_every_section(hostile_run):
    page = (hostile_run.path / REPORT_FILE).read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("data:image/png;base64,") == 2  # confusion matrix and C sweep
    assert "data:image/jpeg;base64," in page
    assert "file not found" in page  # the deleted test image
    assert "To keep this file small it shows at most 48 misclassified images" in page
    assert any("cross splits" in note for note in hostile_run.notes)


def test_report_escapes_every_string_from_data(hostile_run):
    page = (hostile_run.path / REPORT_FILE).read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert esc(HOSTILE) in page
    assert "caf\\xe9-\\xff.png" in page  # undecodable bytes shown, not dropped
    for script in re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S):
        assert "<b>" not in script and "</" not in script


def test_report_requests_nothing_from_outside(hostile_run):
    page = (hostile_run.path / REPORT_FILE).read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith(("data:", "#")) for s in sources)
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page  # the browser refuses any request the page makes


def test_report_shows_intervals_and_split_role_when_present(hostile_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(hostile_run.path, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.update(accuracy_ci=[0.4125, 0.8875], macro_f1_ci={"low": 0.31, "high": 0.72},
                   split_role="validation, used for selection")
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    write_manifest(run_dir)  # an edit the manifest would refuse, accepted once listed
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "[0.4125, 0.8875]" in page and "[0.3100, 0.7200]" in page
    assert "validation, used for selection" in page


def test_report_of_a_run_whose_cache_is_gone(hostile_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(hostile_run.path, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["cache"] = str(tmp_path / "missing.h5")
    (run_dir / "config.json").write_text(json.dumps(config))
    write_manifest(run_dir)
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert page.count("Unavailable: expected a feature cache file") == 3  # map, neighbours, duplicates
    assert '<section id="mistakes">' in page


def test_size_is_bounded_by_the_caps(hostile_run, tmp_path):
    small = write_report(hostile_run.path, out=tmp_path / "small.html",
                         caps=Caps(mistakes=1, neighbour_queries=1, map_thumbnails=0,
                                   duplicate_pairs=0))
    full = hostile_run.path / REPORT_FILE
    assert small.read_text().count("data:image/jpeg") < full.read_text().count("data:image/jpeg")
    assert small.stat().st_size < 0.5 * full.stat().st_size


def test_script_json_can_not_close_its_script_element():
    text = script_json({"p": "</script><script>alert(1)</script>"})
    assert "<" not in text and json.loads(text)["p"].startswith("</script>")


def test_report_command_and_refusal(hostile_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["report", str(hostile_run.path), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").stat().st_size > 10_000
    result = runner.invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert "expected a run directory" in result.output and "Traceback" not in result.output


def test_fit_no_report(separable_cache):
    result = CliRunner().invoke(main, ["fit", "--cache", str(separable_cache.path), "--no-report"])
    assert result.exit_code == 0, result.output
    run_dir = Path(result.output.strip().splitlines()[-1].removeprefix("Run: "))
    assert (run_dir / "metrics.json").is_file() and not (run_dir / REPORT_FILE).exists()


@pytest.mark.slow
def test_compare_report_ranks_and_links_each_run(tmp_path):
    root = make_tree(tmp_path / "images", per_class=8)
    result = probe.compare(root, "vgg16", "logreg,dense", weights="none", image_size=32,
                           head_params={"dense": {"epochs": 2}})
    page = (result.path / REPORT_FILE).read_text(encoding="utf-8")
    assert '<section id="ranking">' in page
    for record in result:
        link = f'{Path(record["run"]).name}/{REPORT_FILE}'
        assert f'href="{link}"' in page and (result.path / link).is_file()
    assert page.index(">logreg<") < page.index(">dense<") or result[0]["head"] == "dense"


# --- in a real browser ----------------------------------------------------------------


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fd 3: commands in,
    fd 4: replies and events out, NUL-separated JSON)."""

    def __init__(self, profile: Path):
        to_browser, self._writer = os.pipe()
        self._reader, from_browser = os.pipe()

        def wire():
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.process = subprocess.Popen([CHROMIUM, *flags], preexec_fn=wire, close_fds=False,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next = 0
        self.events: list[dict] = []

    def send(self, method: str, session: str | None = None, timeout: float = 300, **params):
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._writer, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._next, timeout)
        assert "error" not in reply, reply
        return reply.get("result", {})

    def wait(self, matches, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if matches(message):
                    return message
            assert time.monotonic() < deadline, "Chromium did not answer in time"
            chunk = os.read(self._reader, 1 << 16)
            assert chunk, "Chromium closed the pipe"
            self._buffer += chunk

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=300)
        except (AssertionError, OSError):
            pass
        try:
            self.process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._writer)
        os.close(self._reader)


CHECK_PAGE = """(async () => {
  const images = [...document.images];
  await Promise.all(images.map(i => i.decode().catch(() => null)));
  const circle = document.querySelector('#map-svg circle.wrong') || document.querySelector('#map-svg circle');
  let hover = null;
  if (circle) {
    circle.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 50, clientY: 50}));
    const tipImage = document.getElementById('map-tip-img');
    await tipImage.decode().catch(() => null);
    hover = {shown: !document.getElementById('map-tip').hidden,
             text: document.getElementById('map-tip-text').textContent,
             width: tipImage.naturalWidth};
  }
  return {sections: [...document.querySelectorAll('section')].map(s => s.id),
          images: images.length,
          undecoded: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
          circles: document.querySelectorAll('#map-svg circle').length,
          links: [...document.querySelectorAll('a[href]')].map(a => a.href),
          hover};
})()"""


def open_in_chromium(path: Path, profile: Path) -> tuple[dict, list[dict]]:
    """Load `path` from a file:// URL; return what CHECK_PAGE found and every console
    error, exception and network request the page made."""
    browser = DevTools(profile)
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session)
        url = path.resolve().as_uri()
        browser.send("Page.navigate", session, url=url)
        browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
        result = browser.send("Runtime.evaluate", session, expression=CHECK_PAGE,
                              awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        time.sleep(0.3)  # let late console messages arrive
        browser.send("Runtime.evaluate", session, expression="1")
        problems = []
        for event in browser.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                problems.append(event)
            elif method == "Runtime.exceptionThrown":
                problems.append(event)
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                problems.append(event)
            elif method == "Network.requestWillBeSent":
                requested = params["request"]["url"]
                if not requested.startswith("data:") and requested != url:
                    problems.append(event)
        return result["result"]["value"], problems
    finally:
        browser.close()


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); .ci/run installs it")


@needs_chromium
def test_report_renders_in_chromium(hostile_run, tmp_path):
    found, problems = open_in_chromium(hostile_run.path / REPORT_FILE, tmp_path / "profile")
    assert problems == []
    assert found["sections"] == SECTIONS
    assert found["images"] > 20 and found["undecoded"] == []
    assert found["circles"] > 20
    assert found["hover"]["shown"] and found["hover"]["width"] > 0
    assert "predicted" in found["hover"]["text"]


@needs_chromium
def test_chromium_check_sees_a_broken_image_and_a_request(hostile_run, tmp_path):
    """The browser check itself can fail: a corrupt data: image and a request for an
    external resource are both reported."""
    page = (hostile_run.path / REPORT_FILE).read_text(encoding="utf-8")
    broken = page.replace("data:image/jpeg;base64,/9j/", "data:image/jpeg;base64,AAAA", 1)
    broken = broken.replace("</body>", '<img alt="external" src="http://127.0.0.1:9/x.png"></body>')
    target = tmp_path / "broken.html"
    target.write_text(broken, encoding="utf-8")
    found, problems = open_in_chromium(target, tmp_path / "profile")
    assert len(found["undecoded"]) == 2
    assert problems  # the CSP refusal is a console error, the request an event
