"""Two processes read the store while a third extracts and compacts into it.

Every read must give rows bit-identical to a reference run of the same
writer, or a clear :class:`StoreBusyError`; never a wrong row, a missing
row that was listed, or an HDF5 error from a half-written file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features import FeatureStore, content_key, get_backbone

TRIALS = 3
TEXTS = 180

# Extracts the texts in three rounds, compacting after each: commits and
# compactions both happen while the readers read.
WRITER = """
import json, sys
from features import Extractor, FeatureStore
texts = json.load(open(sys.argv[2], encoding="utf-8"))
store = FeatureStore(sys.argv[1])
extractor = Extractor(
    "minilm_l6", store, batch_size=4, num_threads=1, commit_every=4,
    progress=False,
)
third = len(texts) // 3
for start in range(0, len(texts), third):
    extractor.extract(texts[start : start + third])
    store.compact()
"""

# Reads everything readable until the writer is done, then once more.
READER = """
import json, os, sys, time
import numpy as np
from features import FeatureStore, StoreBusyError
path, reference, fingerprint, done = sys.argv[1:5]
expected = dict(np.load(reference))
report = {"reads": 0, "busy": 0, "bad": [], "errors": [], "partial": 0, "last": 0}
store = FeatureStore(path, lock_timeout=5)
finished = False
while True:
    finished = os.path.exists(done)
    try:
        keys = sorted(store.keys(fingerprint))
        rows = store.get(fingerprint, keys) if keys else []
        for key, row in zip(keys, rows):
            if row.tobytes() != expected[key].tobytes():
                report["bad"].append(key)
        report["reads"] += 1
        report["last"] = len(keys)
        report["partial"] += 0 < len(keys) < len(expected)
    except StoreBusyError:
        report["busy"] += 1
    except Exception as exc:
        report["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
    if finished:
        break
    time.sleep(0.005)
print(json.dumps(report))
"""


def _write(path: Path, texts_file: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(path), str(texts_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(sms_sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    texts = sms_sample[:TEXTS]
    texts_file = root / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    fingerprint = get_backbone("minilm_l6").fingerprint()
    _write(root / "reference.h5", texts_file)
    store = FeatureStore(root / "reference.h5")
    keys = sorted(store.keys(fingerprint))
    assert set(keys) == {content_key(text, "text") for text in texts}
    rows_file = root / "reference.npz"
    np.savez(rows_file, **dict(zip(keys, store.get(fingerprint, keys), strict=True)))
    return root, texts_file, rows_file, fingerprint, len(keys)


def test_readers_see_consistent_rows_while_a_writer_compacts(reference):
    root, texts_file, rows_file, fingerprint, total = reference
    reports = []
    for trial in range(TRIALS):
        store = root / f"trial{trial}" / "features.h5"
        store.parent.mkdir()
        done = store.with_name("writer.done")
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", READER]
                + [str(store), str(rows_file), fingerprint, str(done)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            _write(store, texts_file)
        finally:
            done.touch()
        for reader in readers:
            out, err = reader.communicate(timeout=300)
            assert reader.returncode == 0, err[-3000:]
            reports.append(json.loads(out))

    reads = sum(r["reads"] for r in reports)
    busy = sum(r["busy"] for r in reports)
    partial = sum(r["partial"] for r in reports)
    print(
        f"\nconcurrency: {TRIALS} trials x 2 readers: {reads} consistent reads "
        f"({partial} mid-extraction), {busy} StoreBusyError, "
        f"{sum(len(r['bad']) for r in reports)} wrong rows, "
        f"{sum(len(r['errors']) for r in reports)} other errors"
    )
    for report in reports:
        assert report["bad"] == []
        assert report["errors"] == []
        assert report["last"] == total  # the final read sees every row
    assert partial > 0, "the readers never overlapped the writer"
