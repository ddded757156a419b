"""Every ``serve`` flag reaches the configuration it is for, and the defaults are the documented ones.

A flag parsed and checked but wired to the wrong field (``--fence-steps`` handed the report
interval), or not wired at all (``--no-step-clock-check`` dropped, ``--metrics-port`` lost), is
accepted without a word and changes nothing; only the resulting ``CoordinatorConfig`` shows it.
"""

from __future__ import annotations

import pytest

from eplb_service.coordinator.cli import command_of, config_from_args, parse_command_line


def config(argv: list[str]):
    return config_from_args(parse_command_line(argv))


def test_every_serve_flag_reaches_its_config_field():
    cfg = config(
        [
            "--dp", "3", "--tp", "2", "--endpoint", "tcp://127.0.0.1:5999", "--metrics-port", "9464",
            "--policy", "deepseek", "--groups", "4", "--nodes", "2", "--rebalance-interval-steps", "77",
            "--min-gain", "0.05", "--staging-budget-bytes", "12345", "--report-interval-steps", "3",
            "--fence-steps", "11", "--fence-timeout-s", "2.5", "--throttle-bytes-per-s", "1000",
            "--no-step-clock-check",
        ]
    )  # fmt: skip
    assert (cfg.world_size, cfg.endpoint, cfg.metrics_port) == (6, "tcp://127.0.0.1:5999", 9464)
    assert (cfg.policy, cfg.num_groups, cfg.num_nodes) == ("deepseek", 4, 2)
    assert (cfg.rebalance_interval_steps, cfg.min_gain, cfg.staging_budget_bytes) == (77, 0.05, 12345)
    assert cfg.check_step_clock is False
    agent = cfg.agent
    assert (agent.report_interval_steps, agent.fence_steps) == (3, 11)
    assert (agent.fence_timeout_s, agent.throttle_bytes_per_s) == (2.5, 1000.0)


def test_the_daemon_and_the_simulation_keep_their_documented_defaults():
    """README: ``--rebalance-interval-steps`` 200, 100 with ``--simulate``; step clocks compared."""
    daemon = config(["--dp", "2"])
    assert (daemon.rebalance_interval_steps, daemon.metrics_port, daemon.check_step_clock) == (200, None, True)
    assert (daemon.min_window_steps, daemon.load_half_life_steps) == (50, 200.0)
    sim = config(["--dp", "2", "--simulate"])
    assert (sim.rebalance_interval_steps, sim.min_window_steps, sim.load_half_life_steps) == (100, 40, 100.0)
    assert config(["--dp", "2", "--simulate", "--rebalance-interval-steps", "7"]).rebalance_interval_steps == 7


def test_a_flag_wins_over_the_config_file_and_the_file_over_the_default(tmp_path):
    path = tmp_path / "eplb.toml"
    path.write_text("fence-steps = 12\nreport-interval-steps = 4\nno-step-clock-check = true\nmetrics-port = 0\n")
    cfg = config(["--config", str(path), "--fence-steps", "9"])
    assert (cfg.agent.fence_steps, cfg.agent.report_interval_steps) == (9, 4)
    assert (cfg.check_step_clock, cfg.metrics_port) == (False, 0)


@pytest.mark.parametrize(
    "argv, command",
    [
        ([], "serve"),
        (["--dp", "2"], "serve"),
        (["-h"], None),
        (["--help"], None),
        (["status", "--json"], "status"),
        (["keygen", "d"], "keygen"),
        (["nonsense"], None),
    ],
)
def test_the_command_a_line_runs(argv, command):
    """``-h`` alone is the top level's help, not ``serve``'s (nor refused in ``serve``'s words)."""
    assert command_of(argv) == command
