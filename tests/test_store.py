import numpy as np
import pytest
import timm
import zarr

from dwk.extract import extract_model
from dwk.store import KernelStore, check_chunks


@pytest.fixture
def extracted():
    return extract_model(timm.create_model("test_convnext", pretrained=False))


def test_round_trip_and_chunks(tmp_path, extracted):
    store = KernelStore(tmp_path / "s.zarr")
    rec = store.write_checkpoint("m.tag", source="random", fingerprint="f1", extractor_version=1,
                                 extracted=extracted, chunk_kernels=100)
    assert rec.complete and rec.shapes == {"7x7": extracted.n_kernels}
    # a fresh handle (another process would do the same) reads back identical data
    again = KernelStore(tmp_path / "s.zarr", create=False)
    arr = again.kernels("m.tag", "7x7")
    assert arr.chunks == (100, 7, 7)
    assert arr.metadata.dimension_names == ("kernel", "y", "x")
    np.testing.assert_array_equal(arr[:], extracted.kernels["7x7"])
    idx = again.kernel_index("m.tag", "7x7")
    np.testing.assert_array_equal(idx["layer"], extracted.layer["7x7"])
    assert again.checkpoint("m.tag").layers[0]["module"] == extracted.layers[0].module


def test_resume_rules(tmp_path, extracted):
    store = KernelStore(tmp_path / "s.zarr")
    assert not store.is_complete("a", "f1", 1)
    store.write_checkpoint("a", source="file", fingerprint="f1", extractor_version=1, extracted=extracted, chunk_kernels=64)
    assert store.is_complete("a", "f1", 1)
    assert not store.is_complete("a", "f2", 1)      # weights changed
    assert not store.is_complete("a", "f1", 2)      # extractor changed
    # an interrupted write leaves complete=False: it is not trusted
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="a")["checkpoints"]["a"]
    meta = dict(g.attrs["dwk"]); meta["complete"] = False; g.attrs["dwk"] = meta
    assert not store.is_complete("a", "f1", 1)
    store.write_checkpoint("a", source="file", fingerprint="f1", extractor_version=1, extracted=extracted, chunk_kernels=64)
    assert store.is_complete("a", "f1", 1)


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="dwk extract"):
        KernelStore(tmp_path / "missing.zarr", create=False)
    with pytest.raises(ValueError, match="positive integer"):
        check_chunks(0)
    KernelStore(tmp_path / "v.zarr")
    root = zarr.open_group(str(tmp_path / "v.zarr"), mode="a")
    root.attrs["dwk"] = {"schema_version": 999}
    with pytest.raises(ValueError, match="schema version"):
        KernelStore(tmp_path / "v.zarr")


def test_source_metadata_comes_back(tmp_path, extracted):
    store = KernelStore(tmp_path / "s.zarr")
    timm_info = {"architecture": "convnext_atto", "tag": "d2_in1k", "data": "in1k", "resolution": 224}
    store.write_checkpoint("c", source="hub", fingerprint="f", extractor_version=1, extracted=extracted,
                           chunk_kernels=64, extra={"timm": timm_info, "sha256": "abc"})
    rec = store.checkpoint("c")
    assert rec.extra == {"timm": timm_info, "sha256": "abc"} and rec.complete


def _small_extracted(nan_layer: bool = False):
    from dwk.extract import KernelLayer, assemble

    rng = np.random.default_rng(4)
    w = [rng.standard_normal((40, 7, 7)).astype(np.float32) for _ in range(2)]
    if nan_layer:
        w[1][:] = np.nan  # a whole layer of non-finite kernels: its chunks equal the fill value
    return assemble([KernelLayer(module=f"l{i}", weight=x) for i, x in enumerate(w)]
                    + [KernelLayer(module="p", weight=rng.standard_normal((8, 3, 3)).astype(np.float32))])


def test_completion_record_names_every_array_and_every_chunk_is_stored(tmp_path):
    ex = _small_extracted(nan_layer=True)
    store = KernelStore(tmp_path / "s.zarr")
    store.write_checkpoint("c", source="random", fingerprint="f", extractor_version=1, extracted=ex, chunk_kernels=16)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["checkpoints"]["c"]
    record = g.attrs["dwk_complete"]
    assert set(record["arrays"]) == {f"{s}/{n}" for s in ("7x7", "3x3") for n in ("kernels", "layer", "channel")}
    k = record["arrays"]["7x7/kernels"]
    assert (k["shape"], k["count"], k["chunk"], k["n_chunks"], len(k["crc32"])) == ([80, 7, 7], 80, 16, 5, 5)
    assert record["checksum"] == "crc32" and record["location"] == "."
    arr = store.kernels("c", "7x7")
    assert np.isnan(arr.fill_value)  # a chunk that goes missing reads as NaN, not as zero kernels
    # chunks equal to the fill value (the all-NaN layer) are stored all the same: a missing file is damage
    assert arr.nchunks_initialized == arr.nchunks == 5
    out = arr[:]
    assert np.isnan(out[40:]).all() and np.isfinite(out[:40]).all()
    assert store.verify_checkpoint("c") == [] and store.is_complete("c", "f", 1)
    assert store.checkpoint_keys() == ["c"] and store.verify().leftovers == []


@pytest.mark.parametrize("sel", [np.s_[:], np.s_[5], np.s_[-1], np.s_[-1, 2], np.s_[3:70:7], np.s_[70:3:-5],
                                 np.s_[..., 3], np.s_[17:18, 1:3, ::2], np.s_[100:], np.s_[[3, 60]]])
def test_verified_reads_select_like_zarr(tmp_path, sel):
    ex = _small_extracted()
    store = KernelStore(tmp_path / "s.zarr")
    store.write_checkpoint("c", source="random", fingerprint="f", extractor_version=1, extracted=ex, chunk_kernels=16)
    np.testing.assert_array_equal(store.kernels("c", "7x7")[sel], ex.kernels["7x7"][sel])
    if not (isinstance(sel, slice) and (sel.step or 1) < 0):  # plain Zarr refuses negative steps
        np.testing.assert_array_equal(store.kernels("c", "7x7", verify=False)[sel], ex.kernels["7x7"][sel])


def test_unusual_ids_do_not_look_like_temporary_folders(tmp_path):
    from dwk.store import checkpoint_key

    assert checkpoint_key(".tmp-x") == "_tmp-x" and checkpoint_key("a/b c") == "a_b_c"
    store = KernelStore(tmp_path / "s.zarr")
    store.write_checkpoint(".tmp-x", source="random", fingerprint="f", extractor_version=1,
                           extracted=_small_extracted(), chunk_kernels=16)
    assert store.is_complete(".tmp-x", "f", 1) and store.checkpoint(".tmp-x").id == ".tmp-x"
    with pytest.raises(ValueError, match="map to the same store key"):
        store.write_checkpoint("_tmp-x", source="random", fingerprint="f", extractor_version=1,
                               extracted=_small_extracted(), chunk_kernels=16)
