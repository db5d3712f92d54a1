"""Extraction speed, side by side, for one backbone, in one process run.

Run from the repository root::

    python benchmarks/bench_extract.py --backbone efficientnet_lite0
    python benchmarks/bench_extract.py --backbone minilm_l6

Every comparison runs in this one process, one after the other, so the
ratios come from the same machine state. The table goes to stdout and to
``benchmarks/results/extract-<backbone>.md``; every figure, with the machine's
load before and after, to ``extract-<backbone>.json``.

Rows
----
baseline      what users write: Pillow (or a Hugging Face tokenizer) and the
              same network in PyTorch eager mode under inference_mode, batch
              by batch, in input order.
bneck fp32    ``Extractor`` into a new HDF5 store (cold), then the same
              extraction again from a new store object (warm).
bneck int8    the quantized backbone, cold, into a new store.
ort ceiling   ONNX Runtime alone on inputs decoded beforehand.

Model loading (PyTorch module, ONNX Runtime session) happens before each
timed row; the one-off INT8 quantization is timed on its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ANTS_BEES = DATA / "hymenoptera_data"
SMS = DATA / "sms_spam_collection" / "SMSSpamCollection"
RESULTS = ROOT / "benchmarks" / "results"
BATCH = 32


# ---------------------------------------------------------------- measuring


def peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak`, in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (Linux), so each phase reads its own."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # not Linux: peaks are then cumulative, said in the notes
        pass


@contextmanager
def phase(record: dict):
    """Time a block: wall and CPU seconds (all threads) and its peak RSS."""
    reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    yield record
    record["seconds"] = time.perf_counter() - wall
    record["cpu_seconds"] = time.process_time() - cpu
    record["peak_rss_mb"] = peak_rss_mb()


def load_average() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def matmul_rate() -> dict:
    """Best float32 matrix-multiply rate of numpy and torch, in GFLOP/s."""
    import torch

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    t = torch.from_numpy(a)
    rates = {}
    for name, multiply in (("numpy", lambda: a @ a), ("torch", lambda: t @ t)):
        multiply()
        best = 0.0
        for _ in range(8):
            start = time.perf_counter()
            multiply()
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
        rates[name] = round(best, 1)
    rates["best"] = max(rates["numpy"], rates["torch"])
    return rates


def graph_flops(onnx_file: str, input_shapes: dict[str, list[int]]) -> float:
    """FLOPs (2 x MACs) of the Conv, MatMul and Gemm nodes for given inputs."""
    import onnx
    import onnxruntime as ort
    from onnx import shape_inference

    # ONNX Runtime's basic optimisations fold the constant subgraphs (such as
    # the padding computations) that onnx's shape inference cannot see through.
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(folder) / "folded.onnx")
        ort.InferenceSession(onnx_file, options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    for graph_input in model.graph.input:
        if graph_input.name in input_shapes:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, value in zip(dims, input_shapes[graph_input.name], strict=True):
                dim.ClearField("dim_param")
                dim.dim_value = value
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - fall back to onnx's own inference
        model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.dim_value else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out = shapes.get(node.output[0])
            weight = shapes.get(node.input[1])
            if out and weight and None not in out:
                macs += int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            out = shapes.get(node.output[0])
            left = shapes.get(node.input[0])
            if out and left and None not in out and left[-1]:
                inner = (
                    left[-2] if node.op_type == "Gemm" and _trans_a(node) else left[-1]
                )
                macs += int(np.prod(out)) * int(inner)
    return 2.0 * macs


def _trans_a(node) -> bool:
    return any(a.name == "transA" and a.i for a in node.attribute)


# ---------------------------------------------------------------- workloads


def image_workload() -> dict:
    """All ants/bees JPEGs (train + val), with labels and split."""
    items, labels, split = [], [], []
    for part in ("train", "val"):
        for path in sorted((ANTS_BEES / part).glob("*/*")):
            if path.suffix.lower() in (".jpg", ".jpeg"):
                items.append(str(path))
                labels.append(path.parent.name)
                split.append(part)
    return {"items": items, "labels": np.array(labels), "split": np.array(split)}


def text_workload() -> dict:
    """The 5,574 SMS messages; the stratified 80/20 split, random_state=0."""
    import pandas as pd
    from sklearn.model_selection import train_test_split

    table = pd.read_csv(SMS, sep="\t", header=None, quoting=3, names=["y", "text"])
    labels = table["y"].to_numpy()
    train, _ = train_test_split(
        np.arange(len(table)), test_size=0.2, stratify=labels, random_state=0
    )
    split = np.full(len(table), "val", dtype=object)
    split[train] = "train"
    return {"items": table["text"].tolist(), "labels": labels, "split": split}


# ---------------------------------------------------------------- baselines


def user_image_loader(path: str, size: int = 224, padding: int = 32) -> np.ndarray:
    """How users preprocess without torchvision: Pillow, then numpy."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    width, height = image.size
    side = min(width, height) * size / (size + padding)
    left, top = (width - side) / 2, (height - side) / 2
    image = image.resize(
        (size, size), Image.BICUBIC, box=(left, top, left + side, top + side)
    )
    pixels = (np.asarray(image, dtype=np.float32) - 127.0) / 128.0
    return pixels.transpose(2, 0, 1)


