"""deploy/k8s: every resource validates against the Kubernetes schemas, and the pieces agree.

The LeaderWorkerSet and ServiceMonitor are CRDs with no bundled schema: their pod templates
are validated as core ``PodTemplate``s, their wiring by hand. The coordinator's arguments in
the manifests are parsed by the real CLI, so a renamed flag fails here.
"""

from __future__ import annotations

import pathlib
import shlex
import shutil

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

from eplb_service.coordinator.cli import config_from_args, parse_command_line  # noqa: E402
from eplb_service.security import generate_keys  # noqa: E402

K8S = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "k8s"
VERSION = "1.30.0"  # native sidecars need >= 1.29


def resources(variant: str) -> list[dict]:
    """Every resource a kustomization lists, following directories (other kustomizations) as Kustomize does."""
    root = K8S / variant
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs = []
    for rel in kustomization["resources"]:
        path = (root / rel).resolve()
        if path.is_dir():
            docs.extend(resources(str(path.relative_to(K8S))))
            continue
        assert path.is_file(), f"{variant}/kustomization.yaml lists missing {rel}"
        # Kustomize refuses a file outside the kustomization's directory (a directory is fine).
        assert root.resolve() in path.parents, f"{variant}/kustomization.yaml lists {rel}, outside its directory"
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "Deployment":
        return [doc["spec"]["template"]]
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        return [lwt["leaderTemplate"], lwt["workerTemplate"]]
    return []


