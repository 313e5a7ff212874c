"""Tests of probe.html: report.html for runs and comparisons, in the page source and in a
real browser (headless Chromium over the DevTools protocol, without any Python package)."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

import probe
from conftest import make_image, make_tree
from probe.cli import main
from probe.html import REPORT_FILE, Caps, esc, render_comparison, script_json, write_report
from probe import run_files
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
    assert page.count("data:image/png;base64,") == 3  # confusion matrix, reliability, C sweep
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


def test_thumbnails_decoded_on_threads_equal_those_decoded_one_by_one(hostile_run, tmp_path):
    from probe.html import load_run_inputs, thumbnail_uri

    inputs = load_run_inputs(hostile_run.path)
    root = Path(inputs.config["dataset_root"])
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    paths.append("test/fox/fox_5.JPEG")  # deleted by the fixture
    inputs.prefetch(paths + paths[:3], 64)
    assert list(inputs.thumbnails) == list(dict.fromkeys(paths))
    for path in paths:
        assert inputs.thumbnails[path] == thumbnail_uri(root / path, 64)
    assert inputs.thumbnails["test/fox/fox_5.JPEG"] == (None, "file not found")
    assert inputs.thumbnails["train/fox/broken.jpg"][0] is None


def test_script_json_can_not_close_its_script_element():
    text = script_json({"p": "</script><script>alert(1)</script>", "q": "<!--<script>"})
    assert "<" not in text and json.loads(text)["p"].startswith("</script>")
    assert json.loads(text)["q"] == "<!--<script>"


# --- values from files that try to become markup ---------------------------------------

# each breaks out of a text node, an attribute value and a <script> element in turn
PAYLOAD = '"><img src=x onerror=alert(1)><script>alert(2)</script><!--'
QUOTED_PATH = 'test/cat/a" onmouseover="alert(3)" x=".jpg'


class Elements(HTMLParser):
    """Every start tag of a page with its attributes, as a browser would parse them."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)

    def shapes(self) -> set[tuple[str, frozenset[str]]]:
        return {(tag, frozenset(attrs)) for tag, attrs in self.tags}


