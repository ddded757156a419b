"""`eplb-sidecar`'s checks before anything starts: the rank count as vLLM reads it, and one-line errors (exit 2).

Every refusal here comes from ``main(argv)``, the CLI itself, before a coordinator or vLLM
is started; the runs that do start them are in ``test_sidecar.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from eplb_service.sidecar import UsageError, coordinator_ranks, main, vllm_parallelism

FAKE_VLLM = ["/bin/true", "serve", "M"]  # never started: every command here is refused first


@pytest.fixture(autouse=True)
def restore_logging():
    """``main`` configures the root logger (to the captured stderr): put it back for the next test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def refused(capsys, *argv: str) -> str:
    """The one-line error ``main(argv)`` exits 2 with."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("eplb-sidecar: error: ")]
    return line


def ranks(argv: list[str], dp: int | None = None, tp: int | None = None) -> tuple[int, int]:
    return coordinator_ranks(vllm_parallelism(argv), dp, tp)[:2]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["vllm", "serve", "m", "--data-parallel-size", "8", "--enable-expert-parallel"], (8, 1)),
        (["serve", "m", "-dp=4", "--tensor-parallel-size=2"], (4, 2)),
        (["serve", "m", "--data_parallel_size", "8"], (8, 1)),
        (["serve", "m", "--data_parallel_size=8", "--tensor_parallel_size", "2"], (8, 2)),
        (["serve", "m", "-dp", "2", "-dp", "8"], (8, 1)),  # argparse: the last one wins
        (["serve", "m", "-tp", "2", "-pcp", "2"], (1, 4)),  # EP ranks per DP rank = TP x PCP
        (["serve", "m", "--prefill_context_parallel_size=3"], (1, 3)),
        (["serve", "m", "-pp", "1", "-dcp", "2", "-dpl", "4"], (1, 1)),  # none of these adds EP ranks
        (["serve", "m"], (1, 1)),
    ],
)
def test_rank_count_is_read_as_vllm_reads_its_flags(argv, expected):
    assert ranks(argv) == expected


def test_config_file_sizes_count_and_the_command_line_overrides_them(tmp_path):
    config = tmp_path / "v.yaml"
    config.write_text("data_parallel_size: 8\ntensor-parallel-size: 2\nenable-eplb: true\n")
    assert ranks(["serve", "m", "--config", str(config)]) == (8, 2)
    assert ranks(["serve", "m", "--config", str(config), "-tp", "4"]) == (8, 4)
    assert vllm_parallelism(["serve", "m", "--config", str(config)]).eplb is True
    assert vllm_parallelism(["serve", "m", "--config", str(config), "--no-enable-eplb"]).eplb is False


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("data-parallel-size: x\n", "data-parallel-size: x in .*v.yaml: 'x' is not an integer"),
        ("data_parallel_size: 0\n", "data_parallel_size: 0 in .*v.yaml: expected a positive integer, got 0"),
        ("a: [1\n", "is not valid YAML: while parsing"),
        ("- 8\n", "holds list; expected a mapping of vLLM flag names to values"),
    ],
)
def test_a_config_file_vllm_would_refuse_is_refused(tmp_path, config_text, message):
    config = tmp_path / "v.yaml"
    config.write_text(config_text)
    with pytest.raises(UsageError, match=message):
        vllm_parallelism(["serve", "m", "--config", str(config)])


def test_without_pyyaml_the_config_file_sizes_are_assumed_and_said_so(tmp_path, monkeypatch, caplog):
    config = tmp_path / "v.yaml"
    config.write_text("data-parallel-size: 8\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    argv = ["serve", "m", "--config", str(config)]
    with caplog.at_level(logging.WARNING):
        assert ranks(argv) == (1, 1)
    assert (
        f"could not determine vLLM's data-parallel size (pyyaml is not installed, so the sidecar cannot read {config})"
        in caplog.text
    )
    assert "assuming 1; pass --dp N to the sidecar" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ranks(argv, dp=8) == (8, 1)  # the coordinator's own --dp is used, unchecked, and said so
    assert "using the coordinator's --dp 8: vLLM's data-parallel size could not be checked" in caplog.text


def test_an_abbreviated_size_flag_is_not_guessed_but_said(caplog):
    with caplog.at_level(logging.WARNING):
        assert ranks(["serve", "m", "--tensor-parallel", "2"]) == (1, 1)
    assert "the vLLM command has --tensor-parallel, which vLLM may read as --tensor-parallel-size" in caplog.text


def test_an_abbreviated_prefill_context_flag_leaves_the_ranks_per_dp_rank_unknown(caplog):
    """``--prefill-context 2`` may be vLLM's PCP 2: the EP ranks per DP rank (TP x PCP) are then not
    known even though TP is, and the sidecar says so rather than count TP alone as if it were sure."""
    with caplog.at_level(logging.WARNING):
        assert ranks(["serve", "m", "--prefill-context", "2"]) == (1, 1)
    assert (
        "could not determine vLLM's tensor x prefill-context parallel size (the vLLM command has --prefill-context, "
        "which vLLM may read as --prefill-context-parallel-size" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ranks(["serve", "m", "--prefill-context", "2"], tp=2) == (1, 2)  # unchecked, and said so
    assert "using the coordinator's --tp 2: vLLM's tensor x prefill-context parallel size could not be checked" in (
        caplog.text
    )


@pytest.mark.parametrize(
    "coordinator_flags, vllm_flags, message",
    [
        (
            ["--dp", "4"],
            ["-dp", "8"],
            r"the coordinator's --dp 4 contradicts the vLLM command's data-parallel size 8 \(-dp 8",
        ),
        (["--dp=4"], ["--data_parallel_size", "8"], r"--dp 4 contradicts .* size 8 \(--data-parallel-size 8"),
        (["--tp", "2"], ["-tp", "2", "-pcp", "2"], r"--tp 2 contradicts .*prefill-context parallel size 4"),
        (["--dp", "2"], [], r"--dp 2 contradicts the vLLM command's data-parallel size 1 \(vLLM's default\)"),
    ],
)
def test_a_coordinator_size_that_contradicts_vllm_is_refused(capsys, tmp_path, coordinator_flags, vllm_flags, message):
    line = refused(capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", *coordinator_flags, "--", *FAKE_VLLM, *vllm_flags)
    assert re.search(message, line), line
    assert "drop --" in line


def test_a_coordinator_config_file_size_is_checked_too(capsys, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("dp = 4\n")
    line = refused(
        capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", "--config", str(toml), "--", *FAKE_VLLM, "-dp", "8"
    )
    assert "the coordinator's --dp 4 contradicts the vLLM command's data-parallel size 8" in line


def test_the_vllm_config_file_is_checked_against_the_coordinator(capsys, tmp_path):
    config = tmp_path / "v.yaml"
    config.write_text("data-parallel-size: 8\n")
    line = refused(
        capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", "--dp", "4", "--", *FAKE_VLLM, "--config", str(config)
    )
    assert f"data-parallel size 8 (data-parallel-size: 8 in {config})" in line


@pytest.mark.parametrize(
    "vllm_flags, message",
    [
        (["-pp", "2"], "pipeline-parallel size 2 (-pp 2 in the vLLM command): vLLM builds one EP group per pipeline"),
        (["-dp", "x"], "-dp x in the vLLM command: 'x' is not an integer; expected a positive integer"),
        (["--tensor_parallel_size=0"], "--tensor-parallel-size 0 in the vLLM command: expected a positive integer"),
        (["-dp"], "-dp ends the vLLM command without a value"),
        (["--config", "/nonexistent/v.yaml"], "cannot read the vLLM config file '/nonexistent/v.yaml' (--config)"),
        (["--config", "a.yaml", "--config", "b.yaml"], "the vLLM command has --config 2 times"),
    ],
)
def test_vllm_sizes_vllm_would_refuse_are_refused(capsys, tmp_path, vllm_flags, message):
    line = refused(capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", "--", *FAKE_VLLM, *vllm_flags)
    assert message in line, line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "soon"])
def test_ready_timeout_must_be_positive_finite_seconds(capsys, value):
    line = refused(capsys, f"--ready-timeout-s={value}", "--", *FAKE_VLLM)  # -inf alone would read as a flag
    assert line == (
        f"eplb-sidecar: error: argument --ready-timeout-s: expected a finite number > 0, got {value!r} "
        "(see `eplb-sidecar --help`)"
    )


@pytest.mark.parametrize("value", ["verbose", "10", "INFO2"])
def test_bad_log_level_variable_is_one_line(capsys, monkeypatch, value):
    monkeypatch.setenv("EPLB_SERVICE_LOG_LEVEL", value)
    line = refused(capsys, "--", *FAKE_VLLM)
    assert line == (
        f"eplb-sidecar: error: EPLB_SERVICE_LOG_LEVEL={value!r} is not a log level; expected one of DEBUG, INFO, "
        "WARNING, ERROR, CRITICAL (any case)"
    )


def test_bad_log_format_variable_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "xml")
    assert refused(capsys, "--", *FAKE_VLLM) == (
        "eplb-sidecar: error: EPLB_SERVICE_LOG_FORMAT='xml' is not a log format; expected 'text' or 'json'"
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("EPLB_SERVICE_REPORT_INTERVAL_STEPS", "abc", "EPLB_SERVICE_REPORT_INTERVAL_STEPS='abc': expected an integer"),
        ("EPLB_SERVICE_TRANSPORT", "mpi", "EPLB_SERVICE_TRANSPORT='mpi': expected one of auto, gloo, nccl,"),
        ("EPLB_SERVICE_STORE_PORT", "99999", "EPLB_SERVICE_STORE_PORT=99999: expected a port number in [1, 65535]"),
        ("EPLB_SERVICE_STORE_HOST", "tcp://node-0", "EPLB_SERVICE_STORE_HOST='tcp://node-0': expected an address"),
        ("EPLB_SERVICE_DEPLOYMENT", "my model", "EPLB_SERVICE_DEPLOYMENT='my model': deployment id 'my model' has"),
    ],
)
def test_bad_plugin_variable_is_one_line_before_anything_starts(capsys, monkeypatch, name, value, expected):
    """vLLM's API server loads the plugin, which refuses a bad value with a traceback after the
    coordinator had started (or, for the store port, rank 0 never registered)."""
    monkeypatch.setenv(name, value)
    line = refused(capsys, "--", *FAKE_VLLM)
    assert line.startswith(f"eplb-sidecar: error: {expected}") and line.endswith("(read by the vLLM plugin)"), line


def test_a_misspelt_plugin_variable_is_warned_about_before_anything_starts(caplog):
    """Before: a name the plugin does not read (``EPLB_SERVICE_THROTTLE``) passed without a word."""
    from eplb_service.sidecar_checks import check_plugin_environment

    with caplog.at_level(logging.WARNING):
        check_plugin_environment({"EPLB_SERVICE_THROTTLE": "1e9", "PATH": "/bin"}, "ipc:///tmp/x/c.sock")
    assert [r.getMessage() for r in caplog.records] == [
        "[sidecar] EPLB_SERVICE_THROTTLE is set, but eplb-service reads no such variable (ignored); "
        "did you mean EPLB_SERVICE_THROTTLE_BYTES_PER_S?"
    ]


def test_an_inherited_endpoint_the_sidecar_replaces_is_said(caplog):
    """Before: a host-wide ``EPLB_SERVICE_ENDPOINT`` was replaced for vLLM by the sidecar's own
    ``--endpoint`` (its default) without a word; the same one, or none, is quiet."""
    from eplb_service.sidecar_checks import check_plugin_environment

    with caplog.at_level(logging.WARNING):
        check_plugin_environment({"EPLB_SERVICE_ENDPOINT": "tcp://10.0.0.5:5555"}, "ipc:///tmp/x/c.sock")
        check_plugin_environment({"EPLB_SERVICE_ENDPOINT": "ipc:///tmp/x/c.sock"}, "ipc:///tmp/x/c.sock")
        check_plugin_environment({}, "ipc:///tmp/x/c.sock")
    assert [r.getMessage() for r in caplog.records] == [
        "[sidecar] EPLB_SERVICE_ENDPOINT=tcp://10.0.0.5:5555 in this environment is not used: vLLM's workers get "
        "this sidecar's coordinator, ipc:///tmp/x/c.sock (--endpoint tcp://10.0.0.5:5555 to take that one)"
    ]


def test_log_format_flag_reaches_the_vllm_workers_environment(monkeypatch):
    """The plugin in vLLM's workers reads no flag: before, ``--log-format json`` made the sidecar's
    and the coordinator's lines JSON and left the workers' agent lines text in the same stream."""
    from eplb_service import logutil
    from eplb_service.sidecar import plan

    monkeypatch.setenv(logutil.LOG_FORMAT_ENV, "")  # recorded, so the value plan() sets is undone after
    monkeypatch.setattr(logutil, "configure", lambda *args, **kwargs: None)
    _, coordinator_args, _, _ = plan(["--log-format", "json", "--dp", "1", "--", "vllm", "serve", "M", "--enable-eplb"])
    assert os.environ[logutil.LOG_FORMAT_ENV] == "json" and coordinator_args[-2:] == ["--log-format", "json"]


def test_bad_log_level_is_one_line_from_the_real_cli():
    """The reviewer's case, end to end: a traceback before."""
    out = subprocess.run(
        [sys.executable, "-m", "eplb_service.sidecar", "--", *FAKE_VLLM],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, EPLB_SERVICE_LOG_LEVEL="verbose"),
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "eplb-sidecar: error: EPLB_SERVICE_LOG_LEVEL='verbose' is not a log level; expected one of DEBUG, INFO, "
        "WARNING, ERROR, CRITICAL (any case)"
    ]


