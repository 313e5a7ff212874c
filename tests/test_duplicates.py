"""Tests of probe.duplicates: the blockwise search, identical files, cross-split pairs
first, the remembered check of `probe fit`, and the command."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import probe
from probe import duplicates
from probe.cli import main
from probe.errors import ProbeError


def brute_force(X: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    S = X @ X.T
    i, j = np.nonzero(np.triu(S >= threshold, 1))
    return set(zip(i.tolist(), j.tolist()))


def planted(n=600, d=256, pairs=20, seed=0, low=0.955, high=0.99):
    """Unit rows with `pairs` planted pairs (row a, row a + n/2) of similarity in [low, high]."""
    rng = np.random.default_rng(seed)
    X = duplicates.normalise(rng.standard_normal((n, d), dtype=np.float32))
    a = rng.choice(n // 2, size=pairs, replace=False)
    b = a + n // 2
    target = rng.uniform(low, high, size=pairs).astype(np.float32)
    noise = rng.standard_normal((pairs, d), dtype=np.float32)
    noise -= (noise * X[a]).sum(axis=1, keepdims=True) * X[a]
    X[b] = target[:, None] * X[a] + np.sqrt(1 - target ** 2)[:, None] * duplicates.normalise(noise)
    return X, {(int(x), int(y)) for x, y in zip(a, b)}


def test_blockwise_pairs_equal_brute_force_across_block_edges(monkeypatch):
    monkeypatch.setattr(duplicates, "BLOCK_ROWS", 64)
    monkeypatch.setattr(duplicates, "BLOCK_COLUMNS", 96)
    X, expected = planted()
    X[5] = X[3]  # a pair inside one block
    expected.add((3, 5))
    i, j, s, method = duplicates.similar_pairs(X, 0.95, exact=True)
    assert method == "exact"
    assert set(zip(i.tolist(), j.tolist())) == brute_force(X, 0.95) == expected
    np.testing.assert_allclose(s, np.einsum("ij,ij->i", X[i], X[j]), atol=1e-5)
    assert np.all(i < j)


def test_projected_search_finds_every_pair_and_reports_exact_similarities():
    X, expected = planted(n=1200, d=512, pairs=60, low=0.9505, high=0.952)
    i, j, s, method = duplicates.similar_pairs(X, 0.95, exact=False, dims=64)
    assert method.startswith("projected")
    assert set(zip(i.tolist(), j.tolist())) == expected
    np.testing.assert_allclose(s, np.einsum("ij,ij->i", X[i], X[j]), atol=1e-5)


def test_projected_search_computes_a_crowded_block_exactly(monkeypatch):
    monkeypatch.setattr(duplicates, "BLOCK_ROWS", 64)
    monkeypatch.setattr(duplicates, "BLOCK_COLUMNS", 64)
    X, expected = planted(n=400, d=256, pairs=10)
    X[:40] = duplicates.normalise(X[:1] + 0.05 * X[:40])  # 40 near-identical rows
    verified = []
    row_dots = duplicates._row_dots
    monkeypatch.setattr(duplicates, "_row_dots",
                        lambda full, i, j: verified.append(len(i)) or row_dots(full, i, j))
    i, j, s, _ = duplicates.similar_pairs(X, 0.95, exact=False, dims=64)
    assert set(zip(i.tolist(), j.tolist())) == brute_force(X, 0.95)
    assert len(i) > 780 and sum(verified) < 400  # the crowded block was not verified pair by pair


def test_threshold_is_checked():
    for bad in (0, 1, 1.5, -0.2, "0.9"):
        with pytest.raises(ProbeError, match="between 0 and 1"):
            duplicates.check_threshold(bad)


def jpeg_copy(source, target, quality=75):
    buffer = io.BytesIO()
    Image.open(source).convert("RGB").save(buffer, format="JPEG", quality=quality)
    target.write_bytes(buffer.getvalue())


def photo_tiles(root, per_class=10):
    """Distinct pictures: tiles of the two photographs scikit-learn ships, one class each,
    in split folders (3 val, 3 test, the rest train)."""
    import sklearn.datasets

    folder = os.path.dirname(sklearn.datasets.__file__)
    for name in ("china", "flower"):
        photo = Image.open(os.path.join(folder, "images", f"{name}.jpg")).convert("RGB")
        for i in range(per_class):
            split = "val" if i < 3 else "test" if i < 6 else "train"
            x, y = (i % 5) * 120, (i // 5) * 140
            path = root / split / name / f"{name}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo.crop((x, y, x + 112, y + 112)).resize((64, 64)).save(path)
    return root


@pytest.fixture
def leaky_cache(tmp_path):
    """Photo tiles in split folders; one train image copied byte for byte into test, one
    re-encoded as JPEG and one resized (64 to 48 pixels) into val, one copied within train."""
    root = photo_tiles(tmp_path / "leaky")
    shutil.copy(root / "train" / "china" / "china_7.png", root / "test" / "china" / "copy_of_7.png")
    jpeg_copy(root / "train" / "flower" / "flower_8.png", root / "val" / "flower" / "flower_8.jpg")
    Image.open(root / "train" / "china" / "china_9.png").resize((48, 48), Image.BILINEAR).save(
        root / "val" / "china" / "small_9.png")
    shutil.copy(root / "train" / "flower" / "flower_9.png", root / "train" / "flower" / "again_9.png")
    return probe.extract(root, "vgg16", weights="none", image_size=32)


def test_cross_split_pairs_come_first(leaky_cache):
    found = probe.find_duplicates(leaky_cache, 0.95)
    first = found.pairs[0]
    assert first.exact and first.splits == "train-test"
    assert {first.first.path, first.second.path} == {"train/china/china_7.png",
                                                      "test/china/copy_of_7.png"}
    crossing = {(p.splits, p.exact) for p in found.cross_split_pairs}
    assert ("train-val", False) in crossing  # the re-encoded JPEG, the resized copy
    same_split = [p for p in found.pairs if not p.cross_split]
    assert any(p.exact and p.splits == "train" for p in same_split)
    assert found.pairs.index(same_split[0]) > found.pairs.index(found.cross_split_pairs[-1])
    assert found.groups[0].cross_split and found.groups[0].exact
    counts = found.counts()
    assert counts["train-test"] >= 1 and counts["train-val"] >= 1
    assert json.loads(json.dumps(found.to_dict()))["counts"] == counts


def test_identical_files_are_found_by_hashing_even_with_other_features(leaky_cache, monkeypatch):
    # features that make every image unlike every other: only the file hashes find the copies
    def scattered(features):
        rng = np.random.default_rng(1)
        return duplicates.normalise(rng.standard_normal(np.shape(features)).astype(np.float32))

    monkeypatch.setattr(duplicates, "centre", scattered)
    found = probe.find_duplicates(leaky_cache)
    assert {(p.splits, p.exact) for p in found.pairs} == {("train-test", True), ("train", True)}
    found = probe.find_duplicates(leaky_cache, hash_all_files=False)
    assert found.pairs == []


def test_duplicates_command_strict_and_json(leaky_cache):
    runner = CliRunner()
    result = runner.invoke(main, ["duplicates", str(leaky_cache.path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "pairs cross splits" in lines[0]
    assert lines[3].startswith("train-test") and "identical" in lines[3]
    result = runner.invoke(main, ["duplicates", str(leaky_cache.path), "--strict"])
    assert result.exit_code == 1 and "--strict" in result.output
    result = runner.invoke(main, ["duplicates", str(leaky_cache.path), "--json", "--threshold", "0.999"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["threshold"] == 0.999 and data["counts"]["train-test"] == 1
    result = runner.invoke(main, ["duplicates", str(leaky_cache.path), "--threshold", "2"])
    assert result.exit_code == 1 and "between 0 and 1" in result.output


def test_strict_passes_without_cross_split_pairs(tmp_path):
    cache = probe.extract(photo_tiles(tmp_path / "clean"), "vgg16", weights="none", image_size=32)
    result = CliRunner().invoke(main, ["duplicates", str(cache.path), "--strict"])
    assert result.exit_code == 0, result.output
    assert "0 pairs cross splits" in result.output


def test_fit_warns_in_one_line_and_remembers_the_check(leaky_cache, monkeypatch):
    run = probe.fit(leaky_cache, "logreg", html_report=False)
    warnings = [n for n in run.notes if "cross splits" in n]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "train-test" in warnings[0] and "probe duplicates" in warnings[0]
    # every copy crosses splits but the one within train: each crossing is counted
    assert warnings[0].startswith("warning: 3 near-duplicate image pairs cross splits "
                                  "(1 train-test, 2 train-val) at cosine >= 0.9")
    sidecar = leaky_cache.path.with_name(leaky_cache.path.name + duplicates.SIDECAR_SUFFIX)
    assert sidecar.is_file()

    calls = []
    monkeypatch.setattr(duplicates, "find_duplicates",
                        lambda *a, **k: calls.append(1) or pytest.fail("not remembered"))
    assert duplicates.leakage_warning(leaky_cache) == warnings[0]
    assert calls == []
    os.utime(leaky_cache.path, ns=(1, 1))  # a rewritten cache is checked again
    with pytest.raises(pytest.fail.Exception):
        duplicates.leakage_warning(leaky_cache)


def test_fit_on_a_clean_cache_says_nothing_about_duplicates(tmp_path):
    cache = probe.extract(photo_tiles(tmp_path / "clean"), "vgg16", weights="none", image_size=32)
    run = probe.fit(cache, "logreg", html_report=False)
    assert not any("cross splits" in note for note in run.notes)


# --- the threshold set from the cache -------------------------------------------------


def crowded(n=300, d=128, spread=0.15, seed=0):
    """Unit rows all close to one direction (pairwise cosine about 0.98): distinct images
    in a random-weight feature space."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d)
    X = common / np.linalg.norm(common) + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return duplicates.normalise(X.astype(np.float32))


