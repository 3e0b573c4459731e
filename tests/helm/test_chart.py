#!/usr/bin/env python3
"""Offline tests of the Helm chart helm/tokend.

No cluster, no helm binary: the chart is linted and rendered by the Helm v4 SDK through
helm-python-sdk (`helm_python`), and every rendered manifest is validated strictly (unknown
fields refused) against the Kubernetes 1.25.0 and 1.37.0 OpenAPI schemas bundled with
kubernetes-validate. The prometheus-operator ServiceMonitor is a custom resource with no bundled
schema: it, and only it, is checked by hand.

Value sets live in helm/tokend/ci/*-values.yaml (the chart-testing convention):
postgres (the defaults plus database.url), sqlite, existing-secrets (database and pepper from
Secrets the operator manages) and full (autoscaling, NetworkPolicy, ServiceMonitor, OTLP
tracing, TLS with required client certificates).

Run: python tests/helm/test_chart.py   (from a venv with helm-python-sdk==0.2.2 and
kubernetes-validate==1.37.0; .ci/helm-check.sh sets one up). The last line reads
"helm-chart: N passed, N failed".
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import pathlib
import sys
import tempfile
import tomllib
import unittest

import helm_python
import kubernetes_validate
import yaml
from helm_python import _native

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tokend"
RELEASE = "rel"
NAMESPACE = "tokend-ns"
FULLNAME = "rel-tokend"
MIGRATE = "rel-tokend-migrate"
KUBE_VERSIONS = ("1.25.0", "1.37.0")
VALUE_SETS = ("postgres", "sqlite", "existing-secrets", "full")

# Every key tokend's settings file accepts (an unknown key stops tokend at start).
ALLOWED_TOML = {
    "listen": None,
    "token_prefix": None,
    "migrate_on_start": None,
    "pepper_file": None,
    "drain_timeout_ms": None,
    "health_listen": None,
    "log": {"format", "filter"},
    "database": {"max_connections"},
    "cache": {"max_tokens"},
    "metrics": {"listen"},
    "otel": {"endpoint", "sample_ratio", "service_name"},
    "tls": {"cert_file", "key_file", "client_ca_file", "client_auth_optional"},
}

SQLITE_REFUSAL = (
    "database.sqlite supports exactly one replica: set replicaCount: 1 or use PostgreSQL "
    "(database.url / database.existingSecret)"
)
NO_DATABASE_REFUSAL = "tokend needs a database"


def value_set(name: str) -> dict:
    with open(CHART / "ci" / f"{name}-values.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@contextlib.contextmanager
def captured_stderr_fd():
    """Capture what the Go library writes to file descriptor 2 (its default logger)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        box: dict[str, str] = {}
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode("utf-8", "replace")


_CHART_HANDLE: helm_python.Chart | None = None


def chart() -> helm_python.Chart:
    global _CHART_HANDLE
    if _CHART_HANDLE is None:
        _CHART_HANDLE = helm_python.Chart.load(CHART)
    return _CHART_HANDLE


def render_raw(values: dict, kube_version: str) -> dict[str, str]:
    """Render offline for one Kubernetes version (.Capabilities.KubeVersion).

    helm-python-sdk 0.2.2's Chart.render() exposes no kube_version although the C ABI's
    helm_render options accept it (with api_versions and strict), so this calls the same
    native function Chart.render() calls, with that option added. strict: a template that
    reads a missing value fails instead of rendering "<no value>". The 1.25-only and
    1.30+-only assertions below would fail if the option were ignored.
    """
    opts = {
        "name": RELEASE,
        "namespace": NAMESPACE,
        "kube_version": f"v{kube_version}",
        "strict": True,
    }
    out = _native.call_string("helm_render", chart()._raw(), json.dumps(values), json.dumps(opts))
    return json.loads(out)


class Rendered:
    """One render: the manifests by kind and name, plus NOTES.txt."""

    def __init__(self, values: dict, kube_version: str):
        self.values = values
        self.kube_version = kube_version
        self.files = render_raw(values, kube_version)
        self.objects: list[dict] = []
        self.notes = ""
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc["__source"] = path
                    self.objects.append(doc)

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
        return found[0]

    def has(self, kind: str, name: str | None = None) -> bool:
        return any(name is None or o["metadata"]["name"] == name for o in self.all(kind))

    @property
    def deployment(self) -> dict:
        return self.get("Deployment", FULLNAME)

    @property
    def container(self) -> dict:
        return self.deployment["spec"]["template"]["spec"]["containers"][0]

    def toml(self, name: str = FULLNAME) -> dict:
        return tomllib.loads(self.get("ConfigMap", name)["data"]["tokend.toml"])

    def env(self, container: dict | None = None) -> dict[str, dict]:
        return {e["name"]: e for e in (container or self.container).get("env", [])}

    def volumes(self, pod_spec: dict | None = None) -> dict[str, dict]:
        spec = pod_spec or self.deployment["spec"]["template"]["spec"]
        return {v["name"]: v for v in spec.get("volumes", [])}

    def mounts(self, container: dict | None = None) -> dict[str, dict]:
        return {m["name"]: m for m in (container or self.container).get("volumeMounts", [])}


_RENDERS: dict[tuple[str, str], Rendered] = {}


def rendered(name: str, kube_version: str = "1.37.0") -> Rendered:
    key = (name, kube_version)
    if key not in _RENDERS:
        _RENDERS[key] = Rendered(value_set(name), kube_version)
    return _RENDERS[key]


def clean(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("__")}