@pytest.fixture
def taken_port():
    """A TCP port something listens on (on every address, as a coordinator's metrics server would)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("port", ["70000", "65536", "-1"])
def test_metrics_port_outside_the_tcp_range_is_refused(capsys, tmp_path, port):
    line = refused(capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", "--metrics-port", port, "--", *FAKE_VLLM)
    assert line == (
        f"eplb-sidecar: error: argument --metrics-port: expected a port 0-65535 (0: any free port), got {port} "
        "(in the flags for the coordinator: see `eplb-coordinator serve --help`)"
    )


def test_metrics_port_in_use_is_refused(capsys, tmp_path, taken_port):
    line = refused(
        capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", "--metrics-port", str(taken_port), "--", *FAKE_VLLM
    )
    assert f"--metrics-port {taken_port}: cannot listen on it (Address already in use)" in line


def test_metrics_port_from_the_coordinator_config_file_is_checked(capsys, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("metrics-port = 70000\n")
    line = refused(capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", "--config", str(toml), "--", *FAKE_VLLM)
    assert "metrics-port = 70000: expected a port 0-65535 (0: any free port), got 70000" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--metrics-port", "abc"],
            "argument --metrics-port: expected a port 0-65535, got 'abc' (in the flags for the coordinator",
        ),
        (["--bogus"], "unrecognized arguments: --bogus (in the flags for the coordinator"),
    ],
)
def test_bad_coordinator_flags_are_refused_before_anything_starts(capsys, tmp_path, flags, message):
    assert message in refused(capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", *flags, "--", *FAKE_VLLM)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--simulate"], "--simulate runs simulated ranks in place of vLLM"),
        (["--steps", "5"], "--steps applies only with --simulate"),
        (["--record", "{tmp}/no/such/dir/t.npz"], "--record '{tmp}/no/such/dir/t.npz': directory"),
        (["--initial-placement", "{tmp}/none.json"], "--initial-placement {tmp}/none.json: No such file"),
        (["--curve-dir", "{tmp}"], "--curve-dir '{tmp}' has no server.key_secret"),
        (
            ["--log-level", "chatty"],
            "argument --log-level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL (any case), got 'chatty'",
        ),
    ],
)
def test_coordinator_settings_it_would_refuse_are_refused_before_it_starts(capsys, tmp_path, flags, message):
    """Before, the sidecar started the coordinator with them: it refused them after its start,
    in lines of its own, and ``--simulate`` ran a whole simulated deployment (a process per rank
    of the vLLM command) before the sidecar gave up on it. The refusal is the only line: the
    sidecar said where its rank count came from first (an INFO line before the error)."""
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    err = refused_err(capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", *flags, "--", *FAKE_VLLM)
    assert err.startswith("eplb-sidecar: error: ") and message.format(tmp=tmp_path) in err, err


def test_simulate_from_the_coordinator_config_file_is_refused_too(capsys, tmp_path):
    toml = tmp_path / "eplb.toml"
    toml.write_text("simulate = true\n")
    line = refused(capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", "--config", str(toml), "--", *FAKE_VLLM)
    assert "--simulate runs simulated ranks in place of vLLM" in line


@pytest.mark.parametrize(
    "endpoint, message",
    [
        ("foo", "--endpoint 'foo': expected ipc://PATH or tcp://HOST:PORT"),
        ("tcp://127.0.0.1:99999", "port '99999' is not a port; expected 1-65535"),  # zmq would bind 34463
        ("tcp://127.0.0.1:-1", "port '-1' is not a port; expected 1-65535"),
        ("tcp://127.0.0.1", "names no port; expected tcp://HOST:PORT"),
        ("tcp://*:5555", "--endpoint 'tcp://*:5555': agents cannot connect to it"),
        ("ipc://", "--endpoint 'ipc://': expected ipc://PATH"),
        ("ipc:///tmp/" + "a" * 120 + ".sock", "the socket path is 130 bytes; unix sockets take at most 107"),
    ],
)
def test_unusable_endpoint_is_refused(capsys, endpoint, message):
    assert message in refused(capsys, "--endpoint", endpoint, "--", *FAKE_VLLM)


def test_endpoint_whose_directory_cannot_hold_a_socket_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    line = refused(capsys, "--endpoint", f"ipc://{tmp_path}/file/c.sock", "--", *FAKE_VLLM)
    assert f"--endpoint ipc://{tmp_path}/file/c.sock: socket directory {tmp_path}/file is a symlink or not a" in line


def test_ipc_endpoint_a_coordinator_serves_is_refused_before_anything_starts(capsys, tmp_path):
    """Before: the sidecar started its coordinator there, which refused the live one's endpoint,
    and the sidecar exited 1 after two lines; a tcp:// endpoint in use was already exit 2."""
    from coordinator_thread import CoordinatorThread

    from eplb_service.coordinator.config import CoordinatorConfig

    endpoint = f"ipc://{tmp_path}/run/c.sock"
    live = CoordinatorThread(CoordinatorConfig(world_size=1, endpoint=endpoint)).start()
    try:
        line = refused(capsys, "--endpoint", endpoint, "--", *FAKE_VLLM)
    finally:
        live.stop()
    assert f"--endpoint {endpoint}: a coordinator (pid {os.getpid()}) already serves {endpoint}" in line


