"""The README and the user guide in docs/: every command block marked runnable runs, every
relative link leads to a file and heading that exist, the README stays a short front door
with CI's test command, and the backbone table agrees with the registry.

A block is runnable when the line `<!-- runnable -->` comes right before its opening fence.
Its lines are `probe ...` commands (a trailing `# comment` and `\\` continuations allowed),
run in order, in-process through click's CliRunner, in a fresh directory per page where
`photos/` and `new_photos/` are small generated image folders and the cache is `./.probe/`.
An argument with `<...>` in it (`.probe/runs/<run>/`) stands for the newest file or
directory matching it with `*` in place of the `<...>`.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_image, make_tree

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^(```|~~~)")
PLACEHOLDER = re.compile(r"<[^<>/\s]+>")


def runnable_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the marker, the block's commands) for each marked block."""
    lines = text.splitlines()
    blocks = []
    for number, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        start = number + 1
        assert start < len(lines) and FENCE.match(lines[start]), (
            f"line {number + 1}: {MARKER} must come right before a fenced block")
        commands, pending = [], ""
        for body in lines[start + 1:]:
            if FENCE.match(body):
                break
            body = pending + body.strip()
            pending = ""
            if body.endswith("\\"):
                pending = body[:-1].rstrip() + " "
                continue
            if body and not body.startswith("#"):
                commands.append(body.removeprefix("$ "))
        blocks.append((number + 1, commands))
    return blocks


def command_arguments(command: str) -> list[str]:
    """The arguments after `probe`, comments dropped, placeholders resolved (in the cwd)."""
    words = shlex.split(command, comments=True)
    assert words and words[0] == "probe", f"a runnable block runs probe commands only: {command!r}"
    return [resolve(word) for word in words[1:]]


def resolve(word: str) -> str:
    """`word`, or the newest path matching it with `*` for each `<...>` placeholder."""
    if not PLACEHOLDER.search(word):
        return word
    pattern = PLACEHOLDER.sub("*", word)
    matches = sorted(Path.cwd().glob(pattern.rstrip("/")), key=lambda path: path.stat().st_mtime_ns)
    assert matches, f"nothing matches {word!r} (as {pattern!r}) in {sorted(Path.cwd().iterdir())}"
    return str(matches[-1].relative_to(Path.cwd())) + ("/" if word.endswith("/") else "")


def pages_with_blocks() -> list[Path]:
    return [page for page in PAGES if runnable_blocks(page.read_text(encoding="utf-8"))]


def make_workspace(directory: Path) -> None:
    """`photos/`: three classes in train/val/test folders (8/2/2 images each);
    `new_photos/`: three loose images."""
    make_tree(directory / "photos", per_class=12, splits=True)
    for i in range(3):
        make_image(directory / "new_photos" / f"new_{i}.jpg", seed=900 + i, tint=i)


@pytest.mark.slow
@pytest.mark.parametrize("page", pages_with_blocks(), ids=lambda page: page.name)
def test_runnable_blocks_run(page, tmp_path, monkeypatch):
    from probe.cli import main

    monkeypatch.delenv("PROBE_CACHE_DIR", raising=False)  # the pages' paths say ./.probe
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for line, commands in runnable_blocks(page.read_text(encoding="utf-8")):
        assert commands, f"{page.name}:{line}: a runnable block without commands"
        for command in commands:
            result = runner.invoke(main, command_arguments(command))
            assert result.exit_code == 0, (
                f"{page.name}:{line}: `{command}` exited with {result.exit_code}:\n"
                f"{result.output}\n{result.exception!r}")


def test_marked_blocks_parse():
    """Every marked block holds probe commands whose placeholders are well formed."""
    found = 0
    for page in PAGES:
        for line, commands in runnable_blocks(page.read_text(encoding="utf-8")):
            assert commands, f"{page.name}:{line}: a runnable block without commands"
            for command in commands:
                words = shlex.split(command, comments=True)
                assert words[0] == "probe", f"{page.name}:{line}: {command!r}"
                found += 1
    assert found >= 10


def test_blocks_and_placeholders_are_read_as_documented(tmp_path, monkeypatch):
    text = ("x\n<!-- runnable -->\n```console\n$ probe fit --head knn   # a comment\n\n"
            "probe cache info \\\n  .probe/a-<key>.h5\n```\n```\nprobe not-marked\n```\n")
    assert runnable_blocks(text) == [(2, ["probe fit --head knn   # a comment",
                                          "probe cache info .probe/a-<key>.h5"])]
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".probe" / "runs" / "1-old").mkdir(parents=True)
    (tmp_path / ".probe" / "runs" / "2-new").mkdir()
    (tmp_path / ".probe" / "a-123.h5").write_bytes(b"")
    assert command_arguments("probe report .probe/runs/<run>/  # again") == [
        "report", ".probe/runs/2-new/"]
    assert resolve(".probe/a-<key>.h5") == ".probe/a-123.h5"
    with pytest.raises(AssertionError, match="nothing matches"):
        resolve(".probe/b-<key>.h5")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code(page.read_text(encoding="utf-8")),
                              flags=re.M):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def without_code(text: str) -> str:
    """The text without fenced blocks and inline code (which may hold `](` or `#`)."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_lead_to_files_and_headings(page):
    text = without_code(page.read_text(encoding="utf-8"))
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no file {path})")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_guide_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not link {page.name}"


def test_readme_is_a_short_front_door_with_the_ci_test_command():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv") and "pytest" in ci
    assert ci in text, "README's Development section must show CI's test command"
    assert "](docs/report.png)" in text


def backbone_table():
    spec = importlib.util.spec_from_file_location("backbone_table", ROOT / "docs" / "backbone_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backbone_table_agrees_with_the_registry():
    """Every row and every column but the parameter count is the registry's (no Keras)."""
    from probe import backbones

    tables = backbone_table()
    text = tables.PAGE.read_text(encoding="utf-8")
    documented = tables.documented_parameters(text)
    assert sorted(documented) == backbones.list_backbones()
    assert tables.between(text, tables.START, tables.END) == tables.table(documented.__getitem__)


@pytest.mark.slow
def test_backbone_table_parameter_counts():
    tables = backbone_table()
    documented = tables.documented_parameters(tables.PAGE.read_text(encoding="utf-8"))
    for name in ("vgg16", "mobilenet"):  # cheap to build; the script checks them all
        assert documented[name] == tables.millions(tables.count_parameters(name))


@pytest.mark.slow
def test_hub_table_is_keras_hubs_preset_list():
    pytest.importorskip("keras_hub")
    tables = backbone_table()
    text = tables.PAGE.read_text(encoding="utf-8")
    assert tables.between(text, tables.HUB_START, tables.HUB_END) == tables.hub_table()
