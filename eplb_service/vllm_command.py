"""What a ``vllm serve`` command line says about the EP group, read as vLLM reads it.

The sidecar needs the EP rank count before it starts anything: the coordinator refuses agents
beyond the rank count it was started for, with no word to the user. vLLM's spellings are many
(``--data-parallel-size 8``, ``--data_parallel_size=8``, ``-dp 8``, a ``--config`` YAML file,
the last of a repeated flag winning), so they are read here, in one place, and a coordinator
size that contradicts them is a :class:`UsageError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from eplb_service import logutil

log = logutil.rank_logger(__name__, "sidecar")


class UsageError(ValueError):
    """A mistake in the sidecar's command line or environment: reported in one line, exit status 2."""


VLLM_SIZE_FLAGS: dict[str, tuple[str, str]] = {
    "data-parallel-size": ("--data-parallel-size", "-dp"),
    "tensor-parallel-size": ("--tensor-parallel-size", "-tp"),
    "prefill-context-parallel-size": ("--prefill-context-parallel-size", "-pcp"),
    "pipeline-parallel-size": ("--pipeline-parallel-size", "-pp"),
}
"""vLLM's parallel-size flags that decide the EP group, each as (long, short) name (``vllm/engine/arg_utils.py``,
the same in 0.18 to 0.33). vLLM's EP group is DP x PCP x TP ranks, one group per pipeline stage."""


@dataclass(frozen=True)
class Size:
    """One vLLM parallel size and where it came from, for messages that let the user check it."""

    value: int
    source: str
    """Where ``value`` came from: ``-dp 8 in the vLLM command``, ``data-parallel-size: 8 in v.yaml``..."""
    unknown: str | None = None
    """Why vLLM's value could not be determined (``value`` is then only assumed); ``None`` when it is known."""


@dataclass(frozen=True)
class VllmParallelism:
    """The parallel sizes a vLLM command runs with, as vLLM itself will read them."""

    sizes: dict[str, Size]
    """Keyed by the long flag name without its dashes (``data-parallel-size``...)."""
    eplb: bool | None
    """Whether ``--enable-eplb`` is on; ``None`` when it cannot be told (a config file the sidecar cannot read)."""

    @property
    def dp(self) -> Size:
        return self.sizes["data-parallel-size"]

    @property
    def ranks_per_dp(self) -> Size:
        """EP ranks per DP rank: TP x PCP (the coordinator's ``--tp``); unknown when either is."""
        tp, pcp = self.sizes["tensor-parallel-size"], self.sizes["prefill-context-parallel-size"]
        if pcp.value == 1 and pcp.unknown is None:
            return tp
        return Size(tp.value * pcp.value, f"{tp.source} x {pcp.source}", tp.unknown or pcp.unknown)


def vllm_flag(arg: str) -> tuple[str, str | None]:
    """``(flag, inline value)`` of one vLLM argument as vLLM's parser reads it.

    vLLM turns underscores into dashes in a long flag's name (up to a ``.``) before argparse
    sees it, so ``--data_parallel_size=8`` is ``--data-parallel-size`` with the value ``8``.
    """
    name, sep, value = arg.partition("=")
    if name.startswith("--"):
        head, dot, tail = name.partition(".")
        name = head.replace("_", "-") + dot + tail
    return name, value if sep else None


def _abbreviates(arg: str, names: tuple[str, str]) -> bool:
    """Whether argparse could take ``arg`` for one of ``names`` cut short (``--tensor-parallel``, ``-t``).

    vLLM's parser allows abbreviations; only vLLM's whole flag list tells whether one is unique,
    so the sidecar does not expand them but says that it could not read the size.
    """
    long_name, short_name = names
    if arg.startswith("--"):
        return len(arg) > 3 and long_name.startswith(arg) and arg != long_name
    return arg.startswith("-") and len(arg) >= 2 and short_name.startswith(arg) and arg != short_name