def test_ipc_endpoint_that_is_not_a_socket_is_refused(capsys, tmp_path):
    (tmp_path / "c.sock").write_text("")
    line = refused(capsys, "--endpoint", f"ipc://{tmp_path}/c.sock", "--", *FAKE_VLLM)
    assert f"{tmp_path}/c.sock is not a socket; expected a coordinator's ipc:// socket or nothing there" in line
    assert (tmp_path / "c.sock").read_text() == ""  # left as it was


def test_tcp_endpoint_in_use_is_refused(capsys, taken_port):
    line = refused(capsys, "--endpoint", f"tcp://127.0.0.1:{taken_port}", "--", *FAKE_VLLM)
    assert (
        f"--endpoint tcp://127.0.0.1:{taken_port}: the coordinator cannot listen there (Address already in use)" in line
    )


def test_a_refused_sidecar_flag_is_one_line(capsys, monkeypatch):
    """Before: argparse printed the sidecar's usage (two lines) before the error, where the README
    promises one line for every mistake."""
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "")
    try:
        main(["--ready-timeout-s", "-1", "--", *FAKE_VLLM])
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "eplb-sidecar: error: argument --ready-timeout-s: expected a finite number > 0, got '-1' "
        "(see `eplb-sidecar --help`)"
    ]


