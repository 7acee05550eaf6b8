"""Store integrity drills (issue 10): concurrent writers, racing store creation, damaged chunks, kill -9.

Real Zarr stores on disk and real processes (spawned, so no Zarr event-loop thread is forked); every
drill is bounded in time. Worker functions live at module level so spawned processes can import them.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from dwk.errors import StoreDamageError, StoreError, StoreSchemaError
from dwk.extract import KernelLayer, assemble
from dwk.store import SCHEMA_VERSION, KernelStore, checkpoint_key

CTX = mp.get_context("spawn")
TIMEOUT_S = 120


def make_extracted(seed: int, channels: int = 96):
    """A small checkpoint: three 7x7 layers and one 5x5 layer, with planted labels."""
    rng = np.random.default_rng(seed)
    items = [KernelLayer(module=f"stage{i}.dw", weight=rng.standard_normal((channels, 7, 7)).astype(np.float32))
             for i in range(3)]
    items.append(KernelLayer(module="head.dw", weight=rng.standard_normal((channels // 2, 5, 5)).astype(np.float32)))
    labels = {it.module: rng.integers(-1, 14, len(it.weight)).astype(np.int16) for it in items}
    return assemble(items, labels)


def write(store: KernelStore, ckpt_id: str, seed: int, fingerprint: str, chunk_kernels: int = 32):
    return store.write_checkpoint(ckpt_id, source="planted", fingerprint=fingerprint, extractor_version=1,
                                  extracted=make_extracted(seed), chunk_kernels=chunk_kernels)


def assert_holds(store: KernelStore, ckpt_id: str, seed: int) -> None:
    """The checkpoint reads back exactly what ``make_extracted(seed)`` wrote, every chunk verified."""
    ex = make_extracted(seed)
    for shape, kernels in ex.kernels.items():
        np.testing.assert_array_equal(store.kernels_verified(ckpt_id, shape), kernels)
        idx = store.kernel_index(ckpt_id, shape)
        np.testing.assert_array_equal(idx["layer"], ex.layer[shape])
        np.testing.assert_array_equal(idx["channel"], ex.channel[shape])
        np.testing.assert_array_equal(idx["label"], ex.labels[shape])


def chunk_file(store_path: Path, ckpt_id: str, array: str, chunk: int) -> Path:
    ndim = 3 if array.endswith("kernels") else 1
    return store_path / "checkpoints" / checkpoint_key(ckpt_id) / array / "c" / "/".join(
        [str(chunk)] + ["0"] * (ndim - 1))


# ----------------------------------------------------------------------------- worker processes
def _writer(args) -> str:
    store_path, ckpt_id, seed, fingerprint, delay = args
    time.sleep(delay)
    rec = write(KernelStore(store_path), ckpt_id, seed, fingerprint)
    return rec.fingerprint


def _opener(barrier, paths, errors) -> None:
    for p in paths:
        barrier.wait(timeout=60)
        try:
            KernelStore(p)
        except Exception as e:  # noqa: BLE001 - the test reports whatever a process met
            errors.put(f"{p}: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- concurrent writers
def test_concurrent_writers_of_one_checkpoint_end_with_one_verified_copy(tmp_path):
    """Several processes write one checkpoint into a fresh store at random small delays; a reader polls.

    Every round ends with one complete checkpoint that verifies and holds exactly the written data,
    no temporary folder is left, and whenever the reader saw the checkpoint complete, it read whole.
    """
    rng = random.Random(10)
    seen_complete = 0
    with CTX.Pool(4) as pool:
        pool.map(time.sleep, [0] * 4)  # start the workers before timing anything
        for rnd in range(4):
            path = tmp_path / f"s{rnd}.zarr"
            jobs = [(path, "m.tag", 7, "fp", rng.uniform(0, 0.03)) for _ in range(4)]
            res = pool.map_async(_writer, jobs)
            deadline = time.monotonic() + TIMEOUT_S
            while not res.ready() and time.monotonic() < deadline:
                if (path / "zarr.json").exists() and (path / "checkpoints" / "zarr.json").exists():
                    store = KernelStore(path, create=False)
                    if store.is_complete("m.tag", "fp", 1):
                        assert_holds(store, "m.tag", 7)  # never a half checkpoint
                        seen_complete += 1
                time.sleep(0.005)
            assert res.get(timeout=TIMEOUT_S) == ["fp"] * 4
            store = KernelStore(path, create=False)
            assert store.is_complete("m.tag", "fp", 1)
            assert store.verify_checkpoint("m.tag", full=True) == []
            assert_holds(store, "m.tag", 7)
            result = store.verify()
            assert result.ok and result.n_checkpoints == 1 and result.leftovers == []
    assert seen_complete > 0  # the reader did look at published copies while writers ran


def test_concurrent_writers_of_different_weights_and_a_stale_copy(tmp_path):
    """Writers of two fingerprints race to replace a stale copy: one complete copy wins, whole."""
    path = tmp_path / "s.zarr"
    write(KernelStore(path), "c", 1, "old")
    rng = random.Random(3)
    seeds = {"fA": 11, "fB": 12}
    with CTX.Pool(4) as pool:
        for _ in range(3):
            jobs = [(path, "c", seeds[fp], fp, rng.uniform(0, 0.03)) for fp in ("fA", "fB", "fA", "fB")]
            pool.map_async(_writer, jobs).get(timeout=TIMEOUT_S)
            store = KernelStore(path, create=False)
            rec = store.checkpoint("c")
            assert rec.complete and rec.fingerprint in seeds
            assert store.is_complete("c", rec.fingerprint, 1)
            assert store.verify_checkpoint("c") == []
            assert_holds(store, "c", seeds[rec.fingerprint])  # the data of the fingerprint it claims
            assert store.verify().leftovers == []


def test_second_writer_reuses_a_verified_copy_and_replaces_a_damaged_one(tmp_path):
    store = KernelStore(tmp_path / "s.zarr")
    write(store, "c", 1, "f")
    final = tmp_path / "s.zarr" / "checkpoints" / "c"
    inode = final.stat().st_ino
    write(store, "c", 1, "f")  # a late writer of the same weights: keeps the published copy
    assert final.stat().st_ino == inode and store.verify_checkpoint("c") == []
    chunk_file(tmp_path / "s.zarr", "c", "7x7/kernels", 1).unlink()
    assert not store.is_complete("c", "f", 1)  # cheap check: a chunk file is missing
    write(store, "c", 1, "f")  # ... so it is written again, whole
    assert final.stat().st_ino != inode
    assert store.is_complete("c", "f", 1) and store.verify_checkpoint("c") == []
    assert_holds(store, "c", 1)
    assert store.verify().leftovers == []


def test_processes_create_a_fresh_store_at_once(tmp_path):
    """Three processes open each of 40 fresh stores at the same moment: all succeed.

    (The store before issue 10 raised ContainsGroupError here in most of the 40 rounds.)
    """
    paths = [tmp_path / f"s{i}.zarr" for i in range(40)]
    barrier, errors = CTX.Barrier(3), CTX.Queue()
    procs = [CTX.Process(target=_opener, args=(barrier, paths, errors)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    for p in paths:
        root = zarr.open_group(str(p), mode="r")
        assert root.attrs["dwk"] == {"schema_version": SCHEMA_VERSION}
        assert {"checkpoints", "runs"} <= set(root.group_keys())


# ----------------------------------------------------------------------------- damage is found
def test_deleted_chunk_is_found_and_never_read_as_zeros(tmp_path):
    path = tmp_path / "s.zarr"
    store = KernelStore(path)
    write(store, "c", 1, "f")
    chunk_file(path, "c", "7x7/kernels", 2).unlink()
    damage = store.verify_checkpoint("c", full=True)
    assert [(d.checkpoint, d.array, d.chunk) for d in damage] == [("c", "7x7/kernels", 2)]
    assert "missing" in str(damage[0])
    assert not store.is_complete("c", "f", 1)  # so extraction redoes it
    with pytest.raises(StoreDamageError, match=r"checkpoint 'c', array 7x7/kernels, chunk 2") as err:
        store.kernels("c", "7x7")[:]
    assert (err.value.ckpt_id, err.value.array, err.value.chunk) == ("c", "7x7/kernels", 2)
    # Reading around the verification: the missing chunk is NaN (non-finite), not zero ("dead") kernels.
    raw = store.kernels("c", "7x7", verify=False)[64:96]
    assert np.isnan(raw).all()
    # Other chunks still read and verify.
    np.testing.assert_array_equal(store.kernels("c", "7x7")[:64], make_extracted(1).kernels["7x7"][:64])
    # An index array's missing chunk is found too.
    chunk_file(path, "c", "5x5/layer", 0).unlink()
    with pytest.raises(StoreDamageError, match="array 5x5/layer, chunk 0"):
        store.kernel_index("c", "5x5")


@pytest.mark.parametrize("how", ["truncated", "empty", "other chunk's data", "one byte changed"])
def test_truncated_or_altered_chunk_is_named_not_a_bare_decompression_error(tmp_path, how):
    path = tmp_path / "s.zarr"
    store = KernelStore(path)
    write(store, "c", 1, "f")
    f = chunk_file(path, "c", "7x7/kernels", 3)
    data = f.read_bytes()
    mid = len(data) // 2
    f.write_bytes({"truncated": data[:mid], "empty": b"",
                   "other chunk's data": chunk_file(path, "c", "7x7/kernels", 4).read_bytes(),
                   "one byte changed": data[:mid] + bytes([data[mid] ^ 0x55]) + data[mid + 1:]}[how])
    # The cheap check (no data read) finds a file of another size, so `dwk extract` redoes the
    # checkpoint instead of saying "skipped"; a swap with a file of the same size needs the checksums.
    changed_size = len(f.read_bytes()) != len(data)
    assert store.is_complete("c", "f", 1) is not changed_size
    for full in (False, True):
        damage = store.verify_checkpoint("c", full=full)
        if not full and not changed_size:
            assert damage == []
            continue
        assert [(d.array, d.chunk) for d in damage] == [("7x7/kernels", 3)]
        assert any(m in damage[0].problem for m in (("truncated or replaced",) if changed_size
                                                    else ("checksum mismatch", "cannot be decoded")))
    with pytest.raises(StoreDamageError, match=r"checkpoint 'c', array 7x7/kernels, chunk 3: kernels 96-127"):
        store.kernels_verified("c", "7x7")
    with pytest.raises(StoreDamageError, match="chunk 3"):
        store.kernels("c", "7x7")[100]  # a single kernel of the damaged chunk


def test_analysis_reading_a_damaged_checkpoint_fails_naming_it(tmp_path, sync_dask):
    """normalize_shape (the analysis' reader, through Dask) raises StoreDamageError, not a count of dead kernels."""
    from dwk.config import NormalizeConfig
    from dwk.normalize import normalize_shape

    path = tmp_path / "s.zarr"
    store = KernelStore(path)
    write(store, "c", 1, "f")
    store.create_run("r", dict(checkpoints=[dict(id="c", source="planted", control=False)], shapes=["7x7"], offsets={}))
    res = normalize_shape(store, "r", "7x7", ["c"], NormalizeConfig(), chunk_kernels=64)
    assert res.n_dead == 0 and res.n_kernels == 288
    chunk_file(path, "c", "7x7/kernels", 5).unlink()
    with pytest.raises(StoreDamageError, match="checkpoint 'c', array 7x7/kernels, chunk 5"):
        normalize_shape(store, "r", "7x7", ["c"], NormalizeConfig(), chunk_kernels=64)


def test_damaged_metadata_and_missing_array_are_damage(tmp_path):
    path = tmp_path / "s.zarr"
    store = KernelStore(path)
    write(store, "a", 1, "f")
    write(store, "b", 2, "f")
    (path / "checkpoints" / "a" / "zarr.json").write_text("{trunc")
    shutil.rmtree(path / "checkpoints" / "b" / "5x5" / "label")
    assert not store.is_complete("a", "f", 1) and not store.is_complete("b", "f", 1)
    result = store.verify()
    assert set(result.damaged) == {"a", "b"}
    assert "cannot be read" in result.damaged["a"][0].problem
    assert [(d.array, d.problem) for d in result.damaged["b"]] == [("5x5/label", "array missing")]
    with pytest.raises(StoreError, match="checkpoint 'a'"):
        store.checkpoint("a")


# ----------------------------------------------------------------------------- dwk verify
def test_dwk_verify_exit_codes_and_repair(tmp_path, capsys):
    from dwk.cli import main

    path = tmp_path / "s.zarr"
    store = KernelStore(path)
    write(store, "good", 1, "f")
    write(store, "bad", 2, "f")
    assert main(["verify", "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "verify: 2 checkpoints" in out and ": 0 damaged" in out

    chunk_file(path, "bad", "7x7/kernels", 1).write_bytes(b"\x00\x01")
    assert main(["verify", "--store", str(path)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED  checkpoint 'bad', array 7x7/kernels, chunk 1:" in out
    assert "good" not in out.split("verify:")[0] and ": 1 damaged" in out
    assert not store.is_complete("bad", "f", 1)  # a truncated chunk file: the next extraction redoes it

    assert main(["verify", "--store", str(path), "--repair"]) == 1
    out = capsys.readouterr().out
    assert "REPAIRED bad" in out and "extracts it again" in out and "1 moved aside" in out
    assert store.checkpoint("bad") is None and not store.is_complete("bad", "f", 1)  # re-extracted next time
    assert store.is_complete("good", "f", 1)
    assert main(["verify", "--store", str(path)]) == 0  # the damaged copy is aside, listed, not a checkpoint
    assert "LEFTOVER .damaged-bad-" in capsys.readouterr().out

    write(store, "bad", 2, "f")  # what the next extraction does
    assert main(["verify", "--store", str(path)]) == 0
    assert_holds(store, "bad", 2)
    assert main(["verify", "--store", str(tmp_path / "nothing.zarr")]) == 2  # no store: a user error


# ----------------------------------------------------------------------------- kill -9
_KILL_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from dwk.extract import KernelLayer, assemble
    from dwk.store import KernelStore
    rng = np.random.default_rng(5)
    ex = assemble([KernelLayer(module=f"l{i}", weight=rng.standard_normal((1000, 7, 7)).astype(np.float32))
                   for i in range(40)])
    store = KernelStore(sys.argv[1])
    print("writing", flush=True)
    store.write_checkpoint("big", source="x", fingerprint="f", extractor_version=1, extracted=ex, chunk_kernels=256)
    print("done", flush=True)
""")


def test_kill_9_mid_write_leaves_nothing_that_reads_as_complete(tmp_path):
    """A writer of a 40,000-kernel checkpoint (about 0.5 s to write) is killed at random moments.

    After each kill: the store opens, the checkpoint is either absent or complete and verified, and
    the next writer removes the dead writer's temporary folder and publishes a whole copy.
    """
    rng = random.Random(9)
    path = tmp_path / "s.zarr"
    outcomes = []
    for delay in [0.0, 0.1, 0.25, 0.4] + [rng.uniform(0, 0.6) for _ in range(2)]:
        if (path / "checkpoints" / "big").exists():
            shutil.rmtree(path / "checkpoints" / "big")
        child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "writing"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(TIMEOUT_S)
        store = KernelStore(path, create=False)
        if store.checkpoint("big") is None:
            outcomes.append("absent")
            assert not store.is_complete("big", "f", 1)
            assert store.checkpoint_keys() == []  # the temporary folder is not a checkpoint
        else:
            outcomes.append("complete")
            assert store.is_complete("big", "f", 1) and store.verify_checkpoint("big") == []
        leftovers = store.verify().leftovers
        assert all(n.startswith(".tmp-big-") for n in leftovers)
        ex_store = KernelStore(path)
        ex_store.cleanup(key="big")  # what the next writer of "big" does first
        assert ex_store.verify().leftovers == []  # the dead writer's folder is gone (same host, pid gone)
    assert "absent" in outcomes  # at least one kill landed mid-write


def test_cleanup_keeps_live_writers_and_removes_dead_or_old_ones(tmp_path):
    store = KernelStore(tmp_path / "s.zarr")
    ckpts = tmp_path / "s.zarr" / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from dwk.store import _pid_namespace

    host = os.uname().nodename
    writers = {
        "live": dict(host=host, pid=os.getpid(), pidns=_pid_namespace(), started=time.time()),
        "dead": dict(host=host, pid=int(dead.stdout), pidns=_pid_namespace(), started=time.time()),
        "elsewhere": dict(host="another-host", pid=1, pidns=1, started=time.time()),
        "old": dict(host="another-host", pid=1, pidns=1, started=time.time() - 2 * 24 * 3600),
    }
    for name, w in writers.items():
        zarr.open_group(str(ckpts / f".tmp-c-{name}"), mode="w", attributes={"dwk_writer": w})
    (ckpts / ".tmp-c-nometa").mkdir()  # killed before its first metadata write: age decides
    removed = store.cleanup(key="c")
    assert sorted(removed) == [".tmp-c-dead", ".tmp-c-old"]
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".")) == [
        ".tmp-c-elsewhere", ".tmp-c-live", ".tmp-c-nometa"]
    # With no age limit only writers that cannot be asked go; a live one of this host stays.
    assert sorted(store.cleanup(key="c", max_age_s=-1)) == [".tmp-c-elsewhere", ".tmp-c-nometa"]
    assert (ckpts / ".tmp-c-live").is_dir()


def test_old_store_schema_is_refused_clearly(tmp_path):
    zarr.open_group(str(tmp_path / "v1.zarr"), mode="w", attributes={"dwk": {"schema_version": 1}})
    with pytest.raises(StoreSchemaError, match="schema version 1, this dwk writes 2: use a new store path"):
        KernelStore(tmp_path / "v1.zarr")
    assert issubclass(StoreSchemaError, ValueError)  # the CLI prints it as a user error
