"""A user's mistakes on `eplb-coordinator`'s command line end in one line naming the value, before anything runs.

Each case here once started a coordinator that looked healthy and never rebalanced (a fence
timeout every agent refuses), silently changed what was asked (a port wrapped modulo 65536,
the string "false" read as true), or crashed with a traceback after a whole simulated run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from time_limit import time_limit

from eplb_service import logutil
from eplb_service.coordinator.cli import STOP_SIGNALS, main, parse_command_line
from eplb_service.coordinator.config import CoordinatorConfig, check_endpoint
from eplb_service.integrations.vllm import config as plugin_config
from eplb_service.protocol import AgentConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        with time_limit(300, f"eplb-coordinator {' '.join(argv)}"):
            code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--fence-timeout-s", "-1", "expected a finite number > 0, got '-1'"),
        ("--fence-timeout-s", "0", "expected a finite number > 0, got '0'"),
        ("--fence-timeout-s", "nan", "expected a finite number > 0, got 'nan'"),
        ("--throttle-bytes-per-s", "-5", "expected a finite number >= 0, got '-5'"),
        ("--throttle-bytes-per-s", "nan", "expected a finite number >= 0, got 'nan'"),
        ("--min-gain", "inf", "expected a balancedness gain >= 0 and below 1 (0.01 = one percentage point), got 'inf'"),
        ("--min-gain", "5", "expected a balancedness gain >= 0 and below 1 (0.01 = one percentage point), got '5'"),
        ("--min-gain", "1", "expected a balancedness gain >= 0 and below 1 (0.01 = one percentage point), got '1'"),
        ("--metrics-port", "70000", "expected a port 0-65535 (0: any free port), got 70000"),
        ("--metrics-port", "-1", "expected a port 0-65535 (0: any free port), got -1"),
        ("--seed", "-5", "expected an integer >= 0, got -5"),
    ],
)
def test_a_bad_number_is_a_usage_error_naming_the_flag(flag, value, expected, capsys):
    code, err = run_main(["--dp", "2", "--simulate", flag, value], capsys)
    assert code == 2 and f"argument {flag}: {expected}" in err and "Traceback" not in err


def test_status_timeout_must_be_a_positive_finite_number(capsys):
    """`--timeout-s -1` used to wait forever (ZeroMQ's poll(-1)), `nan` to crash."""
    for value in ("-1", "nan", "0"):
        code, err = run_main(["status", "--timeout-s", value], capsys)
        assert code == 2 and f"argument --timeout-s: expected a finite number > 0, got '{value}'" in err


@pytest.mark.parametrize(
    "endpoint, expected",
    [
        ("tcp://127.0.0.1:99999", "port '99999' is not a port; expected 1-65535"),
        ("tcp://127.0.0.1:notaport", "port 'notaport' is not a port"),
        ("tcp://127.0.0.1", "names no port"),
        ("tcp://:5555", "names no host"),
        ("tcp://[::1]", "names no port; expected tcp://HOST:PORT"),
        ("tcp://[::1:5555", "the IPv6 address has no closing ']'"),
        ("tcp://[::1]5555", "expected ':PORT' after the IPv6 address, got '5555'"),
        ("tcp://[]:5555", "names no host"),
        ("tcp://[::1]:99999", "port '99999' is not a port; expected 1-65535"),
        ("ipc://", "names no socket path"),
        ("udp://127.0.0.1:5555", "must start with ipc:// or tcp://"),
        ("", "endpoint '' must start with ipc:// or tcp://"),  # it was taken as the default endpoint
    ],
)
def test_a_bad_endpoint_is_refused_before_binding(endpoint, expected, capsys):
    with pytest.raises(ValueError, match=expected):
        check_endpoint(endpoint)
    code, err = run_main(["--dp", "2", "--endpoint", endpoint], capsys)
    assert code == 2 and expected in err


@pytest.mark.parametrize(
    "endpoint, expected",
    [
        ("tcp://*:5555", "* is what a coordinator binds"),
        ("tcp://127.0.0.1:*", "* is what a coordinator binds"),
        ("tcp://127.0.0.1", "names no port"),
        ("tcp://127.0.0.1:99999", "port '99999' is not a port; expected 1-65535"),
        ("http://127.0.0.1:9464", "must start with ipc:// or tcp://"),
        ("", "must start with ipc:// or tcp://"),
    ],
)
def test_status_refuses_an_endpoint_it_cannot_connect_to_naming_it(endpoint, expected, capsys):
    """Before: ZeroMQ's own words (``Invalid argument (addr='tcp://*:5555')``, ``Protocol not
    supported``), or, for port 99999, a wait on port 34463 (ZeroMQ wraps it) ending in "no answer"."""
    code, err = run_main(["status", "--endpoint", endpoint, "--timeout-s", "0.2"], capsys)
    assert code == 2 and "argument --endpoint: " in err and expected in err and "Traceback" not in err, err


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://*:5555", "tcp://[::1]:5555", "ipc:///tmp/x.sock"])
def test_good_endpoints_pass(endpoint):
    check_endpoint(endpoint)


@pytest.mark.parametrize(
    "agent, name",
    [
        (AgentConfig(fence_timeout_s=-1.0), "fence_timeout_s"),
        (AgentConfig(fence_timeout_s=float("nan")), "fence_timeout_s"),
        (AgentConfig(report_interval_steps=0), "report_interval_steps"),
        (AgentConfig(throttle_bytes_per_s=float("inf")), "throttle_bytes_per_s"),
    ],
)
def test_the_config_refuses_agent_settings_every_agent_would_refuse(agent, name):
    """Agents decode ``AgentConfig`` with its limits: a value the coordinator took unchecked made
    every agent drop every Welcome, forever (ranks re-registering, 0 commits, exit 0)."""
    with pytest.raises(ValueError, match=name):
        CoordinatorConfig(world_size=2, agent=agent)


def test_simulation_flags_without_simulate_are_refused(capsys):
    code, err = run_main(["--dp", "2", "--steps", "10", "--trace", "t.npz"], capsys)
    assert code == 2 and "--steps, --trace apply only with --simulate" in err
    args = parse_command_line(["--dp", "2", "--simulate"])
    assert (args.steps, args.seed) == (None, None), "defaults are filled in by the simulation, not the parser"


def test_output_paths_are_checked_before_the_run(tmp_path, capsys):
    """They are written at the end of a run: a typo used to cost the whole run and its summary."""
    missing = tmp_path / "missing"
    for flag in ("--summary-json", "--plot", "--record"):
        extra = ["--simulate"] if flag != "--record" else []
        code, err = run_main(["--dp", "2", *extra, flag, str(missing / "x.png")], capsys)
        assert code == 2 and f"{flag} '{missing / 'x.png'}': directory '{missing}' does not exist" in err
    code, err = run_main(["--dp", "2", "--simulate", "--summary-json", str(tmp_path)], capsys)
    assert code == 2 and "is a directory; expected a file name" in err
    pytest.importorskip("matplotlib")
    code, err = run_main(["--dp", "2", "--simulate", "--plot", str(tmp_path / "p.txt")], capsys)
    assert code == 2 and "matplotlib cannot write .txt files; expected one of" in err and ".png" in err


def test_config_file_switches_take_only_booleans(tmp_path):
    """`insecure = "false"` (a string) used to turn insecure mode on."""
    path = tmp_path / "c.toml"
    for text in ('insecure = "false"\n', 'simulate = "yes"\n', "insecure = 0\n"):
        path.write_text("dp = 2\n" + text)
        with pytest.raises(ValueError, match=r"expected true or false \(no quotes\)"):
            parse_command_line(["--config", str(path)])
    path.write_text("dp = 2\nendpoint = 5\n")
    with pytest.raises(ValueError, match=r"endpoint = 5: expected a string"):
        parse_command_line(["--config", str(path)])
    path.write_text("dp = 2\ninsecure = false\nno-step-clock-check = true\nlog_level = 'debug'\n")
    args = parse_command_line(["--config", str(path)])
    assert (args.insecure, args.step_clock_check, args.log_level) == (False, False, "debug")
    path.write_text("dp = 2\nstep-clock-check = false\n")
    assert parse_command_line(["--config", str(path)]).step_clock_check is False
    path.write_text("dp = 2\nno-step-clock-check = false\n")
    assert parse_command_line(["--config", str(path)]).step_clock_check is True


@pytest.mark.parametrize(
    "text, first, second",
    [
        ("fence-steps = 4\nfence_steps = 16\n", "fence-steps", "fence_steps"),
        ("no-step-clock-check = true\nstep-clock-check = true\n", "no-step-clock-check", "step-clock-check"),
        ("step_clock_check = false\nno_step_clock_check = false\n", "step_clock_check", "no_step_clock_check"),
    ],
)
def test_a_config_file_that_sets_one_setting_twice_is_refused_naming_both_keys(tmp_path, text, first, second):
    """TOML keeps `fence-steps` and `fence_steps` as two keys: the last one read won without a word,
    and `no-step-clock-check = true` beside `step-clock-check = true` turned the check on or off by
    the order of the lines."""
    path = tmp_path / "c.toml"
    path.write_text("dp = 2\n" + text)
    with pytest.raises(ValueError) as exc:  # main makes it one line, exit 2, as every config mistake
        parse_command_line(["--config", str(path)])
    assert (
        str(exc.value) == f"config file {str(path)!r}: {first!r} and {second!r} are the same setting; expected it once"
    )


def test_a_config_file_mistake_names_the_file_and_the_value_as_toml_writes_it(tmp_path, capsys):
    """A config file's bad log-level used to be blamed on the flag (`--log-level='loud'`), and values
    were shown as Python writes them (`dp = True`, `policy = 'lpt'`), not as the file has them."""
    path = tmp_path / "c.toml"
    for text, expected in [
        ('log-level = "loud"', 'log-level = "loud": expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL'),
        ("dp = true", "dp = true: expected a number"),
        ("dp = 1e400", "dp = inf: expected a positive integer"),
        ('policy = "lpt"', 'policy = "lpt"; expected one of migration, deepseek'),
    ]:
        path.write_text(text + "\n")
        code, err = run_main(["--config", str(path)], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"eplb-coordinator: error: config file {str(path)!r}: {expected}"), err
    code, err = run_main(["--log-level", "loud"], capsys)  # refused as it is parsed, like every other flag
    assert code == 2 and "argument --log-level: expected one of DEBUG, INFO" in err and "got 'loud'" in err
    path.write_text('log-level = "Debug"\ndp = 2\n')  # any case, as the flag
    assert parse_command_line(["--config", str(path)]).log_level == "Debug"


def test_a_config_file_number_in_quotes_is_refused_naming_key_value_and_type(tmp_path):
    """`fence-timeout-s = "30"` (a TOML string) was read as the number 30, while `insecure = "false"`
    was refused: a template that quoted every value passed unnoticed, for numbers only."""
    path = tmp_path / "c.toml"
    for text in ('fence-timeout-s = "30"', 'dp = "2"', 'metrics_port = " 9000"', 'min-gain = "0.05"'):
        path.write_text(text + "\n")
        with pytest.raises(ValueError) as exc:
            parse_command_line(["--config", str(path)])
        assert str(exc.value) == f"config file {str(path)!r}: {text}: expected a number (no quotes), got a string"
    # A flag that takes no number is not told to unquote one: it says what it does take.
    path.write_text('log-level = "10"\n')
    with pytest.raises(ValueError, match=r'log-level = "10": expected one of DEBUG, .* got \'10\'$'):
        parse_command_line(["--config", str(path)])
    path.write_text('dp = 2\nfence-timeout-s = 30\nmin-gain = 0.05\nlog-level = "info"\nendpoint = "ipc:///tmp/x/c"\n')
    args = parse_command_line(["--config", str(path)])
    assert (args.dp, args.fence_timeout_s, args.min_gain, args.log_level) == (2, 30.0, 0.05, "info")


def test_an_implausible_rank_count_is_refused_at_once():
    """`--dp 100000000` (a typo) used to sit for minutes without a line, building per-rank state
    (2.5 GB at a million ranks) until the machine ran out of memory."""
    from eplb_service.coordinator.cli import config_from_args

    with pytest.raises(ValueError, match=r"^--dp 100000000 x --tp 2 = 200000000 EP ranks; expected at most 16384 "):
        config_from_args(parse_command_line(["--dp", "100000000", "--tp", "2"]))
    assert config_from_args(parse_command_line(["--dp", "2048", "--tp", "8"])).world_size == 16384


def test_groups_and_nodes_shape_the_migration_policy_and_a_split_group_is_warned_about(tmp_path, capsys):
    """Both policies use them: the migration policy keeps each group on one node. Before, it
    ignored them with a warning; now a fitting pair starts without one, and ``--groups`` not a
    multiple of ``--nodes`` (no hierarchy to keep: ``--nodes 2`` of a model without groups) starts
    with one warning naming both, under either policy, as DeepSeek's global policy runs then."""
    shared = "ipc:///tmp/eplb-test-never.sock"  # /tmp is open to others: refused right after the checks
    code, err = run_main(["--dp", "2", "--groups", "4", "--nodes", "2", "--endpoint", shared], capsys)
    assert code == 1 and "socket directory /tmp has mode" in err, err
    assert "ignored" not in err and "not a multiple" not in err, err
    for policy in ("migration", "deepseek"):
        code, err = run_main(
            ["--dp", "2", "--groups", "3", "--nodes", "2", "--policy", policy, "--endpoint", shared], capsys
        )
        assert code == 1 and "socket directory /tmp has mode" in err, err
        assert f"--groups 3 is not a multiple of --nodes 2: there is no node hierarchy to keep, so the {policy}" in err


def test_log_levels_take_any_case_and_a_bad_one_names_its_source(monkeypatch):
    assert logutil.parse_level("debug", "--log-level") == 10
    with pytest.raises(ValueError, match=r"--log-level='verbose' is not a log level; expected one of DEBUG, INFO"):
        logutil.parse_level("verbose", "--log-level")
    monkeypatch.setenv("EPLB_SERVICE_LOG_LEVEL", "verbose")
    with pytest.raises(ValueError, match=r"EPLB_SERVICE_LOG_LEVEL='verbose'"):
        logutil.configure()


def test_a_log_format_flag_wins_over_the_environment(monkeypatch):
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "json")
        logutil.configure("INFO", "text")
        assert not isinstance(root.handlers[0].formatter, logutil.JsonFormatter)
        logutil.configure("INFO", None)
        assert isinstance(root.handlers[0].formatter, logutil.JsonFormatter)
        monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", " JSON")  # as the vLLM plugin and the sidecar take it
        logutil.configure("INFO", None)
        assert isinstance(root.handlers[0].formatter, logutil.JsonFormatter)
        assert logutil.requested_format([]) == "json"
        monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "yaml")
        with pytest.raises(ValueError, match=r"EPLB_SERVICE_LOG_FORMAT='yaml' is not a log format"):
            logutil.configure("INFO", None)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("EPLB_SERVICE_THROTTLE_BYTES_PER_S", "nan", "expected a finite value >= 0"),
        ("EPLB_SERVICE_THROTTLE_BYTES_PER_S", "inf", "expected a finite value >= 0"),
        ("EPLB_SERVICE_LOG_LEVEL", "verbose", "is not a log level"),
        # Before, only the scheme was checked: agents dialled 99999 as port 34463, and waited.
        ("EPLB_SERVICE_ENDPOINT", "tcp://10.0.0.5:99999", "is not a port"),
        ("EPLB_SERVICE_ENDPOINT", "tcp://10.0.0.5", "names no port"),
        ("EPLB_SERVICE_ENDPOINT", "tcp://*:5555", "not an address to connect to"),
    ],
)
def test_the_plugin_refuses_what_its_agents_could_not_use(name, value, expected):
    env = {"EPLB_SERVICE_ENDPOINT": "ipc:///tmp/c.sock", name: value}
    with pytest.raises(plugin_config.ConfigError, match=rf"{name}='{re.escape(value)}'.*{expected}"):
        plugin_config.from_env(env)
    assert plugin_config.from_env({"EPLB_SERVICE_ENDPOINT": "ipc:///tmp/c.sock", "EPLB_SERVICE_LOG_LEVEL": "debug"})