def test_the_coordinator_config_files_log_format_is_the_sidecars_and_the_workers(tmp_path, capsys, monkeypatch):
    """Before: ``log-format = "json"`` in the coordinator's ``--config`` made only the coordinator's
    lines JSON: the sidecar's (its refusals included) and vLLM's workers' stayed text."""
    from eplb_service import logutil
    from eplb_service.sidecar import plan

    monkeypatch.setenv(logutil.LOG_FORMAT_ENV, "")  # recorded, so the value plan() sets is undone after
    path = tmp_path / "eplb.toml"
    path.write_text('log-format = "json"\ndp = 4\n')
    assert json.loads(refused_err(capsys, "--config", str(path), "--", *FAKE_VLLM, "-dp", "2"))["tag"] == "sidecar"
    configured = []
    monkeypatch.setattr(logutil, "configure", lambda *args, **kwargs: configured.append(args[1]))
    plan(["--endpoint", f"ipc://{tmp_path}/sock/c.sock", "--config", str(path), "--", *FAKE_VLLM, "-dp", "4"])
    assert configured == ["json"] and os.environ[logutil.LOG_FORMAT_ENV] == "json"


def refused_err(capsys, *argv: str) -> str:
    """The whole stderr of ``main(argv)``, which must exit 2 with one line."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err