def check_service_monitor(obj: dict) -> None:
    """monitoring.coreos.com/v1 ServiceMonitor: no schema is bundled, so check by hand."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["apiVersion"]
    assert obj["kind"] == "ServiceMonitor"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, set(obj)
    meta = obj["metadata"]
    assert meta.get("name") and meta.get("namespace"), meta
    assert all(isinstance(v, str) for v in meta.get("labels", {}).values()), meta
    spec = obj["spec"]
    allowed_spec = {"jobLabel", "selector", "namespaceSelector", "endpoints"}
    assert set(spec) <= allowed_spec, set(spec) - allowed_spec
    assert spec["selector"]["matchLabels"], "the selector must not be empty"
    assert isinstance(spec["namespaceSelector"]["matchNames"], list)
    assert spec["endpoints"], "endpoints are required"
    allowed_endpoint = {
        "port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings",
    }
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= allowed_endpoint, set(endpoint) - allowed_endpoint
        assert isinstance(endpoint["port"], str) and endpoint["port"], endpoint
        assert endpoint["scheme"] in ("http", "https")
        for key in ("interval", "scrapeTimeout"):
            value = endpoint[key]
            assert isinstance(value, str) and value[-1] in "smh" and value[0].isdigit(), value


def validate_object(obj: dict, kube_version: str) -> str:
    """Strict schema validation; returns "schema" or "by hand (ServiceMonitor CRD)"."""
    body = clean(obj)
    if body["apiVersion"] == "monitoring.coreos.com/v1" and body["kind"] == "ServiceMonitor":
        check_service_monitor(body)
        return "by hand (ServiceMonitor CRD)"
    try:
        kubernetes_validate.validate(body, kube_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        raise AssertionError(f"no schema for {body['kind']} {body['apiVersion']} in {kube_version}: {e.message}")
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        raise AssertionError(
            f"{obj['__source']}: {body['kind']}/{body['metadata']['name']} is invalid for "
            f"Kubernetes {kube_version} at {where}: {e.message}"
        )
    return "schema"


def pod_specs(r: Rendered) -> list[tuple[str, dict]]:
    specs = [("Deployment", r.deployment["spec"]["template"]["spec"])]
    specs += [(f"Job/{j['metadata']['name']}", j["spec"]["template"]["spec"]) for j in r.all("Job")]
    return specs


class Lint(unittest.TestCase):
    def lint(self, values: dict, kube_version: str) -> tuple[dict, str]:
        with captured_stderr_fd() as log:
            report = helm_python.lint(
                str(CHART), values, strict=True, kube_version=f"v{kube_version}"
            )
        return report, log["text"]

    def assert_clean(self, report: dict) -> None:
        self.assertEqual(report["errors"], [], report)
        serious = [m for m in report["messages"] if m["severity"] >= 2]
        self.assertEqual(serious, [], report)

    def test_default_values_lint_clean(self):
        # Helm v4's lint runs `fail` leniently (it logs the message and renders on), so the
        # defaults lint clean while logging the chart's refusal to run without a database;
        # the refusal itself is asserted by rendering in Refusals.
        for kube_version in KUBE_VERSIONS:
            with self.subTest(kube_version=kube_version):
                report, log = self.lint({}, kube_version)
                self.assert_clean(report)
                self.assertIn(NO_DATABASE_REFUSAL, log)

    def test_value_sets_lint_clean(self):
        for name in VALUE_SETS:
            for kube_version in KUBE_VERSIONS:
                with self.subTest(values=name, kube_version=kube_version):
                    report, log = self.lint(value_set(name), kube_version)
                    self.assert_clean(report)
                    self.assertNotIn("fail message", log)

    def test_lint_refuses_schema_violations(self):
        report, _ = self.lint({"replicaCont": 3}, "1.37.0")
        self.assertTrue(any("replicaCont" in e for e in report["errors"]), report)


class Schemas(unittest.TestCase):
    def test_every_manifest_validates_strictly(self):
        """Each render is validated against its own Kubernetes version and every newer one
        tested (a manifest rendered for 1.25 must still be accepted by 1.37)."""
        checked = 0
        by_hand = set()
        for name in VALUE_SETS:
            for render_version in KUBE_VERSIONS:
                r = rendered(name, render_version)
                self.assertTrue(r.objects, name)
                for obj in r.objects:
                    for kube_version in KUBE_VERSIONS:
                        if tuple(map(int, kube_version.split("."))) < tuple(
                            map(int, render_version.split("."))
                        ):
                            continue
                        with self.subTest(
                            values=name,
                            rendered_for=render_version,
                            validated_for=kube_version,
                            object=f"{obj['kind']}/{obj['metadata']['name']}",
                        ):
                            how = validate_object(obj, kube_version)
                            checked += 1
                            if how != "schema":
                                by_hand.add(obj["kind"])
        self.assertGreater(checked, 60)
        # Only the CRD is exempt from the bundled schemas, and it was rendered and checked.
        self.assertEqual(by_hand, {"ServiceMonitor"})

    def test_validation_catches_an_unknown_field(self):
        deployment = copy.deepcopy(rendered("postgres").deployment)
        deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
        with self.assertRaises(AssertionError):
            validate_object(deployment, "1.37.0")

    def test_removed_api_version_is_a_failure(self):
        hpa = copy.deepcopy(rendered("full").get("HorizontalPodAutoscaler"))
        hpa["apiVersion"] = "autoscaling/v2beta1"
        with self.assertRaises(AssertionError):
            validate_object(hpa, "1.37.0")


class PostgresDefaults(unittest.TestCase):
    def setUp(self):
        self.r = rendered("postgres")

    def test_two_replicas_rolling_update(self):
        spec = self.r.deployment["spec"]
        self.assertEqual(spec["replicas"], 2)
        self.assertEqual(spec["strategy"]["type"], "RollingUpdate")
        self.assertEqual(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0)

    def test_serve_without_migrations(self):
        self.assertEqual(
            self.r.container["args"],
            ["--config", "/etc/tokend/tokend.toml", "serve", "--no-migrate"],
        )
        self.assertIs(self.r.toml()["migrate_on_start"], False)

    def test_secret_holds_the_database_url_and_the_configmap_no_secret(self):
        url = value_set("postgres")["database"]["url"]
        secret = self.r.get("Secret", FULLNAME)
        self.assertEqual(base64.b64decode(secret["data"]["database-url"]).decode(), url)
        self.assertEqual(set(secret["data"]), {"database-url"})
        env = self.r.env()["TOKEND_DATABASE_URL"]
        self.assertEqual(
            env["valueFrom"]["secretKeyRef"], {"name": FULLNAME, "key": "database-url"}
        )
        for cm in self.r.all("ConfigMap"):
            text = json.dumps(cm)
            self.assertNotIn("s3cret", text)
            self.assertNotIn("postgres://", text)
            self.assertNotIn("database_url", text)

    def test_no_pepper_no_pepper_file_and_a_warning(self):
        self.assertNotIn("pepper_file", self.r.toml())
        self.assertNotIn("pepper", self.r.volumes())
        self.assertIn("WARNING: no pepper is set", self.r.notes)

    def test_pod_disruption_budget(self):
        pdb = self.r.get("PodDisruptionBudget", FULLNAME)
        self.assertEqual(pdb["spec"]["minAvailable"], 1)
        self.assertNotIn("maxUnavailable", pdb["spec"])
        self.assertEqual(
            pdb["spec"]["selector"]["matchLabels"],
            self.r.deployment["spec"]["selector"]["matchLabels"],
        )

    def test_service_ports(self):
        service = self.r.get("Service", FULLNAME)
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        self.assertEqual(ports["grpc"]["port"], 50051)
        self.assertEqual(ports["grpc"]["appProtocol"], "grpc")
        self.assertEqual(ports["grpc"]["targetPort"], "grpc")
        self.assertEqual(ports["metrics"]["port"], 9090)
        self.assertEqual(ports["metrics"]["appProtocol"], "http")
        self.assertEqual(service["spec"]["selector"], self.r.deployment["spec"]["selector"]["matchLabels"])

    def test_probes_on_the_grpc_port(self):
        c = self.r.container
        self.assertEqual(c["readinessProbe"]["grpc"], {"port": 50051, "service": "readiness"})
        self.assertEqual(c["livenessProbe"]["grpc"], {"port": 50051, "service": "liveness"})
        self.assertEqual(c["startupProbe"]["grpc"], {"port": 50051, "service": "liveness"})
        self.assertNotIn("health", {p["name"] for p in c["ports"]})
        self.assertNotIn("health_listen", self.r.toml())

    def test_service_account_and_service_links(self):
        sa = self.r.get("ServiceAccount", FULLNAME)
        self.assertIs(sa["automountServiceAccountToken"], False)
        pod = self.r.deployment["spec"]["template"]["spec"]
        self.assertEqual(pod["serviceAccountName"], FULLNAME)
        self.assertIs(pod["automountServiceAccountToken"], False)
        self.assertIs(pod["enableServiceLinks"], False)

    def test_topology_spread_by_zone_and_host(self):
        constraints = self.r.deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        self.assertEqual(
            [c["topologyKey"] for c in constraints],
            ["topology.kubernetes.io/zone", "kubernetes.io/hostname"],
        )
        selector = self.r.deployment["spec"]["selector"]["matchLabels"]
        for c in constraints:
            self.assertEqual(c["whenUnsatisfiable"], "ScheduleAnyway")
            self.assertEqual(c["labelSelector"]["matchLabels"], selector)

    def test_resources_and_grace(self):
        self.assertEqual(
            self.r.container["resources"],
            {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        )
        pod = self.r.deployment["spec"]["template"]["spec"]
        self.assertEqual(pod["terminationGracePeriodSeconds"], 30)
        self.assertEqual(self.r.toml()["drain_timeout_ms"], 15000)
        # preStop sleep + drain + the 5 s of exit work after it fit inside the grace period.
        sleep = self.r.container["lifecycle"]["preStop"]["sleep"]["seconds"]
        self.assertLessEqual(sleep * 1000 + self.r.toml()["drain_timeout_ms"] + 5000, 30 * 1000)
        # The cache is sized to the memory limit (about 1.1 KiB a token).
        self.assertEqual(self.r.toml()["cache"], {"max_tokens": 300000})


    def test_image_defaults_to_app_version(self):
        app_version = chart().metadata["appVersion"]
        self.assertEqual(self.r.container["image"], f"ghcr.io/tokend/tokend:{app_version}")
        self.assertEqual(self.r.container["imagePullPolicy"], "IfNotPresent")

    def test_optional_resources_absent(self):
        for kind in ("HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor", "PersistentVolumeClaim"):
            self.assertFalse(self.r.has(kind), kind)

    def test_standard_labels_everywhere(self):
        for obj in self.r.objects:
            labels = obj["metadata"]["labels"]
            with self.subTest(object=f"{obj['kind']}/{obj['metadata']['name']}"):
                self.assertEqual(labels["app.kubernetes.io/name"], "tokend")
                self.assertEqual(labels["app.kubernetes.io/instance"], RELEASE)
                self.assertEqual(labels["app.kubernetes.io/managed-by"], "Helm")
                self.assertTrue(labels["helm.sh/chart"].startswith("tokend-"))
                self.assertIn("app.kubernetes.io/version", labels)
                self.assertIn(labels["app.kubernetes.io/component"], ("server", "migration"))
                self.assertEqual(obj["metadata"]["namespace"], NAMESPACE)

    def test_notes_explain_bootstrap_and_grpcurl(self):
        self.assertIn(
            f"kubectl -n {NAMESPACE} exec deploy/{FULLNAME} -- tokend --config /etc/tokend/tokend.toml bootstrap",
            self.r.notes,
        )
        self.assertIn(f"port-forward svc/{FULLNAME} 50051", self.r.notes)
        self.assertIn(
            "grpcurl -plaintext -H \"authorization: Bearer $ROOT_KEY\" -d '{\"token\":\"...\"}' "
            "localhost:50051 tokend.v1.TokenService/Introspect",
            self.r.notes,
        )
        self.assertNotIn("SQLite", self.r.notes.split("WARNING", 1)[-1])


class MigrationHook(unittest.TestCase):
    def setUp(self):
        self.r = rendered("postgres")
        self.job = self.r.get("Job", MIGRATE)

    def test_hook_annotations(self):
        annotations = self.job["metadata"]["annotations"]
        self.assertEqual(annotations["helm.sh/hook"], "pre-install,pre-upgrade")
        self.assertEqual(annotations["helm.sh/hook-weight"], "0")
        self.assertEqual(
            annotations["helm.sh/hook-delete-policy"], "before-hook-creation,hook-succeeded"
        )

    def test_runs_migrate_with_the_same_settings(self):
        container = self.job["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(container["args"], ["--config", "/etc/tokend/tokend.toml", "migrate"])
        self.assertEqual(container["image"], self.r.container["image"])
        self.assertEqual(self.job["spec"]["template"]["spec"]["restartPolicy"], "Never")
        # The hook-scoped ConfigMap is the same settings file as the release's own.
        self.assertEqual(self.r.toml(MIGRATE), self.r.toml(FULLNAME))
        self.assertEqual(
            self.r.volumes(self.job["spec"]["template"]["spec"])["config"]["configMap"]["name"],
            MIGRATE,
        )
        self.assertEqual(
            self.r.mounts(container)["config"]["mountPath"], "/etc/tokend/tokend.toml"
        )

    def test_hook_scoped_copies_exist_before_the_job(self):
        """A pre-install hook runs before the release's own resources exist: the Job reads
        hook copies created at a lower weight, deleted once every hook succeeded."""
        job_spec = self.job["spec"]["template"]["spec"]
        container = job_spec["containers"][0]
        secret_ref = self.r.env(container)["TOKEND_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        self.assertEqual(secret_ref["name"], MIGRATE)
        self.assertEqual(job_spec["serviceAccountName"], MIGRATE)
        for kind in ("Secret", "ConfigMap", "ServiceAccount"):
            with self.subTest(kind=kind):
                copy_ = self.r.get(kind, MIGRATE)
                annotations = copy_["metadata"]["annotations"]
                self.assertEqual(annotations["helm.sh/hook"], "pre-install,pre-upgrade")
                self.assertLess(int(annotations["helm.sh/hook-weight"]), 0)
                self.assertIn("hook-succeeded", annotations["helm.sh/hook-delete-policy"])
                self.assertIn("before-hook-creation", annotations["helm.sh/hook-delete-policy"])
        self.assertEqual(
            self.r.get("Secret", MIGRATE)["data"], self.r.get("Secret", FULLNAME)["data"]
        )
        # The release's own resources are not hooks.
        for kind in ("Secret", "ConfigMap", "ServiceAccount", "Deployment"):
            self.assertNotIn("helm.sh/hook", self.r.get(kind, FULLNAME)["metadata"].get("annotations", {}))

    def test_job_pod_is_not_selected_by_the_service(self):
        selector = self.r.get("Service", FULLNAME)["spec"]["selector"]
        labels = self.job["spec"]["template"]["metadata"]["labels"]
        self.assertFalse(all(labels.get(k) == v for k, v in selector.items()))
        self.assertEqual(labels["app.kubernetes.io/component"], "migration")

    def test_disabled(self):
        r = Rendered(merged(value_set("postgres"), {"migrations": {"enabled": False}}), "1.37.0")
        self.assertFalse(r.has("Job"))
        self.assertIn("--no-migrate", r.container["args"])


class Sqlite(unittest.TestCase):
    def setUp(self):
        self.r = rendered("sqlite")

    def test_one_replica_recreate(self):
        spec = self.r.deployment["spec"]
        self.assertEqual(spec["replicas"], 1)
        self.assertEqual(spec["strategy"], {"type": "Recreate"})

    def test_pvc_mounted_at_data(self):
        pvc = self.r.get("PersistentVolumeClaim", f"{FULLNAME}-data")
        self.assertEqual(pvc["spec"]["resources"]["requests"]["storage"], "2Gi")
        self.assertEqual(pvc["spec"]["storageClassName"], "standard")
        self.assertEqual(pvc["spec"]["accessModes"], ["ReadWriteOnce"])
        self.assertEqual(pvc["metadata"]["annotations"]["helm.sh/resource-policy"], "keep")
        volume = self.r.volumes()["data"]
        self.assertEqual(volume["persistentVolumeClaim"]["claimName"], f"{FULLNAME}-data")
        self.assertEqual(self.r.mounts()["data"]["mountPath"], "/data")

    def test_database_url_and_migrations_on_start(self):
        env = self.r.env()["TOKEND_DATABASE_URL"]
        self.assertEqual(env["value"], "sqlite:///data/tokend.db?mode=rwc")
        self.assertEqual(self.r.container["args"], ["--config", "/etc/tokend/tokend.toml", "serve"])
        self.assertIs(self.r.toml()["migrate_on_start"], True)

    def test_no_job_no_pdb_no_secret_no_hpa(self):
        for kind in ("Job", "PodDisruptionBudget", "Secret", "HorizontalPodAutoscaler"):
            self.assertFalse(self.r.has(kind), kind)
        self.assertFalse([o for o in self.r.objects if "helm.sh/hook" in o["metadata"].get("annotations", {})])

    def test_notes_warn_single_replica(self):
        self.assertIn("WARNING: SQLite mode runs exactly one replica", self.r.notes)

    def test_existing_claim_and_no_persistence(self):
        r = Rendered(merged(value_set("sqlite"), {"persistence": {"existingClaim": "old-data"}}), "1.37.0")
        self.assertFalse(r.has("PersistentVolumeClaim"))
        self.assertEqual(r.volumes()["data"]["persistentVolumeClaim"]["claimName"], "old-data")
        r = Rendered(merged(value_set("sqlite"), {"persistence": {"enabled": False}}), "1.37.0")
        self.assertFalse(r.has("PersistentVolumeClaim"))
        self.assertEqual(r.volumes()["data"], {"name": "data", "emptyDir": {}})


class ExistingSecrets(unittest.TestCase):
    def setUp(self):
        self.r = rendered("existing-secrets")

    def test_no_chart_secret(self):
        self.assertFalse(self.r.has("Secret"))

    def test_database_url_from_the_existing_secret(self):
        for container in (self.r.container, self.r.get("Job", MIGRATE)["spec"]["template"]["spec"]["containers"][0]):
            ref = self.r.env(container)["TOKEND_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            self.assertEqual(ref, {"name": "tokend-database", "key": "url"})

    def test_pepper_file_from_the_existing_secret(self):
        self.assertEqual(self.r.toml()["pepper_file"], "/etc/tokend/pepper/pepper")
        pod = self.r.deployment["spec"]["template"]["spec"]
        volume = self.r.volumes(pod)["pepper"]["secret"]
        self.assertEqual(volume["secretName"], "tokend-pepper")
        self.assertEqual(volume["items"], [{"key": "value", "path": "pepper"}])
        self.assertEqual(volume["defaultMode"], 0o440)
        self.assertEqual(self.r.mounts(pod["containers"][0])["pepper"]["mountPath"], "/etc/tokend/pepper")
        # `migrate` never reads the pepper: the hook Job does not hold it.
        job_pod = self.r.get("Job", MIGRATE)["spec"]["template"]["spec"]
        self.assertNotIn("pepper", self.r.volumes(job_pod))
        self.assertNotIn("WARNING: no pepper", self.r.notes)


class Full(unittest.TestCase):
    def setUp(self):
        self.r = rendered("full")

    def test_the_migration_job_has_its_own_egress(self):
        policy = self.r.get("NetworkPolicy", MIGRATE)
        self.assertEqual(policy["metadata"]["annotations"]["helm.sh/hook-weight"], "-10")
        job_labels = self.r.get("Job", MIGRATE)["spec"]["template"]["metadata"]["labels"]
        selector = policy["spec"]["podSelector"]["matchLabels"]
        self.assertTrue(selector.items() <= job_labels.items(), (selector, job_labels))
        ports = {(p["port"], p["protocol"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
        self.assertIn((53, "UDP"), ports)
        self.assertIn((5432, "TCP"), ports)
        # The server's policy does not select the Job's pod.
        server = self.r.get("NetworkPolicy", FULLNAME)["spec"]["podSelector"]["matchLabels"]
        self.assertFalse(server.items() <= job_labels.items())

    def test_a_tls_port_is_not_announced_as_h2c(self):
        ports = {p["name"]: p for p in self.r.get("Service", FULLNAME)["spec"]["ports"]}
        self.assertEqual(ports["grpc"]["appProtocol"], "tls")

    def test_autoscaling(self):
        hpa = self.r.get("HorizontalPodAutoscaler", FULLNAME)
        self.assertEqual(hpa["apiVersion"], "autoscaling/v2")
        self.assertEqual((hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]), (3, 12))
        self.assertEqual(hpa["spec"]["scaleTargetRef"]["name"], FULLNAME)
        self.assertEqual(hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"], 60)
        self.assertNotIn("replicas", self.r.deployment["spec"])
        # minReplicas 3 > 1: the budget stays.
        self.assertTrue(self.r.has("PodDisruptionBudget", FULLNAME))

    def test_tls_and_health_port(self):
        toml = self.r.toml()
        self.assertEqual(toml["health_listen"], "0.0.0.0:50052")
        self.assertEqual(
            toml["tls"],
            {
                "cert_file": "/etc/tokend/tls/tls.crt",
                "key_file": "/etc/tokend/tls/tls.key",
                "client_ca_file": "/etc/tokend/tls/ca.crt",
                "client_auth_optional": False,
            },
        )
        c = self.r.container
        self.assertIn({"name": "health", "containerPort": 50052, "protocol": "TCP"}, c["ports"])
        self.assertEqual(c["readinessProbe"]["grpc"], {"port": 50052, "service": "readiness"})
        self.assertEqual(c["livenessProbe"]["grpc"], {"port": 50052, "service": "liveness"})
        self.assertEqual(c["startupProbe"]["grpc"], {"port": 50052, "service": "liveness"})
        tls = self.r.volumes()["tls"]["secret"]
        self.assertEqual(tls["secretName"], "tokend-tls")
        self.assertEqual([i["key"] for i in tls["items"]], ["tls.crt", "tls.key", "ca.crt"])
        self.assertEqual(self.r.mounts()["tls"]["mountPath"], "/etc/tokend/tls")
        # The Service does not publish the health port.
        ports = {p["name"] for p in self.r.get("Service", FULLNAME)["spec"]["ports"]}
        self.assertEqual(ports, {"grpc", "metrics"})

    def test_client_auth_optional_and_none(self):
        base = value_set("full")
        r = Rendered(merged(base, {"tls": {"clientAuth": "optional"}}), "1.37.0")
        self.assertIs(r.toml()["tls"]["client_auth_optional"], True)
        r = Rendered(merged(base, {"tls": {"clientAuth": "none"}}), "1.37.0")
        self.assertEqual(set(r.toml()["tls"]), {"cert_file", "key_file"})
        self.assertEqual([i["key"] for i in r.volumes()["tls"]["secret"]["items"]], ["tls.crt", "tls.key"])

    def test_otel(self):
        self.assertEqual(
            self.r.toml()["otel"],
            {
                "endpoint": "http://otel-collector.observability:4317",
                "sample_ratio": 0.25,
                "service_name": "tokend",
            },
        )
        r = Rendered(merged(value_set("full"), {"otel": {"sampleRatio": 1}}), "1.37.0")
        self.assertIsInstance(r.toml()["otel"]["sample_ratio"], float)

    def test_network_policy(self):
        np = self.r.get("NetworkPolicy", FULLNAME)
        spec = np["spec"]
        self.assertEqual(spec["podSelector"]["matchLabels"], self.r.deployment["spec"]["selector"]["matchLabels"])
        self.assertEqual(spec["policyTypes"], ["Ingress", "Egress"])
        grpc_rule, metrics_rule = spec["ingress"]
        self.assertEqual(grpc_rule["ports"], [{"port": 50051, "protocol": "TCP"}])
        self.assertEqual(grpc_rule["from"], value_set("full")["networkPolicy"]["ingressFrom"])
        self.assertEqual(metrics_rule["ports"], [{"port": 9090, "protocol": "TCP"}])
        self.assertEqual(metrics_rule["from"], value_set("full")["networkPolicy"]["metricsFrom"])
        egress_ports = [p["port"] for rule in spec["egress"] for p in rule["ports"]]
        self.assertEqual(egress_ports, [53, 53, 5432, 4317])
        self.assertEqual(spec["egress"][1]["to"], [{"ipBlock": {"cidr": "10.20.0.0/16"}}])
        self.assertNotIn("to", spec["egress"][2])

    def test_network_policy_defaults_to_the_namespace(self):
        r = Rendered(merged(value_set("postgres"), {"networkPolicy": {"enabled": True}}), "1.37.0")
        spec = r.get("NetworkPolicy", FULLNAME)["spec"]
        for rule in spec["ingress"]:
            self.assertEqual(rule["from"], [{"podSelector": {}}])
        self.assertEqual([p["port"] for rule in spec["egress"] for p in rule["ports"]], [53, 53, 5432])
        r = Rendered(
            merged(value_set("postgres"), {"networkPolicy": {"enabled": True, "egress": {"enabled": False}}}),
            "1.37.0",
        )
        spec = r.get("NetworkPolicy", FULLNAME)["spec"]
        self.assertEqual(spec["policyTypes"], ["Ingress"])
        self.assertNotIn("egress", spec)

    def test_service_monitor(self):
        sm = self.r.get("ServiceMonitor", FULLNAME)
        check_service_monitor(clean(sm))
        self.assertEqual(sm["metadata"]["labels"]["release"], "prometheus")
        self.assertEqual(sm["spec"]["selector"]["matchLabels"], self.r.get("Service", FULLNAME)["spec"]["selector"])
        endpoint = sm["spec"]["endpoints"][0]
        self.assertEqual((endpoint["port"], endpoint["path"]), ("metrics", "/metrics"))
        self.assertEqual((endpoint["interval"], endpoint["scrapeTimeout"]), ("15s", "5s"))
        self.assertEqual(sm["spec"]["namespaceSelector"]["matchNames"], [NAMESPACE])

    def test_pepper_value_in_the_secret(self):
        secret = self.r.get("Secret", FULLNAME)
        self.assertEqual(
            base64.b64decode(secret["data"]["pepper"]).decode(),
            value_set("full")["pepper"]["value"],
        )
        self.assertEqual(self.r.toml()["pepper_file"], "/etc/tokend/pepper/pepper")
        self.assertEqual(self.r.volumes()["pepper"]["secret"]["secretName"], FULLNAME)
        # The hook Job needs neither the pepper nor the certificates (`migrate` reads
        # neither), so it never waits for a TLS Secret made in the same install.
        job_pod = self.r.get("Job", MIGRATE)["spec"]["template"]["spec"]
        self.assertNotIn("pepper", self.r.volumes(job_pod))
        self.assertNotIn("tls", self.r.volumes(job_pod))
        self.assertNotIn(value_set("full")["pepper"]["value"], json.dumps(self.r.all("ConfigMap")))

    def test_settings(self):
        toml = self.r.toml()
        self.assertEqual(toml["token_prefix"], "acme")
        self.assertEqual(toml["log"], {"format": "text", "filter": "info,tokend=debug"})
        self.assertEqual(toml["database"], {"max_connections": 20})
        self.assertIn("TLS", self.r.notes)
        self.assertIn("-cert client.crt -key client.key", self.r.notes)


class EverySet(unittest.TestCase):
    def test_security_context(self):
        for name in VALUE_SETS:
            r = rendered(name)
            for what, pod in pod_specs(r):
                with self.subTest(values=name, pod=what):
                    psc = pod.get("securityContext", {})
                    self.assertIs(psc.get("runAsNonRoot"), True)
                    self.assertEqual(
                        (psc.get("runAsUser"), psc.get("runAsGroup"), psc.get("fsGroup")),
                        (65532, 65532, 65532),
                    )
                    self.assertEqual(psc.get("seccompProfile"), {"type": "RuntimeDefault"})
                    self.assertIs(pod.get("automountServiceAccountToken"), False)
                    for container in pod["containers"]:
                        csc = container.get("securityContext", {})
                        self.assertIs(csc.get("allowPrivilegeEscalation"), False)
                        self.assertIs(csc.get("readOnlyRootFilesystem"), True)
                        self.assertEqual(csc.get("capabilities"), {"drop": ["ALL"]})
                        self.assertEqual(self.mount_of(container, "tmp"), "/tmp")
                    tmp = {v["name"]: v for v in pod["volumes"]}["tmp"]
                    self.assertIn("emptyDir", tmp)

    @staticmethod
    def mount_of(container: dict, name: str) -> str:
        return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[name]

    def test_settings_file_has_only_known_keys(self):
        for name in VALUE_SETS:
            for kube_version in KUBE_VERSIONS:
                r = rendered(name, kube_version)
                for cm in r.all("ConfigMap"):
                    with self.subTest(values=name, configmap=cm["metadata"]["name"]):
                        toml = tomllib.loads(cm["data"]["tokend.toml"])
                        self.assertLessEqual(set(toml), set(ALLOWED_TOML))
                        for key, value in toml.items():
                            if isinstance(value, dict):
                                self.assertLessEqual(set(value), ALLOWED_TOML[key], key)
                            else:
                                self.assertIsNone(ALLOWED_TOML[key], key)
                        self.assertNotIn("database_url", toml)
                        values = r.values
                        self.assertEqual(toml["listen"], "0.0.0.0:50051")
                        self.assertEqual(toml["metrics"], {"listen": "0.0.0.0:9090"})
                        self.assertEqual("otel" in toml, bool(values.get("otel", {}).get("endpoint")))
                        tls = bool(values.get("tls", {}).get("enabled"))
                        self.assertEqual("tls" in toml, tls)
                        self.assertEqual("health_listen" in toml, tls)
                        pepper = values.get("pepper", {})
                        self.assertEqual(
                            "pepper_file" in toml, bool(pepper.get("value") or pepper.get("existingSecret"))
                        )
                        self.assertEqual(toml["log"]["format"], values.get("log", {}).get("format", "json"))

    def test_pre_stop_sleep_only_where_kubernetes_runs_it(self):
        for name in VALUE_SETS:
            with self.subTest(values=name):
                old = rendered(name, "1.25.0").container
                new = rendered(name, "1.37.0").container
                self.assertNotIn("lifecycle", old)
                self.assertEqual(new["lifecycle"], {"preStop": {"sleep": {"seconds": 5}}})

    def test_unhealthy_pod_eviction_policy_only_from_1_27(self):
        old = rendered("postgres", "1.25.0").get("PodDisruptionBudget")
        new = rendered("postgres", "1.37.0").get("PodDisruptionBudget")
        self.assertNotIn("unhealthyPodEvictionPolicy", old["spec"])
        self.assertEqual(new["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow")

    def test_public_render_api_agrees(self):
        """Chart.render() (the SDK's public call, default Kubernetes version) renders the
        same templates; only version-dependent fields may differ."""
        values = value_set("postgres")
        public = chart().render(values, name=RELEASE, namespace=NAMESPACE)
        self.assertEqual(set(public), set(rendered("postgres").files))
        self.assertEqual(
            public["tokend/templates/configmap.yaml"],
            rendered("postgres").files["tokend/templates/configmap.yaml"],
        )


class Documentation(unittest.TestCase):
    @staticmethod
    def value_paths(values: dict, schema: dict, prefix: str = "") -> list[str]:
        """Every value's dotted path, down to the objects the schema describes key by key
        (free-form objects such as `resources` count as one value)."""
        paths = []
        for key, value in values.items():
            path = f"{prefix}{key}"
            node = schema.get("properties", {}).get(key, {})
            if isinstance(value, dict) and "properties" in node:
                paths += Documentation.value_paths(value, node, f"{path}.")
            else:
                paths.append(path)
        return paths

    def test_readme_documents_every_value(self):
        with open(CHART / "values.yaml", encoding="utf-8") as f:
            values = yaml.safe_load(f)
        readme = (CHART / "README.md").read_text(encoding="utf-8")
        table_keys = {
            line.split("|")[1].strip().strip("`")
            for line in readme.splitlines()
            if line.startswith("| `")
        }
        paths = self.value_paths(values, chart().schema)
        self.assertGreater(len(paths), 90)
        self.assertEqual([p for p in paths if p not in table_keys], [])
        self.assertEqual(sorted(table_keys - set(paths)), [])

    def test_schema_refuses_unknown_keys_in_every_object_it_defines(self):
        def walk(node: dict, path: str):
            if "properties" in node:
                with self.subTest(object=path or "(top level)"):
                    self.assertIs(node.get("additionalProperties"), False)
                for key, child in node["properties"].items():
                    walk(child, f"{path}.{key}" if path else key)

        schema = chart().schema
        self.assertEqual(schema["$schema"], "http://json-schema.org/draft-07/schema#")
        walk(schema, "")


class Checksums(unittest.TestCase):
    @staticmethod
    def annotations(values: dict) -> dict:
        r = Rendered(values, "1.37.0")
        return r.deployment["spec"]["template"]["metadata"]["annotations"]

    def test_config_checksum_follows_the_config(self):
        base = value_set("postgres")
        a = self.annotations(base)
        self.assertEqual(a, self.annotations(copy.deepcopy(base)))
        b = self.annotations(merged(base, {"log": {"level": "debug"}}))
        self.assertNotEqual(a["checksum/config"], b["checksum/config"])
        self.assertEqual(a["checksum/secret"], b["checksum/secret"])

    def test_secret_checksum_follows_the_secret(self):
        base = value_set("postgres")
        a = self.annotations(base)
        b = self.annotations(merged(base, {"database": {"url": "postgres://tokend@other:5432/tokend"}}))
        self.assertNotEqual(a["checksum/secret"], b["checksum/secret"])
        self.assertEqual(a["checksum/config"], b["checksum/config"])


class Refusals(unittest.TestCase):
    def assert_render_refused(self, values: dict, fragment: str, error=helm_python.HelmError):
        with captured_stderr_fd():
            with self.assertRaises(error) as caught:
                render_raw(values, "1.37.0")
        self.assertIn(fragment, str(caught.exception))

    def test_sqlite_with_two_replicas(self):
        self.assert_render_refused(
            {"database": {"sqlite": True}, "replicaCount": 2}, SQLITE_REFUSAL, helm_python.HelmRenderError
        )

    def test_sqlite_with_autoscaling(self):
        self.assert_render_refused(
            {"replicaCount": 1, "database": {"sqlite": True}, "autoscaling": {"enabled": True}},
            SQLITE_REFUSAL,
            helm_python.HelmRenderError,
        )

    def test_no_database(self):
        self.assert_render_refused({}, NO_DATABASE_REFUSAL, helm_python.HelmRenderError)

    def test_sqlite_and_postgres_together(self):
        self.assert_render_refused(
            {"replicaCount": 1, "database": {"sqlite": True, "url": "postgres://x@db/t"}},
            "choose SQLite or PostgreSQL",
            helm_python.HelmRenderError,
        )

    def test_tls_without_secret(self):
        self.assert_render_refused(
            merged(value_set("postgres"), {"tls": {"enabled": True}}),
            "tls.enabled needs tls.existingSecret",
            helm_python.HelmRenderError,
        )

    def test_exit_work_after_the_drain_must_fit(self):
        # 5 + 20 + 5 = 30 fits; with traces on, 5 more s of span export does not.
        fits = merged(value_set("postgres"), {"drainTimeoutSeconds": 20})
        rendered_ok = Rendered(fits, "1.37.0")
        self.assertEqual(rendered_ok.toml()["drain_timeout_ms"], 20000)
        self.assert_render_refused(
            merged(fits, {"otel": {"endpoint": "http://collector:4317"}}),
            "exporting spans",
            helm_python.HelmRenderError,
        )

    def test_sqlite_on_a_shared_volume(self):
        self.assert_render_refused(
            merged(value_set("sqlite"), {"persistence": {"accessModes": ["ReadWriteMany"]}}),
            "ReadWriteOnce",
            helm_python.HelmRenderError,
        )

    def test_drain_longer_than_grace(self):
        self.assert_render_refused(
            merged(value_set("postgres"), {"drainTimeoutSeconds": 28}),
            "terminationGracePeriodSeconds",
            helm_python.HelmRenderError,
        )

    def test_schema_refusals(self):
        base = value_set("postgres")
        cases = {
            "typo replicaCont": ({"replicaCont": 3}, "replicaCont"),
            "sampleRatio 2": ({"otel": {"sampleRatio": 2}}, "/otel/sampleRatio"),
            "otel https": ({"otel": {"endpoint": "https://collector:4317"}}, "/otel/endpoint"),
            "pullPolicy Sometimes": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
            "mysql url": ({"database": {"url": "mysql://x"}}, "/database/url"),
            "replicaCount 0": ({"replicaCount": 0}, "/replicaCount"),
            "replicaCount 1.5": ({"replicaCount": 1.5}, "/replicaCount"),
            "port 70000": ({"metrics": {"port": 70000}}, "/metrics/port"),
            "clientAuth maybe": ({"tls": {"clientAuth": "maybe"}}, "/tls/clientAuth"),
            "nested typo": ({"database": {"maxConnection": 5}}, "maxConnection"),
            "log format xml": ({"log": {"format": "xml"}}, "/log/format"),
        }
        for label, (override, fragment) in cases.items():
            with self.subTest(case=label):
                self.assert_render_refused(merged(base, override), fragment, helm_python.HelmValuesError)


class TokendReadsTheRenderedSettings(unittest.TestCase):
    """The real binary (TOKEND_BIN, set by CI) loads every rendered tokend.toml: a key the
    chart writes but tokend does not know would stop every pod at start."""

    def test_each_value_set(self):
        binary = os.environ.get("TOKEND_BIN")
        if not binary:
            self.skipTest("TOKEND_BIN is not set")
        import subprocess

        for name in VALUE_SETS:
            with self.subTest(values=name), tempfile.TemporaryDirectory() as tmp:
                settings = pathlib.Path(tmp, "tokend.toml")
                settings.write_text(rendered(name).get("ConfigMap", FULLNAME)["data"]["tokend.toml"])
                env = {
                    k: v for k, v in os.environ.items() if not k.startswith("TOKEND_")
                }
                # `migrate` loads and checks the whole file, then touches only the database.
                env["TOKEND_DATABASE_URL"] = f"sqlite://{tmp}/check.db?mode=rwc"
                run = subprocess.run(
                    [binary, "--config", str(settings), "migrate"],
                    env=env,
                    capture_output=True,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    timeout=60,
                )
                self.assertEqual(run.returncode, 0, f"{name}: {run.stderr}")


def main() -> int:
    loader = unittest.TestLoader()
    suite = loader.loadTestsFromModule(sys.modules[__name__])
    runner = unittest.TextTestRunner(verbosity=2 if "-v" in sys.argv else 1)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    # A failed subTest is reported with its own object: count each test method once.
    failed_tests = {getattr(t, "test_case", t).id() for t, _ in result.failures + result.errors}
    passed = max(result.testsRun - len(failed_tests) - len(result.skipped), 0)
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    print(f"helm-chart: {passed} passed, {len(failed_tests)} failed{skipped}")
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