def test_a_taken_metrics_port_is_one_line_not_a_traceback(tmp_path, capsys):
    """And it leaves no socket file: the endpoint, bound before the port failed, stayed behind as a
    socket nobody listens on, which `status` reports as a killed coordinator's.

    And the signals it handled while up are handed back: uvloop's close left its handlers
    installed, bound to the closed loop, so a Ctrl-C to a process that had called ``main()``
    went to a loop that would never run it."""
    before = [signal.getsignal(sig) for sig in STOP_SIGNALS]
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_main(
            ["--dp", "1", "--endpoint", f"ipc://{tmp_path}/c.sock", "--metrics-port", str(port)], capsys
        )
    assert code == 1 and f"cannot serve HTTP on --metrics-port {port}" in err and "Traceback" not in err
    assert not (tmp_path / "c.sock").exists()
    assert [signal.getsignal(sig) for sig in STOP_SIGNALS] == before


def test_an_initial_placement_for_other_ranks_is_refused_at_start(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"phy2log": [[i % 32 for i in range(64)]] * 4, "num_ranks": 8}))
    code, err = run_main(["--dp", "2", "--simulate", "--initial-placement", str(path)], capsys)
    assert code == 2 and "planned for 8 ranks (its num_ranks), but this deployment has 2" in err
    path.write_text(json.dumps({"phy2log": [[i % 32 for i in range(64)]] * 4, "num_ranks": True}))
    code, err = run_main(["--dp", "2", "--simulate", "--initial-placement", str(path)], capsys)
    assert code == 2 and f"--initial-placement {path}: num_ranks is true, expected an integer rank count" in err, err