def container(template: dict, name: str) -> dict:
    spec = template["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def command_line(c: dict) -> list[str]:
    argv = c.get("command", []) + c.get("args", [])
    if argv[:2] == ["sh", "-c"]:
        script = " ".join(argv[2:]).split(";")[-1]
        return shlex.split(script.replace("exec ", "", 1).replace("$$((", "$(("))
    return argv


@pytest.mark.parametrize("variant", ["base", "multinode"])
def test_every_resource_validates(variant):
    for doc in resources(variant):
        if doc["kind"] in ("ServiceMonitor", "LeaderWorkerSet", "PrometheusRule"):
            for i, tpl in enumerate(pod_templates(doc)):
                kv.validate(
                    {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": tpl},
                    VERSION,
                    strict=True,
                )
            continue
        kv.validate(doc, VERSION, strict=True)


@pytest.mark.parametrize("variant", ["base", "multinode"])
def test_volumes_ports_and_selectors_are_wired(variant):
    docs = resources(variant)
    services = [d for d in docs if d["kind"] == "Service"]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    for doc in docs:
        for tpl in pod_templates(doc):
            volumes = {v["name"] for v in tpl["spec"].get("volumes", [])}
            for c in tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]:
                ports = {p["name"] for p in c.get("ports", [])}
                for mount in c.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{c['name']} mounts undefined volume {mount['name']}"
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if probe in c:
                        assert c[probe]["httpGet"]["port"] in ports, f"{c['name']} {probe} uses an undeclared port"
    for svc in services:
        selected = [
            t
            for d in docs
            for t in pod_templates(d)
            if all(t["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
        ]
        assert selected, f"service {svc['metadata']['name']} selects no pod"
        declared = {
            p["name"]
            for t in selected
            for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared
    for mon in monitors:
        assert any(
            all(s["metadata"]["labels"].get(k) == v for k, v in mon["spec"]["selector"]["matchLabels"].items())
            for s in services
        )
        assert {e["port"] for e in mon["spec"]["endpoints"]} <= {
            p["name"] for s in services for p in s["spec"]["ports"]
        }


@pytest.mark.parametrize("variant", ["base", "multinode"])
def test_coordinator_arguments_parse_and_match_vllm(variant, tmp_path):
    keys = tmp_path / "keys"
    generate_keys(str(keys))
    for doc in resources(variant):
        for tpl in pod_templates(doc):
            names = {c["name"] for c in tpl["spec"].get("initContainers", [])}
            if "eplb-coordinator" not in names:
                continue
            argv = command_line(container(tpl, "eplb-coordinator"))
            assert argv[0] == "eplb-coordinator"
            argv = [str(keys) if a == "/etc/eplb-service/server" else a for a in argv[1:]]
            args = parse_command_line([a.replace('"$POD_IP"', "10.0.0.1").replace("$POD_IP", "10.0.0.1") for a in argv])
            cfg = config_from_args(args)  # the real validation: endpoint security, sizes
            vllm = command_line(container(tpl, "vllm"))
            dp = int(vllm[vllm.index("--data-parallel-size") + 1])
            assert cfg.world_size == dp, f"coordinator --dp {cfg.world_size} but vLLM --data-parallel-size {dp}"
            if cfg.policy != "deepseek":  # the coordinator warns that it ignores them: a manifest should not
                assert (cfg.num_groups, cfg.num_nodes) == (1, 1), f"--groups/--nodes under --policy {cfg.policy}"
            assert "--enable-eplb" in vllm and "--enable-expert-parallel" in vllm
            env = {e["name"]: e.get("value") for e in container(tpl, "vllm").get("env", [])}
            script = " ".join(container(tpl, "vllm").get("args", []))
            endpoint = env.get("EPLB_SERVICE_ENDPOINT") or script.split("EPLB_SERVICE_ENDPOINT=")[1].split(";")[0]
            if cfg.endpoint.startswith("ipc://"):
                assert endpoint == cfg.endpoint
            else:
                assert endpoint.endswith(":" + cfg.endpoint.rsplit(":", 1)[1])
                assert (
                    cfg.curve_dir
                    and env.get("EPLB_SERVICE_CURVE_SERVER_CERT")
                    and env.get("EPLB_SERVICE_CURVE_CLIENT_CERT")
                )


def test_multinode_secret_carries_every_mounted_key():
    kustomization = yaml.safe_load((K8S / "multinode" / "kustomization.yaml").read_text())
    generated = {f.split("=")[0] for g in kustomization["secretGenerator"] for f in g["files"]}
    for doc in resources("multinode"):
        for tpl in pod_templates(doc):
            for vol in tpl["spec"]["volumes"]:
                if "secret" in vol:
                    assert vol["secret"]["secretName"] == "eplb-curve-keys"
                    assert {i["key"] for i in vol["secret"]["items"]} <= generated


def own_ports(c: dict) -> set:
    return {p["name"] for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}


@pytest.mark.parametrize("variant", ["base", "multinode"])
def test_coordinator_never_gates_vllm_readiness(variant):
    """A native sidecar's readiness counts toward the pod's: the coordinator must not have a readiness probe.

    Liveness and startup probes restart it on its own; vLLM's readiness is its own /health only.
    """
    sidecars = 0
    for doc in resources(variant):
        for tpl in pod_templates(doc):
            spec = tpl["spec"]
            assert not spec.get("readinessGates"), "a readiness gate would tie the pod's readiness to something else"
            for c in spec.get("initContainers", []):
                if c["name"] != "eplb-coordinator":
                    continue
                sidecars += 1
                assert c.get("restartPolicy") == "Always", (
                    "the coordinator must be a native sidecar (restarts on its own)"
                )
                assert "readinessProbe" not in c, "a coordinator readinessProbe takes vLLM out of its Service"
                assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
                assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
            vllm = container(tpl, "vllm")
            probe = vllm.get("readinessProbe")
            if probe is not None:
                assert (
                    set(probe) - {"httpGet", "periodSeconds", "failureThreshold", "timeoutSeconds", "successThreshold"}
                    == set()
                ), f"vLLM's readiness must be an HTTP check of vLLM itself, got {probe}"
                assert probe["httpGet"]["path"] == "/health" and probe["httpGet"]["port"] in own_ports(vllm)
    assert sidecars >= 1, f"{variant} runs no coordinator sidecar"


@pytest.mark.parametrize("variant", ["base", "multinode"])
def test_images_are_pinned_to_this_release(variant):
    import tomllib

    version = tomllib.loads((K8S.parent.parent / "pyproject.toml").read_text())["project"]["version"]
    for doc in resources(variant):
        for tpl in pod_templates(doc):
            for c in tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]:
                assert c["image"] == f"eplb-service:{version}", (
                    f"{c['name']} runs {c['image']}, expected eplb-service:{version}"
                )


@pytest.mark.parametrize("variant", ["base", "multinode"])
def test_model_weights_live_on_a_persistent_volume(variant):
    docs = resources(variant)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in docs:
        for tpl in pod_templates(doc):
            volumes = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
            vllm = container(tpl, "vllm")
            hf_home = {e["name"]: e.get("value") for e in vllm.get("env", [])}.get("HF_HOME")
            assert hf_home, "vLLM's HF_HOME must point at the model volume"
            (mount,) = [m for m in vllm["volumeMounts"] if hf_home.startswith(m["mountPath"].rstrip("/") + "/")]
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim in claims, (
                f"HF_HOME {hf_home} is on volume {mount['name']}, not on a PersistentVolumeClaim of {variant}"
            )
            if doc["kind"] == "LeaderWorkerSet":
                assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], (
                    "the pods of a LeaderWorkerSet run on several nodes: "
                    "their shared model volume must be ReadWriteMany"
                )
            assert tpl["spec"]["securityContext"].get("fsGroupChangePolicy") == "OnRootMismatch", (
                "without OnRootMismatch the kubelet chowns every model file at each start"
            )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("variant", ["base", "multinode"])
def test_kustomize_builds_every_variant(variant, tmp_path):
    """`kubectl apply -k` as the README says: the variant builds, with every resource the tests above read."""
    import subprocess

    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("keys"))
    generate_keys(str(copy / "multinode" / "keys"))  # the secretGenerator's inputs, as the README has users create them
    out = subprocess.run(["kubectl", "kustomize", str(copy / variant)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out.stdout) if d)
    expected = sorted((d["kind"], d["metadata"]["name"]) for d in resources(variant))
    assert [k for k in built if k[0] != "Secret"] == expected


def coordinator_metrics() -> list:
    from prometheus_client.metrics import MetricWrapperBase

    from eplb_service.coordinator.metrics import CoordinatorMetrics

    return [m for m in vars(CoordinatorMetrics()).values() if isinstance(m, MetricWrapperBase)]


def exported_metric_names() -> dict[str, set[str]]:
    """Series names a coordinator exports (``_total``, ``_bucket``...) -> their label names, from CoordinatorMetrics."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    names = {}
    for metric in coordinator_metrics():
        family = metric.describe()[0]
        labels = set(metric._labelnames)  # no public accessor; stable across prometheus_client releases
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def exported_label_values() -> dict[tuple[str, str], set[str]]:
    """(series, label) -> the values a fresh coordinator already exports (labels it initialises, like outcome)."""
    from eplb_service.coordinator.metrics import CoordinatorMetrics

    values: dict[tuple[str, str], set[str]] = {}
    for family in CoordinatorMetrics().registry.collect():
        for sample in family.samples:
            for label, value in sample.labels.items():
                values.setdefault((sample.name, label), set()).add(value)
    return values


def alert_rules() -> list[dict]:
    (doc,) = [d for d in resources("base") if d["kind"] == "PrometheusRule"]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def selectors(expr: str) -> list:
    promql = pytest.importorskip("promql_parser")
    found = []
    promql.walk(
        promql.parse(expr), lambda node: found.append(node) if isinstance(node, promql.VectorSelector) else None
    )
    return found


def test_alert_rules_parse_and_use_only_metrics_the_coordinator_exports():
    names, values = exported_metric_names(), exported_label_values()
    used = set()
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"], rule["alert"]
        for sel in selectors(rule["expr"]):
            assert sel.name in names, (
                f"{rule['alert']}: {sel.name} is not a metric of eplb_service/coordinator/metrics.py"
            )
            used.add(sel.name)
            for m in sel.matchers.matchers:
                assert m.name in names[sel.name], f"{rule['alert']}: {sel.name} has no label {m.name!r}"
                known = values.get((sel.name, m.name))
                if known is not None:
                    assert m.value in known, (
                        f"{rule['alert']}: {sel.name}{{{m.name}={m.value!r}}} is never exported; known {known}"
                    )
    # the four conditions the rules exist for: diverged and aborted plans, missing agents, stalled reports
    assert {"eplb_plans_total", "eplb_agents_alive", "eplb_agent_up", "eplb_load_reports_total"} <= used


def test_alert_rules_cover_each_condition_once():
    by_alert = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert len(by_alert) == len(alert_rules()), "duplicate alert names"
    assert 'outcome="diverged"' in by_alert["EplbRebalancingHalted"]
    assert 'outcome="aborted"' in by_alert["EplbPlansAborting"] and "increase(" in by_alert["EplbPlansAborting"]
    assert "eplb_agents_alive" in by_alert["EplbAgentsMissing"] and "count by" in by_alert["EplbAgentsMissing"]
    assert "rate(eplb_load_reports_total" in by_alert["EplbLoadReportsStalled"]


def pod_labels(doc: dict, tpl: dict) -> dict:
    """A template's labels as the pods get them (the LeaderWorkerSet controller adds its set's name)."""
    labels = dict(tpl["metadata"]["labels"])
    if doc["kind"] == "LeaderWorkerSet":
        labels["leaderworkerset.sigs.k8s.io/name"] = doc["metadata"]["name"]
    return labels


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector} uses more than matchLabels"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("variant", ["base", "multinode"])
def test_store_port_is_set_on_vllm_and_open_only_to_the_deployment(variant):
    docs = resources(variant)
    pods = [(pod_labels(d, t), t) for d in docs for t in pod_templates(d)]
    store_ports = {
        dict((e["name"], e.get("value")) for e in container(t, "vllm").get("env", [])).get("EPLB_SERVICE_STORE_PORT")
        for _, t in pods
    }
    assert store_ports == {"29555"}, f"every vLLM container needs EPLB_SERVICE_STORE_PORT=29555, got {store_ports}"
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    guarded = [(labels, t) for labels, t in pods if selects(spec["podSelector"], labels)]
    assert len(guarded) == len(pods), "the NetworkPolicy must select every pod of the deployment"
    assert spec["policyTypes"] == ["Ingress"]

    containers = [c for _, t in pods for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]

    def port_values(p: dict) -> set:
        """What a policy port means on these pods: itself, and the number of each container port it names."""
        return {p["port"]} | {
            cp["containerPort"] for c in containers for cp in c.get("ports", []) if cp["name"] == p["port"]
        }

    opens_store = []
    for rule in spec["ingress"]:
        ports = set().union(*(port_values(p) for p in rule["ports"])) if "ports" in rule else None  # None: every port
        if ports is None or 29555 in ports:
            opens_store.append(rule)
            sources = rule.get("from", [])
            assert sources and all(set(s) == {"podSelector"} for s in sources), (
                f"the unauthenticated store port is open beyond the deployment's pods: {rule}"
            )
            assert all(any(selects(s["podSelector"], labels) for labels, _ in pods) for s in sources)
        if ports is not None and 8000 in ports:
            assert "from" not in rule, "vLLM's API must stay reachable"
    if variant == "multinode":  # rank 0's store serves the other pods: the policy names the port
        assert any(any(p["port"] in ("eplb-store", 29555) for p in r.get("ports", [])) for r in opens_store)
    else:  # every rank is in the one pod: nothing opens the store port
        assert opens_store == []
