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
