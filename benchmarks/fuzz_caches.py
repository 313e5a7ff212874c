"""Seeded single-byte flips of a sealed cache and of the same cache in the older, unsealed
format, each placed in a cache directory beside a good cache, and what probe's commands do
with them. One line per figure: `<format> <outcome> <count>`.

Every copy is checked in its own process (a crash or hang of probe itself is counted, not
suffered): `probe cache ls`, `cache verify`, a plain `probe fit` (which must use the good
cache), and `cache reseal` for unsealed copies. Outcomes per copy:

- sealed: `error` (every command that reads it: one line, exit 1) or `same` (it read the
  same numbers); anything else is a failure.
- unsealed: `resealed-all` (every row matched its image), `resealed-some` (rows left out:
  their stored path, labels or times no longer match an image), `refused` (reseal failed
  in one line, the file left as it was); failures: a traceback, a crash or hang of the
  probe process, a resealed row whose features or label differ from the original's, verify
  calling an unsealed file intact, or fit not using the good cache.

    PYTHONPATH=. python benchmarks/fuzz_caches.py --flips 300 --workdir /tmp/fuzz
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def make_caches(workdir: Path) -> tuple[Path, Path, Path]:
    """A tiny three-colour dataset, its sealed vgg16 cache (random weights, 32 px) and the
    same cache written without the header, as an older probe wrote it."""
    import h5py
    from PIL import Image

    import probe

    root = workdir / "colours"
    rng = np.random.default_rng(0)
    for c, (name, colour) in enumerate({"blue": (20, 40, 220), "green": (30, 200, 40),
                                        "red": (220, 30, 20)}.items()):
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (28, 28, 3)), 0, 255)
            path = root / name / f"{name}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
    cache = probe.extract(root, "vgg16", weights="none", image_size=32,
                          cache_dir=workdir / "made")
    unsealed = workdir / "unsealed.h5"
    with h5py.File(cache.path, "r") as old, h5py.File(unsealed, "w") as new:
        for key, value in old.attrs.items():
            new.attrs[key] = value
        for name in old:
            group = new.create_group(name)
            for key, dataset in old[name].items():
                group.create_dataset(key, data=dataset[()], dtype=dataset.dtype,
                                     chunks=dataset.chunks, fletcher32=dataset.fletcher32,
                                     maxshape=dataset.maxshape)
    return root, cache.path, unsealed


def check_copy(good: str, original: str, copy: str, unsealed: bool) -> dict:
    """What each command does with one flipped copy (run in a process of its own)."""
    from click.testing import CliRunner

    import probe
    from probe.cli import main

    directory = str(Path(copy).parent)
    env = {"PROBE_CACHE_DIR": directory}

    def run(*args):
        result = CliRunner().invoke(main, list(args), env=env)
        lines = result.output.strip().splitlines()
        clean = result.exit_code in (0, 1) and "Traceback" not in result.output and (
            result.exit_code == 0 or (len(lines) == 1 and isinstance(result.exception,
                                                                        SystemExit)))
        return result, clean

    report, problems = {}, []
    for name, args in (("ls", ("cache", "ls")), ("verify", ("cache", "verify", copy)),
                       ("fit", ("fit", "--head", "knn", "--no-report"))):
        result, clean = run(*args)
        if not clean:
            problems.append(f"{name}: exit {result.exit_code} {result.output[-200:]!r}")
        report[name] = result.exit_code
        if name == "verify" and unsealed and result.exit_code == 0:
            problems.append("verify called an unsealed cache intact")
        # a sealed copy whose damage lies past its header is listed, and refused on open
        if name == "fit" and unsealed and (result.exit_code != 0 or good not in result.output):
            problems.append(f"fit did not use the good cache: {result.output[-200:]!r}")
    original_cache = probe.FeatureCache.open(original)
    if unsealed:
        before = Path(copy).read_bytes()
        result, clean = run("cache", "reseal", copy)
        if not clean:
            problems.append(f"reseal: exit {result.exit_code} {result.output[-200:]!r}")
            outcome = "failure"
        elif result.exit_code == 1:
            outcome = "refused"
            if Path(copy).read_bytes() != before:
                problems.append("a refused reseal changed the file")
        else:
            resealed = probe.FeatureCache.open(copy)
            left_out = sum(original_cache.counts.values()) - sum(resealed.counts.values())
            outcome = "resealed-some" if left_out else "resealed-all"
            problems += _differences(original_cache, resealed)
    else:
        outcome = "error" if report["verify"] == 1 else "same"
        if outcome == "same":
            problems += _differences(original_cache, probe.FeatureCache.open(copy))
    return {"outcome": "failure" if problems else outcome, "problems": problems}


def _differences(original, other) -> list[str]:
    """Rows of `other` whose features or label differ from the original's same path."""
    problems = []
    for split in other.splits:
        mine, theirs = original.split(split), other.split(split)
        index = {path: i for i, path in enumerate(mine.paths)}
        for j, path in enumerate(theirs.paths):
            i = index.get(path)
            if i is None or not np.array_equal(mine.features[i], theirs.features[j]) \
                    or not np.array_equal(mine.labels[i], theirs.labels[j]):
                problems.append(f"{split} row '{path}' differs from the original")
    return problems