def copy_of(row, similarity, seed=0):
    """A unit vector at `similarity` from `row`."""
    noise = np.random.default_rng(seed).standard_normal(row.size).astype(np.float32)
    noise -= (noise @ row) * row
    return similarity * row + np.sqrt(1 - similarity ** 2) * noise / np.linalg.norm(noise)


def test_calibration_lifts_the_threshold_above_a_crowded_space_and_keeps_copies():
    X = crowded()
    S = X @ X.T
    closest = S[np.triu_indices(len(X), 1)].max()
    assert np.sum(np.triu(S >= duplicates.THRESHOLD_FLOOR, 1)) > 1000  # the fixed threshold
    X[-1] = copy_of(X[0], 0.9995)
    found = duplicates.calibrate_threshold(X)
    assert found.reference == "random pairs" and found.pairs == 300 * 299 // 2
    q = np.percentile(duplicates._row_dots(X, *np.triu_indices(300, 1)), 99.9)
    assert found.similarity == pytest.approx(q, abs=1e-5)
    assert found.threshold == pytest.approx(1 - (1 - max(q, found.neighbour_similarity)) / 2, abs=1e-5)
    assert closest < found.threshold < 0.9995
    i, j, _, _ = duplicates.similar_pairs(X, found.threshold)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 299)]