def baseline_images(backbone, items) -> tuple[dict, np.ndarray]:
    import torch

    module = backbone.build_module()
    with torch.inference_mode():
        module(torch.zeros(1, 3, 224, 224))
    record = {"name": "baseline: Pillow + PyTorch eager", "items": len(items)}
    rows = []
    with phase(record), torch.inference_mode():
        for start in range(0, len(items), BATCH):
            batch = [user_image_loader(p) for p in items[start : start + BATCH]]
            rows.append(module(torch.from_numpy(np.stack(batch))).numpy())
    return record, np.concatenate(rows)


def baseline_texts(backbone, items) -> tuple[list[dict], np.ndarray]:
    """transformers as users write it; sentence-transformers as a second row."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from features._backbones import _minilm_dir

    folder = str(_minilm_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    record = {"name": "baseline: transformers eager", "items": len(items)}
    rows = []
    with phase(record), torch.inference_mode():
        for start in range(0, len(items), BATCH):
            batch = tokenizer(
                items[start : start + BATCH],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            tokens = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
    records = [record]

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return records, np.concatenate(rows)
    encoder = SentenceTransformer(folder, device="cpu", local_files_only=True)
    encoder.max_seq_length = 256
    second = {"name": "sentence-transformers encode", "items": len(items)}
    with phase(second), torch.inference_mode():
        encoder.encode(items, batch_size=BATCH, normalize_embeddings=True)
    records.append(second)
    return records, np.concatenate(rows)


# ---------------------------------------------------------------- bneck rows


def bneck_extract(backbone, items, store_path, name, **options):
    from features import Extractor, FeatureStore

    extractor = Extractor(
        backbone, FeatureStore(store_path), batch_size=BATCH, progress=False, **options
    )
    record = {"name": name, "items": len(items)}
    with phase(record):
        result = extractor.extract(items)
        extractor.store.compact()
        features = extractor.features([k for k in result.keys if k])
    record["computed"] = result.summary.computed
    record["failed"] = result.summary.failed
    return record, features, result.keys


def predecoded(backbone, items) -> list[dict[str, np.ndarray]]:
    """The batches bneck feeds the graph, decoded beforehand."""
    from features import Extractor

    preprocessor = backbone.preprocessor
    if backbone.modality == "text":
        work = [(None, text, None) for text in dict.fromkeys(items)]
        extractor = Extractor(backbone, batch_size=BATCH)
        ordered = [text for _, text, _ in extractor._ordered(work)]
        return [
            preprocessor.collate(ordered[i : i + BATCH])
            for i in range(0, len(ordered), BATCH)
        ]
    loaded = [preprocessor.load(item) for item in items]
    return [
        preprocessor.collate(loaded[i : i + BATCH])
        for i in range(0, len(loaded), BATCH)
    ]


def ort_ceiling(backbone, batches, name, **options) -> dict:
    backbone.run(batches[0], **options)  # warm-up
    rows = sum(len(next(iter(b.values()))) for b in batches)
    record = {"name": name, "items": rows}
    with phase(record):
        for batch in batches:
            backbone.run(batch, **options)
    record["cpu_per_item"] = record["cpu_seconds"] / rows
    return record


def decode_cpu(backbone, items) -> dict:
    """CPU seconds per item of content hashing plus decoding (or tokenizing)."""
    from features import content_key

    preprocessor = backbone.preprocessor
    record = {"name": "decode + hash, 1 thread", "items": len(items)}
    with phase(record):
        for item in items:
            content_key(item, backbone.modality)
        if backbone.modality == "text":
            for start in range(0, len(items), BATCH):
                preprocessor.collate(items[start : start + BATCH])
        else:
            for item in items:
                preprocessor.load(item)
    record["cpu_per_item"] = record["cpu_seconds"] / len(items)
    return record


# ---------------------------------------------------------------- quality


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(1) / np.maximum(norms, 1e-30)


def downstream_accuracy(features, labels, split) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, val = split == "train", split == "val"
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    head.fit(features[train], labels[train])
    return float((head.predict(features[val]) == labels[val]).mean())


def padding_ratio(backbone, items) -> dict:
    """Padded tokens / real tokens, length-sorted (bneck) vs input order."""
    from features import Extractor

    tokenizer = backbone.preprocessor.tokenizer
    distinct = list(dict.fromkeys(items))
    lengths = {
        t: len(e.ids)
        for t, e in zip(distinct, tokenizer.encode_batch(distinct), strict=True)
    }

    def ratio(order):
        padded = sum(
            len(order[i : i + BATCH]) * max(lengths[t] for t in order[i : i + BATCH])
            for i in range(0, len(order), BATCH)
        )
        return padded / sum(lengths[t] for t in order)

    work = [(None, text, None) for text in distinct]
    extractor = Extractor(backbone, batch_size=BATCH)
    ordered = [text for _, text, _ in extractor._ordered(work)]
    return {
        "sorted": round(ratio(ordered), 4),
        "input_order": round(ratio(distinct), 4),
        "mean_tokens": round(float(np.mean(list(lengths.values()))), 1),
    }


def draft_check(backbone, items, count: int = 40) -> dict:
    """Decode 1600x1200 re-encodings of real photos with and without draft."""
    from dataclasses import replace

    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bneck-draft-"))
    large = []
    for number, path in enumerate(items[:: max(1, len(items) // count)][:count]):
        image = Image.open(path).convert("RGB").resize((1600, 1200), Image.BICUBIC)
        target = folder / f"{number:03d}.jpg"
        image.save(target, quality=90)
        large.append(str(target))

    fast = backbone.preprocessor
    exact = replace(fast, draft=False)
    out = {}
    arrays = {}
    for name, preprocessor in (("draft", fast), ("exact", exact)):
        preprocessor.load(large[0])
        start = time.process_time()
        arrays[name] = np.stack([preprocessor.load(p) for p in large])
        out[f"{name}_cpu_ms"] = round(
            1e3 * (time.process_time() - start) / len(large), 2
        )
    difference = np.abs(arrays["draft"] - arrays["exact"])
    features = {
        k: backbone.run(backbone.preprocessor.collate(list(v)))
        for k, v in arrays.items()
    }
    small = {}
    for name, preprocessor in (("draft", fast), ("exact", exact)):
        start = time.process_time()
        for path in items:
            preprocessor.load(path)
        small[name] = (time.process_time() - start) / len(items)
    out.update(
        speedup=round(out["exact_cpu_ms"] / out["draft_cpu_ms"], 2),
        max_abs_diff=round(float(difference.max()), 4),
        mean_abs_diff=round(float(difference.mean()), 5),
        feature_cosine_min=round(
            float(cosine(features["draft"], features["exact"]).min()), 5
        ),
        images=len(large),
        ants_bees_speedup=round(small["exact"] / small["draft"], 3),
    )
    for path in large:
        os.unlink(path)
    folder.rmdir()
    return out


def thread_sweep(backbone, items) -> list[dict]:
    """End-to-end items/s over decode threads, ORT threads, batch, spinning.

    The spinning rows swap a session built with ``allow_spinning=1`` into
    the per-process session cache, which bneck otherwise builds with 0.
    """
    import onnxruntime as ort

    from features import Extractor
    from features import _backbones as backbones

    path = str(backbone.onnx_path())
    rows = []
    settings = [
        # decode threads, ORT threads, batch, spinning
        (2, 2, 32, "0"),
        (2, 2, 32, "1"),
        (1, 2, 32, "0"),
        (3, 2, 32, "0"),
        (2, 1, 32, "0"),
        (2, 2, 16, "0"),
        (2, 2, 64, "0"),
    ]
    for decode, intra, batch, spin in settings:
        key = (path, intra)
        backbone.session(intra)
        default = backbones._SESSIONS[key]
        if spin == "1":
            options = ort.SessionOptions()
            options.intra_op_num_threads = intra
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            backbones._SESSIONS[key] = ort.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
        extractor = Extractor(
            backbone,
            None,
            batch_size=batch,
            num_threads=intra,
            decode_threads=decode,
            progress=False,
        )
        backbone.run(backbone.preprocessor.sample_inputs(2), intra)
        start = time.perf_counter()
        extractor.extract(items)
        seconds = time.perf_counter() - start
        backbones._SESSIONS[key] = default
        rows.append(
            {
                "decode_threads": decode,
                "ort_threads": intra,
                "batch": batch,
                "spinning": spin == "1",
                "items_per_s": round(len(items) / seconds, 1),
            }
        )
        print("  sweep", rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------- main


def run(backbone_name: str, sweep: bool) -> dict:
    from features import get_backbone

    backbone = get_backbone(backbone_name)
    image = backbone.modality == "image"
    workload = image_workload() if image else text_workload()
    items = workload["items"]
    cores = os.cpu_count() or 1
    report = {
        "backbone": backbone_name,
        "items": len(items),
        "distinct_items": len(set(items)) if not image else None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_before": load_average(),
        "cores": cores,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "batch_size": BATCH,
        "rows": [],
    }
    rows: dict[str, dict] = {}

    def add(record):
        rows[record["name"]] = record
        rate = record["items"] / record["seconds"]
        print(f"  {record['name']}: {rate:.1f} items/s", flush=True)

    report["matmul_gflops"] = matmul_rate()
    print("matmul GFLOP/s", report["matmul_gflops"], flush=True)

    # The baseline first, while nothing of bneck's is loaded.
    if image:
        record, baseline_features = baseline_images(backbone, items)
        add(record)
        baseline_name = record["name"]
    else:
        records, baseline_features = baseline_texts(backbone, items)
        for record in records:
            add(record)
        baseline_name = records[0]["name"]

    backbone.session()  # load the ONNX Runtime session outside the timings
    work = Path(tempfile.mkdtemp(prefix="bneck-bench-"))
    cold, fp32, keys = bneck_extract(backbone, items, work / "s.h5", "bneck fp32, cold")
    add(cold)
    warm, _, _ = bneck_extract(backbone, items, work / "s.h5", "bneck fp32, warm")
    add(warm)
    ok = np.array([key is not None for key in keys])
    report["baseline_cosine_min"] = round(
        float(cosine(baseline_features[ok], fp32).min()), 6
    )

    # Quantize once more from scratch, to time what a first --precision int8
    # run pays (the graph lands in the cache, as it would for the user).
    Path(backbone.quantized(items).onnx_path()).unlink()
    start = time.perf_counter()
    int8_backbone = backbone.quantized(items)
    report["quantize_seconds"] = round(time.perf_counter() - start, 1)
    int8_backbone.session()
    cold8, int8, _ = bneck_extract(
        int8_backbone, items, work / "s8.h5", "bneck int8, cold"
    )
    add(cold8)

    batches = predecoded(backbone, items)
    ceiling = ort_ceiling(backbone, batches, "ort fp32 alone, predecoded")
    add(ceiling)
    ceiling8 = ort_ceiling(int8_backbone, batches, "ort int8 alone, predecoded")
    add(ceiling8)
    del batches
    decode = decode_cpu(backbone, items)
    add(decode)

    # Physical limits: the FLOP rate, and the CPU seconds each item costs.
    if image:
        shapes = {"pixels": [1, 3, 224, 224]}
    else:
        report["padding"] = padding_ratio(backbone, items)
        length = int(round(report["padding"]["mean_tokens"]))
        shapes = {"input_ids": [1, length], "attention_mask": [1, length]}
    flops = graph_flops(str(backbone.onnx_path()), shapes)
    again = matmul_rate()  # the load may have changed since the start
    report["matmul_gflops_end"] = again
    rate = max(report["matmul_gflops"]["best"], again["best"]) * 1e9
    ceiling_rate = ceiling["items"] / ceiling["seconds"]
    report["gflops_per_item"] = round(flops / 1e9, 4)
    report["flop_limit_items_per_s"] = round(rate / flops, 1)
    report["ort_fraction_of_flop_limit"] = round(ceiling_rate * flops / rate, 3)

    computed = cold["computed"]
    infer_cpu = ceiling["cpu_per_item"] * computed / len(items)
    bound = cores / (decode["cpu_per_item"] + infer_cpu)
    report["cpu_per_item"] = {
        "decode_hash": round(decode["cpu_per_item"], 5),
        "inference": round(infer_cpu, 5),
    }
    report["cpu_bound_items_per_s"] = round(bound, 1)
    cold_rate = cold["items"] / cold["seconds"]
    report["end_to_end_fraction_of_cpu_bound"] = round(cold_rate / bound, 3)
    # On a shared machine the process gets fewer than all cores; this is the
    # same fraction against the CPU it was actually given during the run.
    share = cold["cpu_seconds"] / cold["seconds"]
    report["cores_used_end_to_end"] = round(share, 2)
    report["end_to_end_fraction_of_cpu_given"] = round(
        cold_rate / (share / (decode["cpu_per_item"] + infer_cpu)), 3
    )
    report["warm_speedup"] = round(cold["seconds"] / warm["seconds"], 1)

    labels, split = workload["labels"][ok], workload["split"][ok]
    cos = cosine(fp32, int8)
    report["int8"] = {
        "cosine_mean": round(float(cos.mean()), 5),
        "cosine_min": round(float(cos.min()), 5),
        "speedup_end_to_end": round(cold["seconds"] / cold8["seconds"], 2),
        "speedup_ort": round(ceiling["seconds"] / ceiling8["seconds"], 2),
        "accuracy_fp32": round(downstream_accuracy(fp32, labels, split), 4),
        "accuracy_int8": round(downstream_accuracy(int8, labels, split), 4),
    }

    if image:
        report["draft"] = draft_check(backbone, items)
    if sweep:
        report["sweep"] = thread_sweep(backbone, items)

    baseline_rate = rows[baseline_name]["items"] / rows[baseline_name]["seconds"]
    for record in rows.values():
        record["items_per_s"] = round(record["items"] / record["seconds"], 2)
        record["ratio"] = round(record["items_per_s"] / baseline_rate, 2)
        for name in ("seconds", "cpu_seconds", "peak_rss_mb"):
            record[name] = round(record[name], 3)
        report["rows"].append(record)
    report["load_after"] = load_average()
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return report


def markdown(report: dict) -> str:
    """The results as a Markdown table and a list of the derived figures."""
    lines = [
        f"### {report['backbone']}: {report['items']} items, batch "
        f"{report['batch_size']}, {report['cores']} cores",
        "",
        f"Run {report['started']} to {report['finished']}.",
        f"Load before: `{report['load_before']}`; after: `{report['load_after']}`.",
        "",
        "| row | items/s | x baseline | wall s | CPU s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['name']} | {row['items_per_s']:.1f} | {row['ratio']:.2f} | "
            f"{row['seconds']:.2f} | {row['cpu_seconds']:.2f} | "
            f"{row['peak_rss_mb']:.0f} |"
        )
    cpu = report["cpu_per_item"]
    int8 = report["int8"]
    lines += [
        "",
        f"- float32 matmul (2048^2, best of 8, start / end): "
        f"{report['matmul_gflops']} / {report['matmul_gflops_end']} GFLOP/s; model "
        f"{report['gflops_per_item']} GFLOP/item, so the FLOP limit is "
        f"{report['flop_limit_items_per_s']} items/s; ONNX Runtime alone reaches "
        f"{100 * report['ort_fraction_of_flop_limit']:.0f}% of it.",
        f"- CPU s/item: decode + hash {cpu['decode_hash']:.5f}, inference "
        f"{cpu['inference']:.5f}; bound cores / sum = "
        f"{report['cpu_bound_items_per_s']} items/s; end to end reaches "
        f"{100 * report['end_to_end_fraction_of_cpu_bound']:.0f}% of it. The cold "
        f"run got {report['cores_used_end_to_end']} cores of CPU time; against "
        f"that, {100 * report['end_to_end_fraction_of_cpu_given']:.0f}%.",
        f"- warm cache: {report['warm_speedup']}x faster than cold.",
        f"- INT8: quantization {report['quantize_seconds']} s once; "
        f"{int8['speedup_end_to_end']}x end to end, {int8['speedup_ort']}x ONNX "
        f"Runtime alone; cosine to FP32 mean {int8['cosine_mean']}, min "
        f"{int8['cosine_min']}; val accuracy FP32 {int8['accuracy_fp32']:.4f}, "
        f"INT8 {int8['accuracy_int8']:.4f}.",
        f"- baseline vs bneck features: min cosine {report['baseline_cosine_min']}.",
    ]
    if "padding" in report:
        pad = report["padding"]
        lines.append(
            f"- padding: padded / real tokens {pad['sorted']} length-sorted, "
            f"{pad['input_order']} in input order (mean {pad['mean_tokens']} "
            f"tokens); {report['distinct_items']} distinct texts."
        )
    if "draft" in report:
        d = report["draft"]
        lines.append(
            f"- draft decoding, {d['images']} 1600x1200 JPEGs: {d['exact_cpu_ms']} "
            f"-> {d['draft_cpu_ms']} CPU ms/image ({d['speedup']}x); max abs diff "
            f"{d['max_abs_diff']}, mean {d['mean_abs_diff']} (normalised units), "
            f"feature cosine min {d['feature_cosine_min']}; on the ants/bees "
            f"originals {d['ants_bees_speedup']}x."
        )
    for row in report.get("sweep", []):
        lines.append(f"- sweep: {row}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbone", default="efficientnet_lite0", help="registered backbone name"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also sweep thread counts and batch size"
    )
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)

    report = run(args.backbone, args.sweep)
    text = markdown(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"extract-{args.backbone}.json").write_text(json.dumps(report, indent=2))
    (out / f"extract-{args.backbone}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