def test_settings_the_deployment_cannot_satisfy_are_reported_once_and_halt(tmp_path):
    """A seed of the wrong shape and `--groups` not dividing the experts used to fail every tick
    (hundreds of tracebacks a second for the seed) while the run ended with exit 0."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"phy2log": [[i % 32 for i in range(64)]] * 4, "num_ranks": 2}))
    summary = tmp_path / "s.json"
    argv = ["--dp", "2", "--simulate", "--steps", "300", "--policy", "deepseek", "--groups", "3"]
    argv += ["--initial-placement", str(path), "--summary-json", str(summary)]
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run(
        [sys.executable, "-m", "eplb_service.coordinator.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.count("--initial-placement does not fit this deployment (4 layers x 40 slots") == 1
    assert done.stderr.count("num_groups=3 (--groups) must divide the number of logical experts (32)") == 1
    assert "rebalancing halted, restart the coordinator with settings that fit" in done.stderr
    assert "Traceback" not in done.stderr
    result = json.loads(summary.read_text())
    assert result["committed"] == 0 and result["output_mismatches"] == 0
    assert result["halted"].startswith("--policy deepseek: num_groups=3")


def test_a_curve_dir_is_named_by_its_flag_and_a_missing_one_is_said_to_be_missing(tmp_path):
    """It was `curve_dir '/x' has no server.key_secret`: the field's name, and for a path that does not exist."""
    with pytest.raises(ValueError, match=r"^--curve-dir '\S+/none' is not a directory; expected the DIR of `eplb-"):
        CoordinatorConfig(world_size=1, curve_dir=str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"^--curve-dir '\S+' has no server.key_secret: run `eplb-coordinator keygen"):
        CoordinatorConfig(world_size=1, curve_dir=str(tmp_path))
