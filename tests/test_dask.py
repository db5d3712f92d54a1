"""Extraction and grid search on a real local Dask cluster of two processes."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import distributed
import h5py
import numpy as np
import pytest
from dask.system import CPU_COUNT

from features import (
    ClusterError,
    Extractor,
    FeatureStore,
    dask_client,
    extract_distributed,
)
from features._distributed import TASK_PREFIX
from pipeline.cli import main

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def client(bneck_cache):
    """Two worker processes with one thread each; they inherit the cache dir."""
    with dask_client(workers=2) as client:
        yield client


@pytest.fixture
def two_workers(client):
    client.wait_for_workers(2, timeout=60)
    return client


@pytest.fixture(scope="module")
def dask_extracted(client, ants_bees_train, tmp_path_factory):
    """The ants/bees training images extracted once on the cluster."""
    client.wait_for_workers(2, timeout=60)
    store = tmp_path_factory.mktemp("dask") / "train.h5"
    extractor = Extractor("efficientnet_lite0", store, progress=False)
    result = extract_distributed(
        extractor,
        ants_bees_train.items,
        client,
        ants_bees_train.sources,
        partition_size=32,
    )
    return extractor, result


def shard_rows(store: FeatureStore, fingerprint: str) -> list[str]:
    """Every key of every shard file, repeats included."""
    keys = []
    for path in sorted(store.shard_dir.glob("*.h5")):
        with h5py.File(path, "r") as handle:
            if fingerprint in handle:
                keys.extend(k.decode() for k in handle[fingerprint]["keys"][()])
    return keys


def assert_same_rows(store, reference, keys):
    fingerprint = reference.fingerprint
    assert store.keys(fingerprint) == reference.store.keys(fingerprint)
    ours = store.get(fingerprint, keys)
    theirs = reference.features(keys)
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_dask_extract_matches_single_process(dask_extracted, ants_bees_train_extracted):
    reference, expected = ants_bees_train_extracted
    extractor, result = dask_extracted

    assert result.keys == expected.keys
    distinct = {key for key in expected.keys if key}
    assert result.summary.computed == len(distinct)
    assert result.summary.failed == expected.summary.failed
    assert_same_rows(extractor.store, reference, sorted(distinct))
    # Each partition is its own shard, each row written once.
    rows = shard_rows(extractor.store, extractor.fingerprint)
    assert sorted(rows) == sorted(distinct)
    assert len(list(extractor.store.shard_dir.glob("*.h5"))) == len(result.partitions)
    # Each worker process built its session once, in its first partition.
    pids = {report["pid"] for report in result.partitions}
    built = [report["pid"] for report in result.partitions if report["new_session"]]
    assert sorted(built) == sorted(pids)
    # Two single-threaded workers share this host's cores.
    threads = max(1, CPU_COUNT // 2)
    assert {report["threads"] for report in result.partitions} == {threads}


def test_dask_extract_sends_only_missing_items(
    two_workers, ants_bees_train, ants_bees_train_extracted, tmp_path
):
    reference, expected = ants_bees_train_extracted
    items, sources = ants_bees_train.items, ants_bees_train.sources
    extractor = Extractor("efficientnet_lite0", tmp_path / "f.h5", progress=False)
    stored = sorted({key for key in expected.keys if key})[:200]
    fingerprint = extractor.fingerprint
    meta = reference.store.metadata(fingerprint)
    extractor.store.put(fingerprint, stored, reference.features(stored), meta)

    result = extract_distributed(
        extractor, items, two_workers, sources, partition_size=16
    )

    missing = {key for key in expected.keys if key} - set(stored)
    assert sum(report["items"] for report in result.partitions) == len(missing)
    assert result.summary.computed == len(missing)
    assert result.summary.cached == len(items) - len(missing)
    assert result.keys == expected.keys
    assert_same_rows(extractor.store, reference, sorted(missing | set(stored)))

    again = extract_distributed(extractor, items, two_workers, sources)
    assert again.partitions == []
    assert again.summary.computed == 0
    assert again.keys == result.keys


def test_dask_extract_survives_a_killed_worker(
    two_workers, ants_bees_train, ants_bees_train_extracted, tmp_path
):
    reference, expected = ants_bees_train_extracted
    extractor = Extractor("efficientnet_lite0", tmp_path / "f.h5", progress=False)
    pids = two_workers.run(os.getpid)
    outcome = {}

    def extract():
        try:
            outcome["result"] = extract_distributed(
                extractor,
                ants_bees_train.items,
                two_workers,
                ants_bees_train.sources,
                partition_size=8,
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = exc

    thread = threading.Thread(target=extract)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(extractor.store.shard_dir.glob("[!.]*.h5")):
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    while not (busy := _busy_workers(two_workers)):
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    committed_at_kill = len(list(extractor.store.shard_dir.glob("[!.]*.h5")))
    os.kill(pids[busy[0]], signal.SIGKILL)
    thread.join(timeout=180)

    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    partitions = -(-len({key for key in expected.keys if key}) // 8)
    assert committed_at_kill < partitions  # the kill came mid-job
    assert len(result.partitions) == partitions
    assert result.keys == expected.keys
    distinct = {key for key in expected.keys if key}
    rows = shard_rows(extractor.store, extractor.fingerprint)
    assert len(rows) == len(set(rows)) == len(distinct)
    assert_same_rows(extractor.store, reference, sorted(distinct))


def _busy_workers(client) -> list[str]:
    """Addresses of the workers running an extraction task right now."""
    return [
        address
        for address, keys in client.processing().items()
        if any(str(key).startswith(TASK_PREFIX) for key in keys)
    ]


def test_dask_extract_reports_inputs_a_worker_cannot_read(
    two_workers, ants_bees, tmp_path
):
    """A file gone between the client's hashing and the worker's read."""
    images = sorted((ants_bees / "train" / "ants").glob("*.jpg"))[:3]
    copies = []
    for image in images:
        shutil.copy(image, tmp_path / image.name)
        copies.append(str(tmp_path / image.name))
    extractor = Extractor("efficientnet_lite0", tmp_path / "f.h5", progress=False)
    gate = distributed.Event("bneck-test-gate", client=two_workers)
    held = [
        two_workers.submit(_wait_for, "bneck-test-gate", workers=[address], pure=False)
        for address in two_workers.scheduler_info(n_workers=-1)["workers"]
    ]
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            result=extract_distributed(extractor, copies, two_workers)
        )
    )
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while not two_workers.run_on_scheduler(_extraction_submitted):
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        os.rename(copies[0], copies[0] + ".moved")
    finally:
        gate.set()
        thread.join(timeout=120)
        distributed.wait(held)

    result = outcome["result"]
    assert result.keys[0] is None and None not in result.keys[1:]
    assert result.summary.computed == 2
    [failure] = result.summary.failures
    assert failure["source"] == copies[0]
    assert "cannot read the input (file not found" in failure["reason"]
    assert "filesystem every worker can read" in failure["reason"]
    # The failure is the worker's view, not the content's: not recorded,
    # so the input is computed once it is readable again.
    assert extractor.store.failures(extractor.fingerprint) == {}
    os.rename(copies[0] + ".moved", copies[0])
    again = extract_distributed(extractor, copies, two_workers)
    assert again.summary.computed == 1 and again.summary.failed == 0


def _wait_for(name: str) -> None:
    from distributed import Event

    Event(name).wait(timeout=60)


def _extraction_submitted(dask_scheduler) -> bool:
    return any(str(key).startswith(TASK_PREFIX) for key in dask_scheduler.tasks)


def test_dask_extract_text_matches_single_process(two_workers, sms_sample, tmp_path):
    texts = sms_sample[:60]
    reference = Extractor("minilm_l6", tmp_path / "one.h5", progress=False)
    expected = reference.extract(texts)
    extractor = Extractor("minilm_l6", tmp_path / "f.h5", progress=False)

    result = extract_distributed(extractor, texts, two_workers, partition_size=16)

    assert result.keys == expected.keys
    assert_same_rows(extractor.store, reference, sorted(set(expected.keys)))


def test_cli_extract_on_a_scheduler(two_workers, ants_bees, tmp_path, capsys):
    data = tmp_path / "data"
    for label in ("ants", "bees"):
        (data / label).mkdir(parents=True)
        for image in sorted((ants_bees / "val" / label).glob("*.jpg"))[:3]:
            shutil.copy(image, data / label / image.name)
    address = two_workers.scheduler.address
    store = tmp_path / "f.h5"

    code = main(["extract", str(data), "--store", str(store), "--scheduler", address])

    assert code == 0, capsys.readouterr().err
    assert "6 items: 6 computed, 0 cached, 0 failed" in capsys.readouterr().out
    reference = Extractor("efficientnet_lite0", tmp_path / "one.h5", progress=False)
    keys = reference.extract(sorted(str(p) for p in data.rglob("*.jpg"))).keys
    assert_same_rows(FeatureStore(store), reference, keys)


def test_cli_extract_local_workers(ants_bees, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "ants").mkdir(parents=True)
    for image in sorted((ants_bees / "val" / "ants").glob("*.jpg"))[:2]:
        shutil.copy(image, data / "ants" / image.name)

    code = main(
        [
            "extract",
            str(data),
            "--store",
            str(tmp_path / "f.h5"),
            "--workers",
            "1",
            "--json",
        ]
    )

    assert code == 0, capsys.readouterr().err
    assert '"computed": 2' in capsys.readouterr().out


def test_cli_extract_cluster_errors(ants_bees, tmp_path, capsys):
    data = str(ants_bees / "val")
    store = str(tmp_path / "f.h5")

    code = main(["extract", data, "--store", store, "--workers", "0"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "bneck extract: error: workers=0; expected a positive int"
    )

    with pytest.raises(SystemExit):
        main(["extract", data, "--scheduler", "tcp://x:1", "--workers", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_dask_client_needs_one_target():
    with pytest.raises(ValueError, match="either a scheduler address or a number"):
        with dask_client():
            pass
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        with dask_client("tcp://127.0.0.1:9", timeout=1):
            pass


def test_grid_search_on_the_cluster_reads_the_store(
    two_workers, ants_bees_train, dask_extracted
):
    from joblib import parallel_backend
    from sklearn.model_selection import GridSearchCV

    from pipeline import default_grid, make_classifier

    extractor, result = dask_extracted
    kept = result.ok
    X = [item for item, ok in zip(ants_bees_train.items, kept, strict=True) if ok]
    y = ants_bees_train.labels[kept]
    model = make_classifier("efficientnet_lite0", "logreg", store=extractor.store.path)
    [(name, values)] = default_grid(model).items()
    grid = {name: values[2:4]}
    computed = extractor.store.info()[extractor.fingerprint]["computed"]
    shards = len(list(extractor.store.shard_dir.glob("*.h5")))

    with distributed.get_task_stream(two_workers) as tasks:
        with parallel_backend("dask"):
            search = GridSearchCV(model, grid, cv=3).fit(X, y)
    local = GridSearchCV(model, grid, cv=3).fit(X, y)

    assert any("fit_and_score" in str(task["key"]) for task in tasks.data)
    np.testing.assert_allclose(
        search.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"]
    )
    assert search.best_score_ > 0.85
    # Every fit read its features from the store: nothing new was written.
    assert extractor.store.info()[extractor.fingerprint]["computed"] == computed
    assert len(list(extractor.store.shard_dir.glob("*.h5"))) == shards
