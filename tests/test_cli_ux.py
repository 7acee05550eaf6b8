"""The command line as a user meets it (issue 12, item 3) and dwk's logs on a Prefect worker (item 1).

``--version``; ``--set KEY=VALUE`` overrides; ``dwk config show [--schema]``; config errors as one short
line per problem with the fix; progress bars per stage, only on a terminal; dwk's INFO lines in the
flow-run logs with ``PREFECT_LOGGING_EXTRA_LOGGERS=dwk``, read back from a real Prefect server.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from dwk import progress
from dwk.cli import main
from dwk.config import AutoencoderConfig, RunConfig, apply_sets, load_config, parse_set
from dwk.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PLANTED = [dict(id="p3", planted=dict(shape=[3, 3], n=200, seed=1)),
           dict(id="p5", planted=dict(shape=[5, 5], n=200, seed=2))]


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- --version
def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dwk {version('dwk')}"


# ----------------------------------------------------------------------------- --set
def test_set_reaches_nested_keys_and_list_indices(tmp_path):
    cfg_file = _write(tmp_path / "c.yaml", dict(checkpoints=PLANTED, autoencoder=dict(epochs=50)))
    cfg = load_config(cfg_file, sets=["autoencoder.epochs=5", "cluster.seed=1", "checkpoints[0].id=renamed",
                                      "checkpoints[-1].planted.snr=3.5", "autoencoder.hidden=[32, 16]",
                                      "dask.address=tcp://h:8786", "name=a b"])
    assert cfg.autoencoder.epochs == 5 and cfg.cluster.seed == 1
    assert [c.id for c in cfg.checkpoints] == ["renamed", "p5"]
    assert cfg.checkpoints[1].planted.snr == 3.5 and cfg.checkpoints[1].planted.seed == 2  # the rest is kept
    assert cfg.autoencoder.hidden == (32, 16) and cfg.dask.address == "tcp://h:8786" and cfg.name == "a b"


def test_set_values_are_yaml_and_later_sets_win():
    assert parse_set("a.b=5") == (["a", "b"], 5)
    assert parse_set("a=0.5") == (["a"], 0.5)
    assert parse_set("a=true") == (["a"], True)
    assert parse_set("a=null") == (["a"], None)
    assert parse_set("a=") == (["a"], None)
    assert parse_set("a=x=y") == (["a"], "x=y")  # the first '=' splits
    assert parse_set("checkpoints[2][0].id=x") == (["checkpoints", 2, 0, "id"], "x")
    raw = {"cluster": {"seed": 0}}
    assert apply_sets(raw, ["cluster.seed=1", "cluster.seed=2"]) == {"cluster": {"seed": 2}}
    assert raw == {"cluster": {"seed": 0}}  # the loaded mapping is not changed in place


def test_set_adds_a_checkpoint_one_past_the_end_and_resolves_its_path_from_here(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    cfg_file = _write(cfg_dir / "c.yaml", dict(checkpoints=[dict(id="a", file="w/a.pth")]))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file, sets=["checkpoints[1]={id: b, file: w/b.pth}"])
    # The file's own relative paths are taken from its folder, a --set path from the current folder.
    assert [c.file for c in cfg.checkpoints] == [str(cfg_dir / "w/a.pth"), str(tmp_path / "w/b.pth")]
    # A config may come from --set alone.
    empty = _write(tmp_path / "empty.yaml", {})
    assert load_config(empty, sets=["checkpoints[0].id=x"]).checkpoints[0].id == "x"


@pytest.mark.parametrize("item, expected", [
    ("autoencoder.epochs", "expected KEY=VALUE, e.g. --set autoencoder.epochs=5"),
    ("=5", "expected KEY=VALUE"),
    ("autoencoder..epochs=5", "'' is not a key"),
    ("checkpoints[x].id=5", "'checkpoints[x]' is not a key"),
    ("name=[1, 2", "the value is not valid YAML"),
])
def test_malformed_set_is_a_config_error_showing_the_right_form(item, expected):
    with pytest.raises(ConfigError, match=None) as err:
        parse_set(item)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("item, expected", [
    ("checkpoints[5].id=x", "checkpoints has 2 entries: use an index from 0 to 1, or 2 to add one"),
    ("name.first=x", "name is 'demo', not a mapping"),
    ("cluster[0]=1", "cluster is not a list"),
])
def test_set_that_does_not_fit_the_config_says_why(item, expected):
    with pytest.raises(ConfigError) as err:
        apply_sets({"name": "demo", "checkpoints": PLANTED, "cluster": {}}, [item])
    assert expected in str(err.value)


def test_cli_set_errors_are_one_line_per_problem(tmp_path, capsys):
    cfg_file = _write(tmp_path / "c.yaml", dict(checkpoints=PLANTED))
    assert main(["run", "--config", str(cfg_file), "--set", "autoencodr.epochs=5", "--set",
                 "cluster.sed=1", "--set", "autoencoder.epochs=five"]) == 2
    lines = _err_lines(capsys)
    assert lines[0] == f"dwk: error: config {cfg_file} is not valid (3 problems):"
    assert len(lines) == 4, lines
    by_path = {ln.split(":")[0].strip(): ln for ln in lines[1:]}
    assert "did you mean 'autoencoder'? allowed here: name, checkpoints," in by_path["autoencodr"]
    assert "did you mean 'seed'?" in by_path["cluster.sed"] and "allowed here: mode," in by_path["cluster.sed"]
    assert "valid integer" in by_path["autoencoder.epochs"] and "(got 'five')" in by_path["autoencoder.epochs"]
    assert main(["extract", "--config", str(cfg_file), "--set", "autoencoder.epochs"]) == 2
    assert _err_lines(capsys) == ["dwk: error: --set 'autoencoder.epochs': expected KEY=VALUE, e.g. --set "
                                  "autoencoder.epochs=5, --set cluster.seed=1 or --set checkpoints[0].id=my-model"]


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("text, expected", [
    ("checkpoints: [{id: a, arc: convnext_atto, pretrained: false}]\n",
     ["checkpoints[0].arc: unknown key; did you mean 'arch'? allowed here: id, arch, file,"]),
    ("name: x\n", ["checkpoints: required, but not given: add it to the config (or --set checkpoints=VALUE)"]),
    ("checkpoints: [{id: a, planted: {shape: [3, 3]}}]\ncluster: {mode: fast}\n",
     ["cluster.mode: Input should be 'paper' or 'kmeans' (got 'fast')"]),
    ("checkpoints: [{id: a}\nname: x\n", ["is not valid YAML: line 2, column 1:"]),
    ("- a\n- b\n", ["must hold a mapping at its top level"]),
])
def test_config_errors_are_short_lines_with_the_fix(tmp_path, capsys, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["config", "show", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    for want in expected:
        assert want in err, err
    assert "pydantic" not in err and "Traceback" not in err and "For further information" not in err
    assert all(len(line) < 300 for line in err.splitlines())


# ----------------------------------------------------------------------------- config show
def test_config_show_prints_the_expanded_validated_config_that_runs_as_shown(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "cfg" / "weights"
    (weights / "run1").mkdir(parents=True)
    for name in ("run1/epoch_2.pth", "run1/epoch_10.pth"):
        (weights / name).write_bytes(b"")
    cfg_file = _write(tmp_path / "cfg" / "c.yaml", dict(
        checkpoints=[dict(files="weights/**/*.pth"), dict(id="w", file="weights/run1/epoch_2.pth"), *PLANTED],
        store="store.zarr"))
    monkeypatch.chdir(tmp_path)
    assert main(["config", "show", "--config", str(cfg_file), "--set", "autoencoder.epochs=7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#") and "expanded and validated: 5 checkpoints" in out.splitlines()[0]
    shown = yaml.safe_load(out)
    # files: globs expanded (natural order), relative paths absolute, defaults filled in, --set applied.
    assert [c["id"] for c in shown["checkpoints"]] == ["run1.epoch_2", "run1.epoch_10", "w", "p3", "p5"]
    assert shown["checkpoints"][1]["file"] == str(weights / "run1/epoch_10.pth")
    assert shown["store"] == str(tmp_path / "store.zarr") and Path(shown["out"]).is_absolute()
    assert shown["autoencoder"]["epochs"] == 7 and shown["cluster"]["tau"] == 0.7
    # What it prints is a config that runs exactly that: saved and loaded again, the same RunConfig.
    saved = _write(tmp_path / "shown.yaml", shown)
    assert load_config(saved) == load_config(cfg_file, sets=["autoencoder.epochs=7"])


def test_config_show_schema_is_run_configs_json_schema(capsys):
    assert main(["config", "show", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == RunConfig.model_json_schema()
    assert {"checkpoints", "autoencoder", "cluster"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_config_show_of_the_embedded_demo(capsys):
    assert main(["config", "show"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert RunConfig.model_validate(shown) == load_config()


# ----------------------------------------------------------------------------- progress
@pytest.fixture
def bars():
    """Progress on, into a terminal-like console whose text the test reads; off again afterwards."""
    from rich.console import Console

    out = io.StringIO()
    progress.enable(Console(file=out, force_terminal=True, width=120, color_system=None))
    yield out
    progress.disable()


def test_progress_is_a_noop_unless_enabled(capsys):
    assert not progress.is_enabled()
    assert list(progress.track(range(3), "nothing")) == [0, 1, 2]
    with progress.task("nothing", total=2) as t:
        t.advance(2)
    assert capsys.readouterr() == ("", "")
    assert progress._display is None


def test_training_shows_a_bar_by_epoch(bars):
    x = np.random.default_rng(0).normal(size=(128, 9)).astype(np.float32)
    from dwk import autoencoder

    autoencoder.train(x, AutoencoderConfig(epochs=3, batch_size=64, device="cpu"))
    text = bars.getvalue()
    assert "training autoencoder (9 taps, 128 kernels)" in text and "3/3" in text
    assert progress._display is None  # the display ends with the stage


def test_extraction_shows_a_bar_by_checkpoint_in_pipeline_run(bars, tmp_path, monkeypatch):
    from dwk import pipeline

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(pipeline, "prepare_run", stop)  # extraction only
    cfg = RunConfig.model_validate(dict(checkpoints=PLANTED, store=tmp_path / "s.zarr", out=tmp_path / "runs",
                                        chunk_kernels=128))
    with pytest.raises(Stop):
        pipeline.run(cfg, track=False)
    assert "extracting checkpoints" in bars.getvalue() and "2/2" in bars.getvalue()


def test_log_lines_go_above_the_bars_and_handlers_get_their_streams_back(bars):
    stream = sys.stderr
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("dwk.test_progress")
    log.addHandler(handler)
    try:
        with progress.task("stage", total=2) as t:
            assert handler.stream is not stream  # routed through the display's console
            log.warning("a log line while a bar shows")
            t.advance(2)
        assert handler.stream is stream
    finally:
        log.removeHandler(handler)
    text = bars.getvalue()
    assert "a log line while a bar shows" in text and "stage" in text


def test_disable_ends_a_bar_left_open_by_an_error(bars):
    t = progress.task("a stage that raised", total=10)
    t.advance(3)
    assert progress._display is not None
    progress.disable()
    assert progress._display is None and not progress.is_enabled()
    t.advance()  # a straggler thread: harmless
    assert "3/10" in bars.getvalue()


def test_cli_turns_progress_on_only_for_a_terminal(monkeypatch):
    from dwk.cli import _want_progress, build_parser

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    args = build_parser().parse_args(["run"])
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not _want_progress(args)  # never under pytest
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    assert _want_progress(args)
    assert not _want_progress(build_parser().parse_args(["run", "--no-progress"]))
    assert not _want_progress(build_parser().parse_args(["config", "show"]))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a file
    assert not _want_progress(args)


def _run_in_terminal(cmd: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with its stdout and stderr on a pseudo-terminal; (exit status, what it printed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def _extract_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """``dwk extract`` of two planted checkpoints against the test server, and its environment."""
    from prefect.settings import PREFECT_API_URL

    cfg_file = _write(tmp_path / "c.yaml", dict(checkpoints=PLANTED, store=str(tmp_path / "s.zarr")))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), COLUMNS="120", TERM="xterm-256color")
    return [sys.executable, "-m", "dwk.cli", "extract", "--config", str(cfg_file)], env


@pytest.mark.slow  # about 45 s: a dwk extract under a pseudo-terminal (the default suite stays under 10 minutes)
def test_cli_shows_bars_in_a_terminal(tmp_path, prefect_server):
    """``dwk extract`` (the extraction flow) in a pseudo-terminal: a bar by checkpoint."""
    cmd, env = _extract_command(tmp_path)
    code, shown = _run_in_terminal(cmd, env, timeout=240)
    assert code == 0, shown
    assert "extracting checkpoints" in shown and "2/2" in shown and "━" in shown


@pytest.mark.slow
def test_cli_shows_no_bars_in_a_pipe(tmp_path, prefect_server):
    cmd, env = _extract_command(tmp_path)
    piped = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert piped.returncode == 0, piped.stderr
    assert "extracting checkpoints" not in piped.stdout + piped.stderr and "━" not in piped.stdout + piped.stderr
    assert "extracted" in piped.stdout  # the command's own output is all there


# ----------------------------------------------------------------------------- dwk's logs in Prefect
def _flow_run_logs(flow_run_id: str, needle: str, wait_s: float = 30.0) -> list:
    """The flow run's logs read back from the server, once one holds ``needle`` (logs arrive in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
            if any(needle in log.message for log in logs) or time.monotonic() > deadline:
                return logs
            time.sleep(0.5)