def test_calibration_keeps_the_floor_in_a_spread_space_and_reads_pairs_across_classes():
    rng = np.random.default_rng(1)
    X = duplicates.normalise(rng.standard_normal((200, 64)).astype(np.float32))
    assert duplicates.calibrate_threshold(X).threshold == duplicates.THRESHOLD_FLOOR
    # two classes, each with all its images alike but the classes apart: pairs across
    # classes say nothing, the nearest neighbours do
    X = np.concatenate([crowded(100, seed=2), -crowded(100, seed=2)[::-1]])
    members = np.repeat(np.eye(2, dtype=bool), 100, axis=0)
    found = duplicates.calibrate_threshold(X, members)
    assert found.reference == "cross-class pairs" and found.pairs == 100 * 100
    assert found.similarity < 0 < 0.95 < found.neighbour_similarity
    assert found.threshold > (X[:100] @ X[:100].T)[np.triu_indices(100, 1)].max()


def test_distinct_images_give_no_pairs_where_the_fixed_threshold_gave_hundreds(tmp_path):
    from conftest import make_separable_tree

    root = make_separable_tree(tmp_path / "colours", per_class=20, classes=("blue", "green", "red"))
    cache = probe.extract(root, "vgg16", weights="none", image_size=32)
    assert len(probe.find_duplicates(cache, duplicates.THRESHOLD_FLOOR).pairs) > 100
    found = probe.find_duplicates(cache)
    assert len(found.pairs) <= 2 and found.threshold > duplicates.THRESHOLD_FLOOR
    assert found.calibration.threshold == found.threshold
    assert json.loads(json.dumps(found.to_dict()))["calibration"]["images"] == 60
    assert duplicates.leakage_warning(cache) is None


def test_copies_are_found_at_the_calibrated_threshold_and_a_given_one_wins(leaky_cache):
    found = probe.find_duplicates(leaky_cache)
    assert found.calibration is not None and found.threshold >= duplicates.THRESHOLD_FLOOR
    pairs = {(p.first.path, p.second.path): p for p in found.pairs}
    for copy in [("train/china/china_7.png", "test/china/copy_of_7.png"),  # identical file
                 ("train/flower/flower_8.png", "val/flower/flower_8.jpg"),  # re-encoded
                 ("train/china/china_9.png", "val/china/small_9.png")]:  # resized
        assert copy in pairs or copy[::-1] in pairs, copy
    assert len(found.pairs) <= 4 + 2  # the copies (one within train), and at most two others
    given = probe.find_duplicates(leaky_cache, 0.999)
    assert given.threshold == 0.999 and given.calibration is None
    assert ("train/flower/flower_8.png", "val/flower/flower_8.jpg") not in {
        (p.first.path, p.second.path) for p in given.pairs}
