"""Speed and recall of the near-duplicate search, and the calibration of its threshold.

Speed (default): N random feature vectors of D dimensions (float32) with P planted
near-duplicate pairs at similarities just above the threshold; prints the time, the rate
(pairs of images compared per second) and the recall of the planted pairs, first for the
projected search `probe duplicates` uses at this size, then the time of setting the
threshold from the vectors (`calibrate_threshold`), then (with --exact-rows) the exact
blockwise product on a subset, as the baseline measured in the same run.

    python benchmarks/duplicates.py --n 100000 --dims 2048
    python benchmarks/duplicates.py --calibrate --workdir /tmp/dup-calibration

Calibration (--calibrate): distinct "originals" (tiles of the photographs shipped with
scikit-learn and matplotlib, scikit-learn's digits enlarged, generated textures) and four
copies of each (JPEG quality 40; resized to 55 %; cropped 8 % per side; all three), their
features extracted with random weights by each backbone, then the similarity of every
(original, copy) pair against every pair of distinct images, raw and centred, at the
floor of the threshold (0.95) and at the threshold `probe duplicates` sets from a cache of
the originals and the copies of one original in ten (a cache where 1 image in 3 has no
copy would be unusual; one where 4 in 5 are copies, as the whole set, more so).
Every figure is one line: `<scope> <figure> <value>`.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe import duplicates  # noqa: E402


def speed(n: int, dims: int, planted: int, threshold: float, exact_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dims), dtype=np.float32)
    X = duplicates.normalise(X)
    # planted pairs: row b = a rotated towards noise so that their cosine is in [t, t + 0.03]
    a = rng.choice(n, size=planted, replace=False)
    b = (a + n // 2) % n
    target = rng.uniform(threshold + 0.002, threshold + 0.03, size=planted).astype(np.float32)
    noise = duplicates.normalise(rng.standard_normal((planted, dims), dtype=np.float32))
    noise -= (noise * X[a]).sum(axis=1, keepdims=True) * X[a]
    noise = duplicates.normalise(noise)
    X[b] = target[:, None] * X[a] + np.sqrt(1 - target ** 2)[:, None] * noise
    expected = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist())}

    started, cpu = time.perf_counter(), time.process_time()
    i, j, s, method = duplicates.similar_pairs(X, threshold)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    found = set(zip(i.tolist(), j.tolist()))
    pairs = n * (n - 1) / 2
    print(f"duplicates method {method!r}")
    print(f"duplicates n_x_dims {n}x{dims}")
    print(f"duplicates seconds {seconds:.1f}")
    print(f"duplicates cpu_seconds {cpu:.1f} (all threads; on a busy machine cpu/2 is about "
          "the wall time two idle cores would take)")
    print(f"duplicates pairs_per_second {pairs / seconds:.3g}")
    print(f"duplicates planted_recall {len(expected & found) / len(expected):.4f} "
          f"({len(expected & found)} of {len(expected)})")
    print(f"duplicates other_pairs_found {len(found - expected)}")
    started, cpu = time.perf_counter(), time.process_time()
    calibration = duplicates.calibrate_threshold(X)
    print(f"calibration seconds {time.perf_counter() - started:.1f} cpu_seconds "
          f"{time.process_time() - cpu:.1f} (the threshold a cache of these would get: "
          f"{calibration.threshold:.4f}, {calibration.describe()})")
    if exact_rows:
        m = min(exact_rows, n)
        started, cpu = time.perf_counter(), time.process_time()
        duplicates.similar_pairs(X[:m], threshold, exact=True)
        exact_seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"exact seconds {exact_seconds:.1f} cpu_seconds {cpu:.1f}")
        rate = m * (m - 1) / 2 / exact_seconds
        print(f"exact n_x_dims {m}x{dims}")
        print(f"exact pairs_per_second {rate:.3g}")
        print(f"exact projected_seconds_for_{n} {pairs / rate:.0f}")
        print(f"speedup projected_over_exact {pairs / seconds / rate:.1f}")


# --- calibration ----------------------------------------------------------------------


def originals(count_tiles: int = 48, digits: int = 30, textures: int = 30) -> list:
    """Distinct images: non-overlapping tiles of three photographs, enlarged digits and
    generated textures."""
    from PIL import Image
    import matplotlib
    import sklearn.datasets

    images = []
    photos = [Path(sklearn.datasets.__file__).parent / "images" / name
              for name in ("china.jpg", "flower.jpg")]
    photos.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    per_photo = count_tiles // len(photos)
    for photo in photos:
        picture = Image.open(photo).convert("RGB")
        width, height = picture.size
        columns = 4
        rows = per_photo // columns
        tile_w, tile_h = width // columns, height // rows
        for r in range(rows):
            for c in range(columns):
                images.append(picture.crop((c * tile_w, r * tile_h, (c + 1) * tile_w,
                                            (r + 1) * tile_h)))
    digit_data = sklearn.datasets.load_digits()
    for index in range(digits):
        pixels = (255 - digit_data.images[index * 7] * 16).clip(0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels).resize((96, 96), Image.BICUBIC).convert("RGB"))
    rng = np.random.default_rng(0)
    for index in range(textures):
        base = rng.integers(0, 256, 3)
        small = rng.normal(0, 60, (8, 8, 3)) + base
        pixels = np.clip(small, 0, 255).astype(np.uint8)
        big = Image.fromarray(pixels).resize((128, 128), Image.BICUBIC)
        noise = rng.normal(0, 12, (128, 128, 3))
        images.append(Image.fromarray(np.clip(np.asarray(big) + noise, 0, 255).astype(np.uint8)))
    return images


def copies(image) -> dict:
    from PIL import Image

    def jpeg(picture, quality=40):
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    def resized(picture):
        return picture.resize((max(8, int(picture.width * 0.55)), max(8, int(picture.height * 0.55))),
                              Image.BILINEAR)

    def cropped(picture):
        dx, dy = int(picture.width * 0.08), int(picture.height * 0.08)
        return picture.crop((dx, dy, picture.width - dx, picture.height - dy))

    return {"jpeg": jpeg(image), "resized": resized(image), "cropped": cropped(image),
            "all": jpeg(resized(cropped(image)))}


def calibrate(workdir: Path, backbones: list[str], image_size: int) -> None:
    import probe

    root = workdir / "images"
    kinds = ["original", "jpeg", "resized", "cropped", "all"]
    if not root.exists():
        for index, image in enumerate(originals()):
            versions = {"original": image, **copies(image)}
            for kind in kinds:
                group = "even" if index % 2 == 0 else "odd"  # extraction wants two classes
                path = root / group / f"{index:03d}-{kind}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                versions[kind].save(path)
    print(f"calibration images {len(list(root.glob('*/*.png')))}")
    for name in backbones:
        cache = probe.extract(root, name, weights="none", image_size=image_size,
                              val_fraction=0.0, test_fraction=0.0, cache_dir=workdir / "cache")
        part = cache.split("train")
        ids = np.array([int(Path(p).name[:3]) for p in part.paths])
        kind = np.array([Path(p).stem.split("-")[1] for p in part.paths])
        for label, X in (("raw", duplicates.normalise(part.features.reshape(len(part), -1))),
                         ("centred", duplicates.centre(part.features))):
            S = X @ X.T
            same = ids[:, None] == ids[None, :]
            upper = np.triu(np.ones_like(same), 1)
            distinct = S[(~same) & upper]
            print(f"{name} {label} distinct_max {distinct.max():.4f}")
            print(f"{name} {label} distinct_p99.9 {np.quantile(distinct, 0.999):.4f}")
            for copy_kind in kinds[1:]:
                rows = np.nonzero(kind == "original")[0]
                sims = []
                for r in rows:
                    partner = np.nonzero((ids == ids[r]) & (kind == copy_kind))[0]
                    sims += S[r, partner].tolist()
                sims = np.array(sims)
                print(f"{name} {label} copy_{copy_kind}_min {sims.min():.4f} "
                      f"p1 {np.quantile(sims, 0.01):.4f} median {np.median(sims):.4f}")
            t = duplicates.THRESHOLD_FLOOR
            pairs_same = S[same & upper]
            print(f"{name} {label} at_{t} copies_found {np.mean(pairs_same >= t):.4f} "
                  f"distinct_flagged {np.mean(distinct >= t):.5f}")
        calibrated(name, duplicates.centre(part.features), ids, kind, part.labels, kinds)


def calibrated(name: str, X: np.ndarray, ids: np.ndarray, kind: np.ndarray, labels: np.ndarray,
               kinds: list[str]) -> None:
    """The threshold set from a cache of the originals and the copies of every tenth
    original, then the copies (of all kinds, of every original) and the pairs of distinct
    originals at and above it."""
    from probe.task import SINGLE_LABEL

    rows = np.flatnonzero((kind == "original") | (ids % 10 == 0))
    started = time.perf_counter()
    found = duplicates.calibrate_threshold(X[rows], SINGLE_LABEL.class_matrix(labels[rows], 2))
    seconds = time.perf_counter() - started
    t = found.threshold
    print(f"{name} calibrated threshold {t:.4f} ({found.describe()}; {seconds:.2f} s, {len(rows)} images)")
    originals = np.flatnonzero(kind == "original")
    for copy_kind in kinds[1:]:
        partner = {int(i): r for r, i in zip(np.flatnonzero(kind == copy_kind), ids[kind == copy_kind])}
        sims = np.array([X[r] @ X[partner[int(ids[r])]] for r in originals])
        print(f"{name} calibrated copies_found_{copy_kind} {np.mean(sims >= t):.4f}")
    S = X[originals] @ X[originals].T
    distinct = S[np.triu_indices(len(originals), 1)]
    print(f"{name} calibrated distinct_original_pairs_flagged {int(np.sum(distinct >= t))} of "
          f"{distinct.size} (at 0.95: {int(np.sum(distinct >= 0.95))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--planted", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=duplicates.THRESHOLD_FLOOR)
    parser.add_argument("--exact-rows", type=int, default=8192,
                        help="Rows of the exact baseline (0: none).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "probe-duplicates-calibration")
    parser.add_argument("--backbones", default="vgg16,resnet50,densenet121")
    parser.add_argument("--image-size", type=int, default=96)
    args = parser.parse_args()
    if args.calibrate:
        calibrate(args.workdir, args.backbones.split(","), args.image_size)
    else:
        speed(args.n, args.dims, args.planted, args.threshold, args.exact_rows, args.seed)


if __name__ == "__main__":
    main()
