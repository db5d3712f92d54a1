"""Peak memory of extracting 20,000 images against 500: streaming, or not.

Run from the repository root::

    python benchmarks/bench_memory.py            # 500 vs 20,000 images
    python benchmarks/bench_memory.py --large 5000

The images are generated: small JPEG re-encodings of the real ants/bees
photos, each a different crop, flip and quality, so every file has its own
content hash and goes through the network. Each extraction runs in a fresh
subprocess, which reports its own peak resident memory (``VmHWM``) after the
extraction, and separately after compacting the store. The result goes to
``benchmarks/results/memory.md`` and ``memory.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANTS_BEES = ROOT.parent / "shared" / "data" / "hymenoptera_data"
RESULTS = ROOT / "benchmarks" / "results"


def generate_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Write ``count`` distinct small JPEGs derived from the real photos."""
    from PIL import Image, ImageOps

    rng = random.Random(seed)
    sources = []
    for path in sorted(ANTS_BEES.glob("*/*/*.jpg")):
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        image.thumbnail((240, 240))
        sources.append(image)
    paths = []
    for number in range(count):
        image = sources[number % len(sources)]
        width, height = image.size
        left, top = rng.randint(0, width // 4), rng.randint(0, height // 4)
        crop = image.crop((left, top, left + 3 * width // 4, top + 3 * height // 4))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        target = folder / f"{number:06d}.jpg"
        crop.save(target, quality=rng.randint(70, 95))
        paths.append(str(target))
    return paths


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(folder: str, count: int, store: str, backbone: str) -> None:
    """Extract the first ``count`` images of ``folder``; print a JSON line."""
    from features import Extractor, FeatureStore, get_backbone

    items = sorted(str(p) for p in Path(folder).glob("*.jpg"))[:count]
    model = get_backbone(backbone)
    model.session()
    loaded = peak_rss_mb()
    extractor = Extractor(model, FeatureStore(store), progress=False)
    start = time.perf_counter()
    result = extractor.extract(items)
    seconds = time.perf_counter() - start
    extracted = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    extractor.store.compact()
    report = {
        "items": count,
        "computed": result.summary.computed,
        "failed": result.summary.failed,
        "seconds": round(seconds, 1),
        "items_per_s": round(count / seconds, 1),
        "peak_rss_after_load_mb": round(loaded, 1),
        "peak_rss_extract_mb": round(extracted, 1),
        "peak_rss_compact_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(report))


def measure(folder: Path, count: int, backbone: str) -> dict:
    store = Path(tempfile.mkdtemp(prefix="bneck-mem-store-")) / "s.h5"
    command = [
        sys.executable,
        __file__,
        "--child",
        str(count),
        "--folder",
        str(folder),
        "--store",
        str(store),
        "--backbone",
        backbone,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as exc:
        sys.stderr.write(exc.stderr)
        raise
    finally:
        shutil.rmtree(store.parent, ignore_errors=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {report}", flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=20_000)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.folder, args.child, args.store, args.backbone)
        return 0

    folder = Path(tempfile.mkdtemp(prefix="bneck-mem-images-"))
    try:
        start = time.perf_counter()
        generate_images(folder, args.large)
        print(f"generated {args.large} images in {time.perf_counter() - start:.0f} s")
        small = measure(folder, args.small, args.backbone)
        large = measure(folder, args.large, args.backbone)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ratio = large["peak_rss_extract_mb"] / small["peak_rss_extract_mb"]
    report = {
        "backbone": args.backbone,
        "small": small,
        "large": large,
        "ratio_extract": round(ratio, 3),
        "ratio_compact": round(
            large["peak_rss_compact_mb"] / small["peak_rss_compact_mb"], 3
        ),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    text = "\n".join(
        [
            f"### Peak memory, {args.backbone}: {args.small} vs {args.large} images",
            "",
            "| images | items/s | peak RSS extract MiB | peak RSS compact MiB |",
            "|---:|---:|---:|---:|",
            *(
                f"| {r['items']} | {r['items_per_s']} | {r['peak_rss_extract_mb']} "
                f"| {r['peak_rss_compact_mb']} |"
                for r in (small, large)
            ),
            "",
            f"Extraction peak ratio {report['ratio_extract']} (target <= 1.3); "
            f"compaction peak ratio {report['ratio_compact']}.",
            "",
        ]
    )
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(report, indent=2))
    (out / "memory.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