def flips(data: bytes, count: int, seed: int) -> list[tuple[int, int]]:
    """(offset, xor mask): half anywhere, half in the first 4 KB and the last 4 KB (where
    HDF5 keeps most of its metadata in files this small)."""
    rng = np.random.default_rng(seed)
    n = len(data)
    anywhere = rng.integers(0, n, count // 2)
    edges = np.concatenate([rng.integers(0, min(n, 4096), count - count // 2 - count // 4),
                            rng.integers(max(0, n - 4096), n, count // 4)])
    return [(int(o), int(rng.integers(1, 256))) for o in [*anywhere, *edges]]


def fuzz(kind: str, source: Path, good: Path, original: Path, count: int, seed: int,
         workdir: Path, timeout: float) -> collections.Counter:
    data = source.read_bytes()
    outcomes: collections.Counter = collections.Counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    for offset, mask in flips(data, count, seed):
        directory = Path(tempfile.mkdtemp(dir=workdir, prefix=f"{kind}-"))
        shutil.copy2(good, directory / good.name)
        flipped = bytearray(data)
        flipped[offset] ^= mask
        copy = directory / f"flip-{offset}-{mask}.h5"
        copy.write_bytes(bytes(flipped))
        os.utime(copy)  # the newest file in the directory: a careless fit would take it
        try:
            done = subprocess.run(
                [sys.executable, str(HERE), "--check", str(good.name), str(original), str(copy),
                 kind], capture_output=True, text=True, timeout=timeout, env=env,
                cwd=directory)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                outcome, problems = f"crash (exit {done.returncode})", [done.stderr[-300:]]
            else:
                answer = json.loads(lines[-1])
                outcome, problems = answer["outcome"], answer["problems"]
        except subprocess.TimeoutExpired:
            outcome, problems = "hang", []
        outcomes[outcome] += 1
        if problems:
            print(f"# {kind} flip {offset} ^{mask}: {outcome}: {problems[:3]}", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
    return outcomes


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        good, original, copy, kind = sys.argv[2:6]
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        print(json.dumps(check_copy(good, original, copy, kind == "unsealed")), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flips", type=int, default=300, help="flips per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds before a copy's process counts as hung")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="probe-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["PROBE_RUNTIME"] = "tensorflow"
    root, sealed, unsealed = make_caches(workdir)
    print(f"cpu {_cpu()}")
    for kind, source in (("sealed", sealed), ("unsealed", unsealed)):
        outcomes = fuzz(kind, source, sealed, sealed, args.flips, args.seed, workdir,
                        args.timeout)
        for outcome, count in sorted(outcomes.items()):
            print(f"{kind} {outcome} {count}", flush=True)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