def _flag_values(argv: list[str]) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """The size flags of a vLLM command line: ``({size: (value, as written)}, {size: abbreviation})``.

    The last of a repeated flag wins, as in argparse. A long flag cut short (``--tensor-parallel 2``)
    is one that argparse may expand and the sidecar does not: returned so that the caller can say so.
    """
    values: dict[str, tuple[str, str]] = {}
    abbreviations: dict[str, str] = {}
    for i, arg in enumerate(argv):
        name, inline = vllm_flag(arg)
        for size, names in VLLM_SIZE_FLAGS.items():
            if name in names:
                if inline is None and i + 1 >= len(argv):
                    raise UsageError(f"{arg} ends the vLLM command without a value; expected {arg} N")
                value = argv[i + 1] if inline is None else inline
                values[size] = (value, f"{name} {value}")
            elif _abbreviates(name, names):
                abbreviations[size] = name
    return values, abbreviations


def vllm_config_file(argv: list[str]) -> str | None:
    """The YAML file vLLM reads flags from: ``--config FILE``, the only spelling vLLM 0.18-0.33 read."""
    if any(arg.startswith("--config=") for arg in argv):
        log.warning(
            "the vLLM command has --config=FILE: vLLM reads its config file only as `--config FILE`, "
            "so neither vLLM nor the sidecar reads it"
        )
    count = argv.count("--config")
    if count > 1:
        raise UsageError(f"the vLLM command has --config {count} times; vLLM takes one config file")
    if count == 0:
        return None
    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise UsageError("--config ends the vLLM command without a file; expected --config FILE.yaml")
    return argv[index + 1]


def read_vllm_config(path: str) -> dict[str, tuple[str, object]] | None:
    """vLLM's YAML config file as ``{flag name, dashed: (key as written, value)}``; ``None`` without pyyaml.

    A file vLLM cannot read either (missing, not YAML, not a mapping) is refused here, before
    anything starts.
    """
    try:
        import yaml
    except ImportError:
        return None
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise UsageError(f"cannot read the vLLM config file {path!r} (--config): {exc.strerror}") from None
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())  # one line: the mark is in it
        raise UsageError(f"the vLLM config file {path!r} (--config) is not valid YAML: {reason}") from None
    if not isinstance(doc, dict):
        raise UsageError(
            f"the vLLM config file {path!r} (--config) holds {type(doc).__name__}; "
            "expected a mapping of vLLM flag names to values"
        )
    return {vllm_flag(f"--{key}")[0][2:]: (str(key), value) for key, value in doc.items()}


def _size(raw: object, source: str) -> int:
    """A parallel size as vLLM's ``type=int`` reads it, refused unless it is a positive integer."""
    try:
        value = int(str(raw)) if not isinstance(raw, bool) else 0
    except ValueError:
        raise UsageError(f"{source}: {raw!r} is not an integer; expected a positive integer") from None
    if value <= 0:
        raise UsageError(f"{source}: expected a positive integer, got {raw!r}")
    return value


def _eplb_flag(argv: list[str], config: dict[str, tuple[str, object]] | None, config_path: str | None) -> bool | None:
    """Whether vLLM runs with ``--enable-eplb`` (command line over config file, last flag wins)."""
    flags = [vllm_flag(arg)[0] for arg in argv]
    for name in reversed(flags):
        if name in ("--enable-eplb", "--no-enable-eplb"):
            return name == "--enable-eplb"
    if config_path is None:
        return False
    if config is None:
        return None
    return bool(config.get("enable-eplb", ("", False))[1])