def _prefect_env() -> dict[str, str]:
    """A worker's environment: the test server, the documented setting, no dwk level chosen."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k not in ("DWK_LOG_LEVEL", "PYTEST_CURRENT_TEST",
                                                            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_LOGGING_EXTRA_LOGGERS="dwk")
    return env


def _assert_dwk_info_in(logs: list, n: int) -> None:
    line = f"training autoencoder on {n} kernels of 9 taps"
    dwk_lines = [log for log in logs if log.name.startswith("dwk")]
    assert any(line in log.message and log.level == logging.INFO for log in dwk_lines), \
        [(log.name, log.level, log.message) for log in logs]
    assert any(log.name == "dwk.autoencoder" and "epoch 1/1: cosine loss" in log.message for log in dwk_lines)


@pytest.mark.slow  # the worker test below checks the same through a deployment; this one tells the two apart
def test_dwk_info_lines_reach_the_flow_run_logs(prefect_server):
    """A flow run in a fresh process, with Prefect's logging as on a worker (root at WARNING)."""
    token = str(np.random.default_rng().integers(1000, 9999))
    done = subprocess.run([sys.executable, "tests/flows_for_tests.py", token], env=_prefect_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    flow_run_id = done.stdout.strip().splitlines()[-1]
    n = 100 + int(token)
    _assert_dwk_info_in(_flow_run_logs(flow_run_id, f"training autoencoder on {n} kernels"), n)


def test_dwk_info_lines_reach_the_flow_run_logs_on_a_real_worker(prefect_server, tmp_path):
    """A deployment run by ``prefect worker start --pool <process pool>``, logs read back from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    token = str(np.random.default_rng().integers(1000, 9999))
    pool = f"dwk-test-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow_from_name("dwk-logging-check")
        deployment_id = client.create_deployment(
            flow_id, "worker-check", work_pool_name=pool, entrypoint="tests/flows_for_tests.py:dwk_logging_flow",
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}])
        flow_run = client.create_flow_run_from_deployment(deployment_id, parameters={"token": token})
    worker = subprocess.run([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool,
                             "--run-once", "--limit", "1"], env=_prefect_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state is not None and state.is_completed(), (state, worker.stdout[-3000:] + worker.stderr[-3000:])
    n = 100 + int(token)
    _assert_dwk_info_in(_flow_run_logs(str(flow_run.id), f"training autoencoder on {n} kernels"), n)
