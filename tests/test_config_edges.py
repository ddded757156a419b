"""The coordinator's values at their edges: the last good one passes, the first bad one is refused.

The command line's types (``arg_types``) and ``CoordinatorConfig`` each check a range; the flags
were tested well past the edges (port 70000, ``--min-gain 5``), so a range moved by one (65536
taken, the port 0 or ``--seed 0`` refused) went unseen. ``CoordinatorConfig`` is also built without
the command line (the simulation, embedding code), so its own checks are tested on their own.
"""

from __future__ import annotations

import argparse

import pytest

from eplb_service.coordinator import arg_types
from eplb_service.coordinator.cli import SIM_MAX_STEPS, build_parser, sim_steps, subcommand_parser
from eplb_service.coordinator.config import CoordinatorConfig, check_endpoint, split_tcp_endpoint
from eplb_service.coordinator.config_file import load_config_file


@pytest.mark.parametrize(
    "convert, good, bad",
    [
        (arg_types.positive_int, ["1", "16384"], ["0", "-1", "1.5"]),
        (arg_types.nonneg_int, ["0", "7"], ["-1", "x"]),
        (arg_types.port, ["0", "1", "65535"], ["65536", "-1", "http"]),
        (arg_types.positive_float, ["1e-9", "5"], ["0", "-0.1", "inf", "nan"]),
        (arg_types.nonneg_float, ["0", "0.0", "1e12"], ["-1e-9", "inf", "nan"]),
        (arg_types.balancedness_gain, ["0", "0.01", "0.999"], ["1", "1.0", "-0.01", "nan", "inf"]),
        (sim_steps, ["1", str(SIM_MAX_STEPS)], ["0", str(SIM_MAX_STEPS + 1)]),
    ],
)
def test_each_flag_type_takes_its_edge_values_and_refuses_the_next(convert, good, bad):
    """``--metrics-port 0`` (any free port), ``--seed 0``, ``--min-gain 0``, ``--throttle-bytes-per-s 0``
    (unthrottled) are documented values; 65536 and a gain of 1 are the first ones past the range."""
    for text in good:
        convert(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            convert(text)


@pytest.mark.parametrize("port", ["0", "65536", "-1", "5x"])
def test_a_tcp_endpoint_port_outside_1_to_65535_is_refused(port):
    """ZeroMQ reads 65536 as 0 (any port) and binds a port nobody configured."""
    with pytest.raises(ValueError, match=rf"port '{port}' is not a port; expected 1-65535"):
        check_endpoint(f"tcp://127.0.0.1:{port}")


def test_the_edge_tcp_ports_pass():
    check_endpoint("tcp://127.0.0.1:1")
    check_endpoint("tcp://127.0.0.1:65535")


@pytest.mark.parametrize(
    "endpoint, parts",
    [
        ("tcp://127.0.0.1:5555", ("127.0.0.1", "5555")),
        ("tcp://[::1]:5555", ("::1", "5555")),
        ("tcp://fe80::1:5555", ("fe80::1", "5555")),  # unbracketed: split at the last colon, as ZeroMQ does
        ("tcp://*:*", ("*", "*")),
    ],
)
def test_a_tcp_endpoint_splits_into_host_and_port_at_the_last_colon(endpoint, parts):
    assert split_tcp_endpoint(endpoint) == parts
    check_endpoint(endpoint)


@pytest.mark.parametrize("port, ok", [(0, True), (65535, True), (65536, False), (-1, False)])
def test_the_config_takes_metrics_ports_0_to_65535(port, ok):
    """0 is "any free port" (the tests' and the simulation's choice), so it must pass."""
    if ok:
        assert CoordinatorConfig(world_size=1, metrics_port=port).metrics_port == port
    else:
        with pytest.raises(ValueError, match=rf"metrics_port {port} is not a port; expected 0-65535"):
            CoordinatorConfig(world_size=1, metrics_port=port)


@pytest.mark.parametrize(
    "name",
    [
        "world_size",
        "rebalance_interval_steps",
        "staging_budget_bytes",
        "load_half_life_steps",
        "liveness_timeout_s",
        "staging_timeout_s",
        "voting_timeout_s",
        "num_groups",
        "num_nodes",
    ],
)
@pytest.mark.parametrize("value", [0, -1, float("inf")])
def test_the_config_refuses_a_count_or_time_that_is_not_positive_and_finite(name, value):
    """``num_nodes=0`` divides by zero at start (``num_groups % num_nodes``); a zero timeout declares
    every rank dead at once."""
    changes = {"world_size": 1, name: value}
    with pytest.raises(ValueError, match=rf"^{name} must be a positive finite number, got {value!r}$"):
        CoordinatorConfig(**changes)


@pytest.mark.parametrize("name", ["min_gain", "min_layer_gain"])
def test_the_config_takes_a_gain_from_0_to_below_1(name):
    """Balancedness is at most 1: a gain of 1 never comes and the coordinator would never plan."""
    for value in (0.0, 0.999):
        assert getattr(CoordinatorConfig(world_size=1, **{name: value}), name) == value
    for value in (1.0, -0.01):
        with pytest.raises(ValueError, match=rf"^{name}={value!r} must be a balancedness gain >= 0 and below 1$"):
            CoordinatorConfig(world_size=1, **{name: value})


def test_a_curve_dir_with_only_the_public_server_key_is_refused(tmp_path):
    """An agent host's key directory holds ``server.key`` (public) but no secret: the coordinator
    cannot serve CURVE from it, and must say so at start, not when the first agent connects."""
    (tmp_path / "server.key").write_text("public\n")
    with pytest.raises(ValueError, match=r"has no server.key_secret: run `eplb-coordinator keygen"):
        CoordinatorConfig(world_size=1, curve_dir=str(tmp_path))


def test_a_misspelt_config_file_key_is_refused_naming_it_and_the_known_ones(tmp_path):
    """Skipped, ``metrics_prot = 9464`` would leave the metrics off without a word (and the CLI test
    that relies on this refusal would start a daemon and never return)."""
    path = tmp_path / "eplb.toml"
    path.write_text("dp = 2\nmetrics_prot = 9464\n")
    serve = subcommand_parser(build_parser(), "serve")
    with pytest.raises(ValueError, match=r"unknown setting 'metrics_prot'; known: .*\bmetrics-port\b") as exc:
        load_config_file(str(path), serve)
    assert "store-host" not in str(exc.value), "a hidden (deprecated) flag is not offered"