def hostile_copy(run, tmp_path: Path, monkeypatch) -> Path:
    """A copy of `run` (and of its cache) whose metrics.json, test_predictions.csv and
    <cache>.duplicates.json hold PAYLOAD where numbers, names and paths belong. The report's
    escaping is the second line of defence: the first (the run's manifest, and metrics.json's
    types checked on reading) is passed here, so that values of any type reach the page."""
    monkeypatch.setattr(run_files, "METRICS_SHAPE", run_files.OBJECT)
    from probe.duplicates import SIDECAR_SUFFIX, cached_duplicates
    from probe.features.cache import FeatureCache

    run_dir = tmp_path / "run"
    shutil.copytree(run.path, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    cache_path = tmp_path / "cache.h5"
    shutil.copy(config["cache"], cache_path)
    config["cache"] = str(cache_path)
    (run_dir / "config.json").write_text(json.dumps(config))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.update(accuracy=PAYLOAD, log_loss=PAYLOAD, balanced_accuracy=float("inf"),
                   macro_f1_ci=[PAYLOAD, 1.0], n_samples=PAYLOAD, split_role=PAYLOAD)
    first = next(iter(metrics["per_class"]))
    metrics["per_class"][first].update(precision=PAYLOAD, support=PAYLOAD)
    metrics["per_class"][PAYLOAD] = {"precision": 0.5, "recall": PAYLOAD, "f1": None, "support": 1}
    metrics["skipped_files"] = [{"path": QUOTED_PATH, "reason": PAYLOAD}]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))

    with open(run_dir / "test_predictions.csv", "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow([QUOTED_PATH, PAYLOAD, "cat", "0.9", "0.05", "0.05"])

    cache = FeatureCache.open(cache_path)
    cached_duplicates(cache)  # the sidecar, keyed by the copy's size and time
    sidecar = cache_path.with_name(cache_path.name + SIDECAR_SUFFIX)
    stored = json.loads(sidecar.read_text())
    found = stored["result"]
    found["counts"].update(pairs=PAYLOAD, cross_split_pairs=PAYLOAD)
    found.update(n_images=PAYLOAD, threshold=PAYLOAD)
    pair = found["pairs"][0]
    pair["first"].update(path=QUOTED_PATH, label=PAYLOAD, split=PAYLOAD)
    pair["similarity"] = PAYLOAD
    sidecar.write_text(json.dumps(stored))
    write_manifest(run_dir)
    return run_dir


def test_values_from_files_are_escaped_wherever_they_land(hostile_run, tmp_path, monkeypatch):
    page = write_report(hostile_copy(hostile_run, tmp_path, monkeypatch)).read_text(
        encoding="utf-8")
    baseline = Elements((hostile_run.path / REPORT_FILE).read_text(encoding="utf-8"))
    parsed = Elements(page)
    # no element, and no attribute on an element, that the clean page does not have
    assert parsed.shapes() <= baseline.shapes(), parsed.shapes() - baseline.shapes()
    assert [tag for tag, _ in parsed.tags].count("script") == 2  # the map's data, the page's own
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    # each payload is shown as text: metrics, a class's precision, its name, the duplicates
    assert page.count(esc(PAYLOAD)) >= 12
    assert "inf" in page  # a non-finite score is shown as text too
    titles = [attrs.get("title") for _, attrs in parsed.tags]
    assert titles.count(QUOTED_PATH) >= 2  # the mistake's card and the duplicate's


@pytest.mark.parametrize("name", ["run", "comparison"])
def test_the_policy_allows_only_the_pages_own_script_and_style(hostile_run, tmp_path, name):
    page = ((hostile_run.path / REPORT_FILE).read_text(encoding="utf-8") if name == "run"
            else render_comparison(comparison_dir(tmp_path)))
    parsed = Elements(page)
    policy = next(attrs["content"] for tag, attrs in parsed.tags
                  if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy")
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"

    def sha256(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    own = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    assert len(own) == 1 and directives["script-src"] == sha256(own[0])
    style = re.findall(r"<style>(.*?)</style>", page, flags=re.S)
    assert len(style) == 1 and directives["style-src"] == sha256(style[0])
    assert not any("style" in attrs for _, attrs in parsed.tags)  # the policy refuses style=""


def comparison_dir(tmp_path: Path) -> Path:
    """A comparison directory whose compare.csv holds PAYLOAD, and a run with a quote in
    its name."""
    directory = tmp_path / "comparison"
    run = directory / 'run-"quoted"><b>'
    run.mkdir(parents=True)
    (run / REPORT_FILE).write_text("<!DOCTYPE html>")
    columns = ["rank", "backbone", "head", "accuracy", "balanced_accuracy", "macro_f1",
               "feature_size", "images_per_second", "fit_seconds", "status", "error", "run", "split"]
    with open(directory / "compare.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerow({**{c: PAYLOAD for c in columns}, "run": str(run)})
    return directory


def test_comparison_page_escapes_its_csv(tmp_path):
    directory = comparison_dir(tmp_path)
    parsed = Elements(render_comparison(directory))
    assert [tag for tag, _ in parsed.tags].count("script") == 1
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    assert {tag for tag, _ in parsed.tags} <= {"html", "head", "meta", "link", "title", "style",
                                               "body", "h1", "nav", "a", "section", "h2", "p",
                                               "table", "tr", "th", "td", "script"}
    links = [attrs["href"] for tag, attrs in parsed.tags if tag == "a" and "#" not in attrs["href"]]
    assert links == ["run-%22quoted%22%3E%3Cb%3E/report.html"]


def test_comparison_page_shows_intervals_the_paired_test_and_the_curves(tmp_path):
    directory = tmp_path / "comparison"
    directory.mkdir()
    for name in ("compare.png", "curve.png"):
        make_image(directory / name, seed=1, fmt="PNG")
    rows = [{"rank": "1", "backbone": "vgg16", "head": "logreg", "accuracy": "0.0916667",
             "accuracy_ci": "0.0412 0.18913", "tied": "best", "p_value_vs_best": "",
             "balanced_accuracy": "0.5", "balanced_accuracy_ci": "0.25 0.75",
             "macro_f1": "0.333333", "fit_seconds": "1.23456",
             "images_per_second": "12.3456", "status": "ok", "split": "test"},
            {"rank": "2", "backbone": "vgg16", "head": "knn", "accuracy": "0.05",
             "accuracy_ci": "0.01 0.1", "tied": "no", "p_value_vs_best": "0.000123",
             "balanced_accuracy": "0.5", "macro_f1": "0.3", "status": "ok", "split": "test"},
            {"rank": "3", "backbone": "resnet50", "head": "knn", "accuracy": "0.04",
             "accuracy_ci": "0.01 0.1", "tied": "yes", "p_value_vs_best": "0.0612",
             "balanced_accuracy": "0.5", "macro_f1": "0.3", "status": "ok", "split": "test"}]
    with open(directory / "compare.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    page = render_comparison(directory)
    assert "0.0916667" not in page and "<td>0.0917</td>" in page  # formatted, not raw
    assert "<td>[0.041, 0.189]</td>" in page and "<td>1.23</td>" in page and "<td>12.3</td>" in page
    assert "<th>tied</th><th>p vs best</th>" in page
    assert "<td>0.5000 [0.250, 0.750]</td><td>0.3333</td>" in page  # the other intervals too
    assert "<td>best</td><td>-</td>" in page and "<td>no</td><td>&lt;0.001</td>" in page
    assert "<td>yes</td><td>0.061</td>" in page and "McNemar" in page
    parsed = Elements(page)
    assert [attrs.get("alt") for tag, attrs in parsed.tags if tag == "img"] == [
        "comparison chart", "label-efficiency curves"]
    assert '<section id="curves">' in page and 'href="#curves"' in page


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


@needs_chromium
def test_no_value_from_a_file_runs_in_chromium(hostile_run, tmp_path, monkeypatch):
    """The page with PAYLOAD everywhere loads without an error: no injected script or
    handler even got as far as being refused by the policy (a refusal is a console error)."""
    report = write_report(hostile_copy(hostile_run, tmp_path, monkeypatch))
    found, problems = open_in_chromium(report, tmp_path / "profile")
    assert problems == []
    assert found["sections"] == SECTIONS and found["hover"]["shown"]


# --- terminal output of text from files ------------------------------------------------

OSC = "\x1b]52;c;b3duZWQ=\x07"  # an OSC 52 sequence: writes to the clipboard


def test_fit_prints_no_escape_sequence_from_a_file(hostile_run, tmp_path):
    """<cache>.duplicates.json and a path with escape sequences: `probe fit` shows them as
    visible escapes, on stdout and stderr alike. (A class name is no different: fit prints
    it only inside such messages; the cache's checksums keep a test from editing one in.)"""
    from probe.duplicates import CALIBRATED, SIDECAR_SUFFIX

    cache = tmp_path / "cache.h5"
    shutil.copy(hostile_run.config["cache"], cache)
    stat = cache.stat()
    sidecar = {"key": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "threshold": CALIBRATED},
               "result": {"pairs": [], "groups": [], "n_images": 1, "threshold": 0.98,
                          "counts": {"pairs": 1, "cross_split_pairs": f"1{OSC}",
                                     f"train-test{OSC}": 1}}}
    cache.with_name(cache.name + SIDECAR_SUFFIX).write_text(json.dumps(sidecar))
    result = CliRunner().invoke(main, ["fit", "--cache", str(cache), "--no-report", "--head", "knn",
                                       "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "cross splits" in result.output
    assert "\\x1b]52;c;b3duZWQ=\\x07" in result.output  # shown, escaped
    assert not any(c in result.output for c in "\x1b\x07\r")
    # the one-line error printer: a path from the command line or a file
    result = CliRunner().invoke(main, ["fit", "--cache", str(tmp_path / f"no{OSC}.h5")])
    assert result.exit_code == 1 and "\\x1b]52;c;b3duZWQ=\\x07" in result.output
    assert "\x1b" not in result.output and result.output.count("\n") == 1


def test_terminal_text_escapes_controls_but_keeps_text():
    from probe.terminal import terminal_text

    assert terminal_text(f"a{OSC}b\tc\nd\u202ee\x9bf") == "a\\x1b]52;c;b3duZWQ=\\x07b\\tc\\nd\\u202ee\\x9bf"
    assert terminal_text("table\nrow", newlines=True) == "table\nrow"
    assert terminal_text(os.fsdecode(b"caf\xe9 \xc3\xa9")) == "caf\\xe9 é"