def vllm_parallelism(argv: list[str]) -> VllmParallelism:
    """The parallel sizes the vLLM command ``argv`` runs with: its flags over its ``--config`` YAML over vLLM's 1s.

    Refuses (``UsageError``) a size vLLM would refuse; a size the sidecar cannot read (no pyyaml for
    the config file, an abbreviated flag) is assumed to be 1 and says why in ``Size.unknown``.
    """
    values, abbreviations = _flag_values(argv)
    config_path = vllm_config_file(argv)
    config = None if config_path is None else read_vllm_config(config_path)
    sizes = {}
    for name in VLLM_SIZE_FLAGS:
        if name in values:
            raw, written = values[name]
            size = Size(_size(raw, f"{written} in the vLLM command"), f"{written} in the vLLM command")
        elif config_path is not None and config is None:
            size = Size(1, "assumed", f"pyyaml is not installed, so the sidecar cannot read {config_path}")
        elif config is not None and name in config:
            key, value = config[name]
            source = f"{key}: {value} in {config_path}"
            size = Size(_size(value, source), source)
        else:
            size = Size(1, "vLLM's default")
        if name in abbreviations:
            size = Size(
                size.value,
                size.source,
                f"the vLLM command has {abbreviations[name]}, which vLLM may read as {VLLM_SIZE_FLAGS[name][0]}; "
                "the sidecar reads full flag names only",
            )
        sizes[name] = size
    return VllmParallelism(sizes, _eplb_flag(argv, config, config_path))


def _pipeline_check(vllm: VllmParallelism) -> None:
    """Refuse pipeline parallelism: vLLM builds one EP group per stage, each with ranks from 0, for one coordinator."""
    pp = vllm.sizes["pipeline-parallel-size"]
    if pp.value > 1:
        raise UsageError(
            f"pipeline-parallel size {pp.value} ({pp.source}): vLLM builds one EP group per pipeline stage, "
            "each numbering its ranks from 0, and a coordinator serves one group (ranks of different stages "
            "would be taken as one deployment and exchange rows of different layers); run with "
            "pipeline-parallel size 1"
        )
    if pp.unknown:
        log.warning("could not determine vLLM's pipeline-parallel size (%s): assuming 1", pp.unknown)


def _coordinator_size(flag: str, given: int | None, vllm: Size, what: str) -> tuple[int, str]:
    """The coordinator's ``flag`` and where it came from: vLLM's ``what`` unless ``given``, which must then agree.

    A given size that contradicts a known vLLM size is refused: the coordinator would count other
    ranks than vLLM runs and refuse its agents, with nothing but a log line to say so.
    """
    if given is None:
        if vllm.unknown:
            log.warning(
                "could not determine vLLM's %s (%s): assuming %d; pass %s N to the sidecar to set it",
                what,
                vllm.unknown,
                vllm.value,
                flag,
            )
        return vllm.value, vllm.source if not vllm.unknown else "assumed"
    if vllm.unknown:
        log.warning(
            "using the coordinator's %s %d: vLLM's %s could not be checked (%s)", flag, given, what, vllm.unknown
        )
    elif given != vllm.value:
        raise UsageError(
            f"the coordinator's {flag} {given} contradicts the vLLM command's {what} {vllm.value} ({vllm.source}): "
            f"the coordinator would count other ranks than vLLM runs and refuse its agents; drop {flag} "
            "(the sidecar derives it from the vLLM command) or make the two agree"
        )
    return given, f"the coordinator's {flag}"


def coordinator_ranks(vllm: VllmParallelism, dp: int | None, tp: int | None) -> tuple[int, int, str]:
    """The coordinator's ``(--dp, --tp)`` for the vLLM command, and a line saying where each came
    from; ``dp``/``tp``: the ones the user gave it, if any.

    ``--tp`` is the EP ranks per DP rank, TP x PCP: the coordinator only counts ranks (dp x tp).
    The line is not logged here: the sidecar says it once every other check has passed, so that a
    mistake stays one line.
    """
    _pipeline_check(vllm)
    dp, dp_source = _coordinator_size("--dp", dp, vllm.dp, "data-parallel size")
    tp, tp_source = _coordinator_size("--tp", tp, vllm.ranks_per_dp, "tensor x prefill-context parallel size")
    return dp, tp, f"EP ranks: {dp * tp} = --dp {dp} ({dp_source}) x --tp {tp} ({tp_source})"
