"""`eplb-coordinator`'s command line: subcommands, `--help` on each, `serve` as the default, config files."""

from __future__ import annotations

import json
import os

import pytest
from time_limit import time_limit

from eplb_service.coordinator.cli import config_from_args, main, parse_command_line
from eplb_service.coordinator.config import default_endpoint
from eplb_service.coordinator.policy import DEFAULT_POLICY, POLICIES


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    """argparse wraps help to the terminal width; one line per flag keeps the assertions simple."""
    monkeypatch.setenv("COLUMNS", "250")


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` as the console script runs it: argparse's exits become return codes."""
    try:
        with time_limit(300, f"eplb-coordinator {' '.join(argv)}"):
            code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv",
    [
        ["keygen", "--help"],
        ["keygen", "-h"],
        ["status", "--help"],
        ["serve", "--help"],
        ["--help"],
        ["--dp", "8", "--help"],
    ],
)
def test_help_exits_zero_and_creates_nothing(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(argv, capsys)
    assert code == 0 and out.startswith("usage: eplb-coordinator")
    assert os.listdir(tmp_path) == [], f"{argv} wrote {os.listdir(tmp_path)}"


def test_top_level_help_names_every_command_and_the_default_endpoint(capsys):
    _, out, _ = run_main(["--help"], capsys)
    for command in ("serve", "status", "keygen"):
        assert f"    {command} " in out, f"{command} missing from --help"
    assert default_endpoint() in out


def test_command_help_shows_defaults_and_policy_choices(capsys):
    _, serve, _ = run_main(["serve", "--help"], capsys)
    assert "{" + ",".join(POLICIES) + "}" in serve and f"(default: {DEFAULT_POLICY})" in serve
    assert "(default: 1500)" in serve and "(default: 200; 100 with --simulate)" in serve
    assert "(default: None)" not in serve and "(default: False)" not in serve and "(default: True)" not in serve
    assert "lockstep; default: compare)" in serve
    _, status, _ = run_main(["status", "--help"], capsys)
    assert f"(default: {default_endpoint()})" in status and "(default: 3.0)" in status


def test_bad_policy_and_unknown_command_are_usage_errors(capsys):
    code, _, err = run_main(["--dp", "2", "--policy", "lpt"], capsys)
    assert code == 2 and "invalid choice: 'lpt'" in err
    code, _, err = run_main(["stauts"], capsys)
    assert code == 2 and "invalid choice: 'stauts'" in err and "serve" in err


@pytest.mark.parametrize("argv", [["--dp", "8"], ["--dp", "8", "--simulate"], []])
def test_serve_is_the_default_command(argv):
    implicit = parse_command_line(argv)
    explicit = parse_command_line(["serve", *argv])
    assert implicit.command == "serve" and vars(implicit) == vars(explicit)
    assert implicit.simulate == ("--simulate" in argv)
    assert config_from_args(implicit).world_size == (8 if argv else 1)


def test_keygen_writes_the_keys_into_the_named_directory(tmp_path, capsys):
    code, out, _ = run_main(["keygen", str(tmp_path / "keys")], capsys)
    assert code == 0
    for name in ("server.key", "server.key_secret", "agent.key_secret", "clients/agent.key"):
        assert (tmp_path / "keys" / name).is_file() and str(tmp_path / "keys" / name) in out
    code, _, err = run_main(["keygen"], capsys)
    assert code == 2 and "DIR" in err


def test_config_file_values_are_checked_like_flags(tmp_path):
    path = tmp_path / "eplb.toml"
    path.write_text('dp = 4\npolicy = "deepseek"\n')
    args = parse_command_line(["--config", str(path), "--dp", "2"])
    assert (args.dp, args.policy) == (2, "deepseek"), "flags override the file, the file overrides defaults"
    path.write_text('policy = "lpt"\n')
    with pytest.raises(ValueError, match=r'policy = "lpt"; expected one of migration, deepseek'):
        parse_command_line(["--config", str(path)])
    path.write_text("dp = 0\n")
    with pytest.raises(ValueError, match=r"dp = 0: expected a positive integer, got 0"):
        parse_command_line(["--config", str(path)])


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    """TOML is UTF-8; a file saved in Latin-1 (``policy = "migración"``) used to end in Python's
    words alone, ``'utf-8' codec can't decode byte 0xf3 ...``, naming no file."""
    path = tmp_path / "eplb.toml"
    path.write_bytes('dp = 2\npolicy = "migración"\n'.encode("latin-1"))
    code, _, err = run_main(["--config", str(path)], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"config file {str(path)!r} is not valid TOML: not UTF-8 text (byte 0xf3 at offset 24)" in err, err


def test_protocol_1_store_host_still_parses_but_is_hidden_and_warned_about(tmp_path, capsys, caplog):
    """Old command lines and config files keep starting; the flag no longer does anything, and says so."""
    _, serve, _ = run_main(["serve", "--help"], capsys)
    assert "--store-host" not in serve
    path = tmp_path / "eplb.toml"
    path.write_text('store-host = "10.0.0.5"\n')
    for argv in (["--dp", "2", "--store-host", "10.0.0.5"], ["--config", str(path), "--dp", "2"]):
        caplog.clear()
        with caplog.at_level("WARNING"):
            config = config_from_args(parse_command_line(argv))
        assert config.world_size == 2 and not hasattr(config, "store_host")
        assert "--store-host 10.0.0.5 is ignored" in caplog.text and "EPLB_SERVICE_STORE_HOST" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        config_from_args(parse_command_line(["--dp", "2"]))
    assert "store-host" not in caplog.text


def json_line(err: str) -> dict:
    """``err`` as the one strict JSON line a log pipeline reads."""
    (line,) = err.splitlines()
    return json.loads(line)


@pytest.mark.parametrize(
    "argv, prefix, expected",
    [
        (["--dp", "0"], "eplb-coordinator: error: argument --dp: expected a positive integer, got 0", "serve"),
        (["serve", "--policy", "lpt"], "eplb-coordinator: error: argument --policy: invalid choice: 'lpt'", "serve"),
        (["status", "--timeout-s", "0"], "eplb-coordinator status: error: argument --timeout-s:", "status"),
        (["status", "--bogus"], "eplb-coordinator status: error: unrecognized arguments: --bogus", "status"),
        (["keygen"], "eplb-coordinator keygen: error: the following arguments are required: DIR", "keygen"),
        (["stauts"], "eplb-coordinator: error: argument COMMAND: invalid choice: 'stauts'", None),
    ],
)
def test_a_refused_flag_is_one_line_naming_the_help_to_read(argv, prefix, expected, capsys, monkeypatch):
    """Before: argparse printed the whole usage first (14 lines for ``serve``) and the error last;
    and under ``EPLB_SERVICE_LOG_FORMAT=json`` a refused ``status`` flag was text, and a refused
    one of any command pointed at ``serve --help``."""
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "")
    code, _, err = run_main(argv, capsys)
    help_cmd = f"eplb-coordinator {expected} --help" if expected else "eplb-coordinator --help"
    assert code == 2 and err.startswith(prefix) and err.endswith(f"(see `{help_cmd}`)\n") and err.count("\n") == 1, err
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "json")
    code, _, err = run_main(argv, capsys)
    doc = json_line(err)
    assert code == 2 and doc["level"] == "CRITICAL" and doc["msg"].endswith(f"(see `{help_cmd}`)"), err
    assert doc["tag"] == {"status": "status", "keygen": "keygen"}.get(expected or "", "coordinator")


def test_status_and_keygen_errors_follow_the_log_format_variable(tmp_path, capsys, monkeypatch):
    """Before: both printed a text line whatever ``EPLB_SERVICE_LOG_FORMAT`` said, as the only
    plain line of a deployment whose every other line is JSON."""
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir(mode=0o700)
    not_private = tmp_path / "shared"
    not_private.mkdir(mode=0o755)
    not_private.chmod(0o755)
    status = ["status", "--endpoint", f"ipc://{sock_dir}/c.sock", "--timeout-s", "0.05"]
    for fmt in ("text", "json"):
        monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", fmt)
        code, _, status_err = run_main(status, capsys)
        assert code == 1
        code, _, keygen_err = run_main(["keygen", str(not_private)], capsys)
        assert code == 1
        if fmt == "text":
            assert status_err.startswith("eplb-coordinator status: error: no coordinator at ipc://")
            assert keygen_err.startswith(f"eplb-coordinator keygen: error: key directory {str(not_private)!r}")
            continue
        for err, tag, expected in ((status_err, "status", "no socket file"), (keygen_err, "keygen", "has mode 0755")):
            doc = json_line(err)
            assert doc["level"] == "CRITICAL" and doc["tag"] == tag and expected in doc["msg"], err
            assert doc["logger"] == f"eplb-coordinator {tag}"


def test_status_and_keygen_refuse_a_log_format_variable_that_is_no_format(tmp_path, capsys, monkeypatch):
    """Before: both took ``EPLB_SERVICE_LOG_FORMAT=yaml`` silently as text (and keygen wrote its
    keys), while ``serve`` and ``eplb-plan`` refuse it naming the value."""
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "yaml")
    keys = tmp_path / "keys"
    for argv, command in (
        (["status", "--endpoint", f"ipc://{tmp_path}/c.sock", "--timeout-s", "0.05"], "status"),
        (["keygen", str(keys)], "keygen"),
    ):
        code, out, err = run_main(argv, capsys)
        assert code == 2 and out == "", err
        assert err.startswith(f"eplb-coordinator {command}: error: EPLB_SERVICE_LOG_FORMAT='yaml' is not a log format")
        assert err.rstrip().endswith(f"(see `eplb-coordinator {command} --help`)") and err.count("\n") == 1
    assert not keys.exists()


def test_a_config_files_log_format_applies_to_errors_found_before_logging_starts(tmp_path, capsys, monkeypatch):
    """Before: ``log-format = "json"`` in ``--config`` took effect only once logging was set up, so a
    typo'd key in that very file, or a refused flag beside it, was a text line in a JSON deployment.
    A ``--log-format`` flag still wins over the file, and the file over the variable."""
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "")
    path = tmp_path / "eplb.toml"
    path.write_text('log-format = "json"\ndp = 2\nmetrics_prot = 9464\n')
    code, _, err = run_main(["--config", str(path)], capsys)
    assert code == 2 and "unknown setting 'metrics_prot'" in json_line(err)["msg"], err
    path.write_text('log_format = "json"\ndp = 2\n')
    code, _, err = run_main([f"--config={path}", "--dp", "0"], capsys)
    assert code == 2 and json_line(err)["msg"].startswith("argument --dp: expected a positive integer, got 0"), err
    code, _, err = run_main(["--config", str(path), "--log-format", "text", "--dp", "0"], capsys)
    assert code == 2 and err.startswith("eplb-coordinator: error: argument --dp:"), err
    monkeypatch.setenv("EPLB_SERVICE_LOG_FORMAT", "json")
    path.write_text('log-format = "text"\ndp = "two"\n')
    code, _, err = run_main(["--config", str(path)], capsys)
    assert code == 2 and err.startswith("eplb-coordinator: error: config file"), err
