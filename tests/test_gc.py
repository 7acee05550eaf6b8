"""dwk gc: runs left unfinished by a dead process are found and removed; live and finished runs stay."""
import subprocess
import sys

from dwk.cli import main
from dwk.store import KernelStore


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # gone now (and not reused within the test, in practice)


def test_gc_lists_and_removes_only_orphaned_runs(tmp_path, capsys):
    store = KernelStore(tmp_path / "s.zarr")
    for run_id in ("finished", "live", "killed", "old-elsewhere", "from-older-dwk"):
        store.create_run(run_id, {"groups": {}})
    store.finish_run("finished")
    meta = store.run_meta("killed")
    store.update_run_meta("killed", dwk_writer={**meta["dwk_writer"], "pid": _dead_pid()})
    meta = store.run_meta("old-elsewhere")
    store.update_run_meta("old-elsewhere", dwk_writer={**meta["dwk_writer"], "host": "another-node",
                                                         "started": meta["dwk_writer"]["started"] - 48 * 3600})
    g = store._run("from-older-dwk")  # a run group written before the finished mark existed
    g.attrs["dwk"] = {"groups": {}}

    orphans = dict(store.orphaned_runs())
    assert set(orphans) == {"killed", "old-elsewhere"}
    assert "is gone" in orphans["killed"] and "48.0 h ago on another-node" in orphans["old-elsewhere"]
    assert main(["gc", "--store", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "ORPHANED  killed" in out and "2 orphaned run(s)" in out and "--remove" in out
    assert main(["gc", "--store", str(tmp_path / "s.zarr"), "--remove"]) == 0
    runs = set(KernelStore(tmp_path / "s.zarr").root["runs"].group_keys())
    assert runs == {"finished", "live", "from-older-dwk"}
    assert main(["gc", "--store", str(tmp_path / "nope.zarr")]) == 2
