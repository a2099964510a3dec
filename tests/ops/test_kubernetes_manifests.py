"""config/kubernetes/: the manifests, proven offline.

- Every Kubernetes object is validated against the Kubernetes OpenAPI schemas
  of one version (``KUBERNETES_VERSION``) with ``kubernetes_validate`` in strict
  mode, so a misspelt or misplaced field fails like an unknown config key does.
  The version is the oldest the manifests are meant for: ``preStop.sleep``
  needs 1.30, and every kubernetes-validate the dev extras allow (>=1.30)
  carries its schemas. Without kubernetes_validate the tests FAIL, never skip.
- cert-manager's Issuer and Certificate are CRDs, absent from those schemas:
  they are checked here by structure (required fields, known field names,
  enums, durations) and as a chain (selfSigned -> CA -> CA Issuer -> serving
  certificate).
- The ConfigMap's passguard.yaml goes through passguard's own loader
  (``config.build``), and every file it names is checked to be mounted where
  it says, from the Secret key docs/kubernetes.md tells the operator to create.
- The objects are cross-checked: Service -> pods -> container port, webhook ->
  Service -> certificate names, inject-ca-from -> Certificate, PDB -> pods,
  and the webhook rules against Kuma's CRDs (the project's own hand-written
  ones in tests/data/kuma/crds; Kuma's own as a cross-check).
- The kustomization lists every file and transforms nothing, so the files are
  exactly what ``kubectl apply -k`` applies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from passguard import __version__, config
from passguard.loader import load_documents
from tests.kuma_fixtures import cross_check, kuma, own
from tests.ops.promql import REPO

KUBE_DIR = REPO / "config" / "kubernetes"
KUSTOMIZATION = KUBE_DIR / "kustomization.yaml"
DOCS = REPO / "docs" / "kubernetes.md"
KUBERNETES_VERSION = "1.30"

NAMESPACE = "passguard"
APP_LABELS = {"app.kubernetes.io/name": "passguard"}
IMAGE_PLACEHOLDER = f"localhost/passguard:{__version__}"
CONFIG_PATH = "/etc/passguard/passguard.yaml"
STATE_DIR = "/var/lib/passguard"
CONTAINER_PORT = 9443
CLUSTER_SCOPED = {"Namespace", "ValidatingWebhookConfiguration"}
CERT_MANAGER = "cert-manager.io/v1"
WEBHOOK_ANNOTATION = "cert-manager.io/inject-ca-from"
SERVING_DNS_NAMES = ["passguard.passguard.svc", "passguard.passguard.svc.cluster.local"]

#: The keys of the Secrets the pod reads, as they are created: passguard-tls by
#: cert-manager, the other two by the operator following docs/kubernetes.md
#: (test_docs_create_the_secret_keys_the_pod_reads holds the docs to it).
SECRET_KEYS = {
    "passguard-tls": {"tls.crt", "tls.key", "ca.crt"},
    "passguard-kuma": {"token", "ca.crt"},
    "passguard-tokens": {"tokens.yaml"},
}

# cert-manager.io/v1 field names (cert-manager 1.x API reference): a field not
# listed is a typo, as with strict schema validation.
CERTIFICATE_SPEC_FIELDS = {
    "subject", "literalSubject", "commonName", "duration", "renewBefore",
    "renewBeforePercentage", "dnsNames", "ipAddresses", "uris", "otherNames",
    "emailAddresses", "secretName", "secretTemplate", "keystores", "issuerRef", "isCA",
    "usages", "privateKey", "signatureAlgorithm", "encodeUsagesInRequest",
    "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints",
}
PRIVATE_KEY_FIELDS = {"rotationPolicy", "encoding", "algorithm", "size"}
ISSUER_REF_FIELDS = {"name", "kind", "group"}
ISSUER_TYPES = {"acme", "ca", "vault", "selfSigned", "venafi"}
CA_ISSUER_FIELDS = {"secretName", "crlDistributionPoints", "ocspServers",
                    "issuingCertificateURLs"}
SELF_SIGNED_FIELDS = {"crlDistributionPoints"}
KEY_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment",
    "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
    "decipher only", "any", "server auth", "client auth", "code signing", "email protection",
    "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping",
    "ocsp signing", "microsoft sgc", "netscape sgc",
}
KEY_SIZES: dict[str, set[int | None]] = {
    "RSA": {2048, 3072, 4096, 8192}, "ECDSA": {256, 384, 521}, "Ed25519": {None}}
# Go's time.ParseDuration, as cert-manager parses durations (e.g. 2160h, 720h30m).
_GO_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:h|m|s|ms|us|µs|ns))+$")


# -- loading ----------------------------------------------------------------------------


def kubernetes_validate() -> Any:
    """The kubernetes_validate module; the test FAILS (never skips) without it."""
    try:
        import kubernetes_validate as kv
    except ImportError:
        pytest.fail("kubernetes_validate is not installed: the manifests are validated against "
                    "the Kubernetes schemas with it (pip install -e '.[dev]')")
    return kv


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; kubectl refuses the file. So do we."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key(s) {sorted(map(str, dup))}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE_DIR.glob("*.yaml") if p != KUSTOMIZATION)


def load_objects() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in manifest_files():
        for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
            out.append((path, doc))
    return out


OBJECTS = load_objects()


def ident(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    ns = f"{meta['namespace']}/" if "namespace" in meta else ""
    return f"{obj.get('kind')}/{ns}{meta.get('name')}"


def objects(kind: str, api_version: str | None = None) -> list[dict[str, Any]]:
    return [o for _, o in OBJECTS
            if o["kind"] == kind and (api_version is None or o["apiVersion"] == api_version)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects(kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return one("Deployment", "passguard")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec()["containers"]
    assert len(containers) == 1, "one container: passguard"
    return containers[0]


def passguard_yaml() -> Any:
    """The ConfigMap's passguard.yaml, parsed by passguard's own YAML loader (as `run -c`)."""
    text: str = one("ConfigMap", "passguard")["data"]["passguard.yaml"]
    docs = load_documents(text.encode(), "application/yaml")
    assert len(docs) == 1, "passguard.yaml: one YAML document"
    return docs[0]


def kuma_source(raw: Any) -> dict[str, Any]:
    kuma = [s for s in raw["sources"] if s.get("kind") == "kuma"]
    assert len(kuma) == 1, "passguard.yaml: expected one `kind: kuma` source"
    source: dict[str, Any] = kuma[0]
    return source


def mounted_files() -> dict[str, tuple[str, str, str]]:
    """Every file the container sees from a configMap/secret: path -> (kind, name, key)."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    files: dict[str, tuple[str, str, str]] = {}
    for m in container()["volumeMounts"]:
        vol = volumes[m["name"]]
        base = m["mountPath"].rstrip("/")
        sources: list[tuple[str, dict[str, Any]]] = []
        if "projected" in vol:
            for src in vol["projected"]["sources"]:
                for kind in ("configMap", "secret"):
                    if kind in src:
                        sources.append((kind, src[kind]))
        for kind, key in (("configMap", "name"), ("secret", "secretName")):
            if kind in vol:
                sources.append((kind, {**vol[kind], "name": vol[kind][key]}))
        for kind, src in sources:
            assert "items" in src, f"volume {m['name']}: list the items, so keys cannot collide"
            for item in src["items"]:
                if "subPath" in m:
                    if item["path"] == m["subPath"]:
                        files[base] = (kind, src["name"], item["key"])
                else:
                    files[f"{base}/{item['path']}"] = (kind, src["name"], item["key"])
    return files


# -- the kustomization --------------------------------------------------------------------


def test_kustomization_lists_every_file_and_transforms_nothing() -> None:
    kz = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    assert kz["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kz["kind"] == "Kustomization"
    listed = kz["resources"]
    assert len(listed) == len(set(listed)), f"a file is listed twice: {listed}"
    assert set(listed) == {p.name for p in manifest_files()}, (
        "config/kubernetes/kustomization.yaml must list exactly the other *.yaml files: "
        f"listed {sorted(listed)}, present {[p.name for p in manifest_files()]}")
    # A namespace/labels/images/patches transformer would make the applied objects
    # differ from the files these tests check.
    assert set(kz) == {"apiVersion", "kind", "resources"}, f"unexpected keys: {sorted(kz)}"


def test_no_other_files_in_the_folder() -> None:
    others = [p.name for p in KUBE_DIR.iterdir() if p.suffix != ".yaml" and p != NETPOL_DIR]
    assert not others, f"config/kubernetes holds files kustomize would not apply: {others}"


# -- the optional NetworkPolicy (docs/security.md, "Admission callers") -------------------

NETPOL_DIR = KUBE_DIR / "networkpolicy"


def test_the_optional_network_policy_is_a_component_of_its_one_file() -> None:
    kz = yaml.safe_load((NETPOL_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kz == {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component",
                  "resources": ["networkpolicy.yaml"]}
    assert sorted(p.name for p in NETPOL_DIR.iterdir()) == ["kustomization.yaml",
                                                             "networkpolicy.yaml"]


def test_the_optional_network_policy_admits_the_webhook_port_of_passguards_pods() -> None:
    """Valid Kubernetes, in the namespace, selecting the Deployment's pods,
    opening only the container port the Service and the webhook use."""
    kv = kubernetes_validate()
    [policy] = [d for d in yaml.load_all((NETPOL_DIR / "networkpolicy.yaml").read_text(
        encoding="utf-8"), Loader=_UniqueKeyLoader) if d]
    try:
        kv.validate(policy, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as exc:
        pytest.fail(f"networkpolicy.yaml is not a valid NetworkPolicy: {exc}")
    assert policy["metadata"]["namespace"] == NAMESPACE
    spec = policy["spec"]
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    [rule] = spec["ingress"]
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert [(p["protocol"], ports.get(p["port"], p["port"])) for p in rule["ports"]] == [
        ("TCP", CONTAINER_PORT)]
    sources = {next(iter(f)) for f in rule["from"]}
    assert sources == {"ipBlock", "namespaceSelector"}  # the API server; pipelines, Prometheus


def test_objects_are_unique_and_in_the_passguard_namespace() -> None:
    seen: dict[str, str] = {}
    for path, obj in OBJECTS:
        key = f"{obj['apiVersion'].split('/')[0]}:{ident(obj)}"
        assert key not in seen, f"{key} is defined in {seen[key]} and {path.name}"
        seen[key] = path.name
        meta = obj["metadata"]
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{ident(obj)} is cluster-scoped"
        else:
            assert meta.get("namespace") == NAMESPACE, f"{ident(obj)}: namespace {NAMESPACE}"
        for k, v in APP_LABELS.items():
            assert meta.get("labels", {}).get(k) == v, f"{ident(obj)}: label {k}={v}"
    assert one("Namespace")["metadata"]["name"] == NAMESPACE


# -- Kubernetes schemas --------------------------------------------------------------------

KUBERNETES_OBJECTS = [(p, o) for p, o in OBJECTS if o["apiVersion"] != CERT_MANAGER]


def test_only_cert_manager_objects_escape_the_schemas() -> None:
    """Everything that is not validated against the Kubernetes schemas is checked below."""
    rest = {o["kind"] for p, o in OBJECTS if o["apiVersion"] == CERT_MANAGER}
    assert rest == {"Issuer", "Certificate"}
    core = {o["kind"] for _, o in KUBERNETES_OBJECTS}
    assert core == {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment",
                    "PodDisruptionBudget", "ValidatingWebhookConfiguration"}


@pytest.mark.parametrize(("path", "obj"), KUBERNETES_OBJECTS,
                         ids=[f"{p.name}:{ident(o)}" for p, o in KUBERNETES_OBJECTS])
def test_validates_against_kubernetes_schema(path: Path, obj: dict[str, Any]) -> None:
    kv = kubernetes_validate()
    try:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as exc:
        pytest.fail(f"{path.name}: {ident(obj)} is not a valid Kubernetes "
                    f"{KUBERNETES_VERSION} object: {exc}")


def test_strict_validation_catches_an_unknown_field() -> None:
    """The schemas in use do reject what strict is meant to reject."""
    kv = kubernetes_validate()
    obj = yaml.safe_load(yaml.safe_dump(deployment()))
    obj["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(obj, KUBERNETES_VERSION, strict=True)


# -- cert-manager (structure) ----------------------------------------------------------------


def _duration_hours(value: str) -> float:
    assert _GO_DURATION.match(value), f"{value!r} is not a Go duration (e.g. 2160h)"
    units = {"h": 1.0, "m": 1 / 60, "s": 1 / 3600, "ms": 1 / 3.6e6, "us": 1 / 3.6e9,
             "µs": 1 / 3.6e9, "ns": 1 / 3.6e12}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)",
                                                            value))


@pytest.mark.parametrize("obj", objects("Issuer", CERT_MANAGER),
                         ids=[ident(o) for o in objects("Issuer", CERT_MANAGER)])
def test_cert_manager_issuer_structure(obj: dict[str, Any]) -> None:
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    assert set(spec) <= ISSUER_TYPES, f"{ident(obj)}: unknown issuer fields {set(spec)}"
    assert len(spec) == 1, f"{ident(obj)}: exactly one issuer type"
    if "ca" in spec:
        assert set(spec["ca"]) <= CA_ISSUER_FIELDS
        assert isinstance(spec["ca"]["secretName"], str) and spec["ca"]["secretName"]
    if "selfSigned" in spec:
        assert set(spec["selfSigned"]) <= SELF_SIGNED_FIELDS


@pytest.mark.parametrize("obj", objects("Certificate", CERT_MANAGER),
                         ids=[ident(o) for o in objects("Certificate", CERT_MANAGER)])
def test_cert_manager_certificate_structure(obj: dict[str, Any]) -> None:
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    assert set(spec) <= CERTIFICATE_SPEC_FIELDS, \
        f"{ident(obj)}: unknown fields {set(spec) - CERTIFICATE_SPEC_FIELDS}"
    # Required by the CRD: secretName and issuerRef.name.
    assert isinstance(spec.get("secretName"), str) and spec["secretName"]
    ref = spec["issuerRef"]
    assert set(ref) <= ISSUER_REF_FIELDS and isinstance(ref.get("name"), str)
    assert ref.get("group", "cert-manager.io") == "cert-manager.io"
    assert ref.get("kind", "Issuer") in {"Issuer", "ClusterIssuer"}
    # A certificate names something.
    assert spec.get("commonName") or spec.get("dnsNames"), f"{ident(obj)}: no name"
    for name in spec.get("dnsNames", []):
        assert re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", name), name
    if "isCA" in spec:
        assert isinstance(spec["isCA"], bool)
    for usage in spec.get("usages", []):
        assert usage in KEY_USAGES, f"{ident(obj)}: unknown usage {usage!r}"
    key = spec.get("privateKey", {})
    assert set(key) <= PRIVATE_KEY_FIELDS
    if "algorithm" in key:
        assert key.get("size") in KEY_SIZES[key["algorithm"]]
    if "rotationPolicy" in key:
        assert key["rotationPolicy"] in {"Never", "Always"}
    if "duration" in spec or "renewBefore" in spec:
        duration = _duration_hours(spec.get("duration", "2160h"))
        renew = _duration_hours(spec.get("renewBefore", "720h"))
        assert 0 < renew < duration, f"{ident(obj)}: renewBefore must be shorter than duration"


def test_cert_manager_ca_bootstrap_chain() -> None:
    issuers = {o["metadata"]["name"]: o["spec"] for o in objects("Issuer", CERT_MANAGER)}
    certs = {o["metadata"]["name"]: o["spec"] for o in objects("Certificate", CERT_MANAGER)}
    assert not objects("ClusterIssuer"), "the issuers stay in the passguard namespace"

    serving = certs["passguard-tls"]
    assert serving["secretName"] == "passguard-tls"
    assert serving["dnsNames"] == SERVING_DNS_NAMES
    assert not serving.get("isCA", False)
    assert "server auth" in serving["usages"]

    ca_issuer = issuers[serving["issuerRef"]["name"]]
    assert serving["issuerRef"].get("kind", "Issuer") == "Issuer"
    ca_secret = ca_issuer["ca"]["secretName"]
    [ca_cert] = [c for c in certs.values() if c["secretName"] == ca_secret]
    assert ca_cert["isCA"] is True
    assert "selfSigned" in issuers[ca_cert["issuerRef"]["name"]]
    assert ca_cert["issuerRef"].get("kind", "Issuer") == "Issuer"
    # No serving certificate may outlive the CA that signed it: the CA is
    # renewed earlier than a whole serving certificate's life.
    assert _duration_hours(ca_cert["renewBefore"]) > _duration_hours(serving["duration"])


# -- the webhook -------------------------------------------------------------------------


def test_webhook_configuration() -> None:
    vwc = one("ValidatingWebhookConfiguration", "passguard")
    assert vwc["metadata"]["annotations"][WEBHOOK_ANNOTATION] == "passguard/passguard-tls"
    [hook] = vwc["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["matchPolicy"] == "Equivalent"
    assert hook["timeoutSeconds"] == 5
    assert hook["failurePolicy"] == "Fail"
    svc = hook["clientConfig"]["service"]
    assert svc == {"namespace": NAMESPACE, "name": "passguard", "port": 443,
                   "path": "/v1/admission"}
    assert "caBundle" not in hook["clientConfig"], "cert-manager's cainjector fills caBundle"
    assert "url" not in hook["clientConfig"]
    # Mesh is cluster-scoped: a namespaceSelector cannot exclude it, and for
    # MeshPassthrough it would only open a blind spot (comment in the file).
    assert "namespaceSelector" not in hook and "objectSelector" not in hook

    covered: dict[str, str] = {}
    for rule in hook["rules"]:
        assert rule["apiGroups"] == ["kuma.io"] and rule["apiVersions"] == ["v1alpha1"]
        assert rule["operations"] == ["CREATE", "UPDATE", "DELETE"]
        for resource in rule["resources"]:
            covered[resource] = rule["scope"]
    assert covered == {"meshes": "Cluster", "meshpassthroughs": "Namespaced"}


@pytest.mark.parametrize("crds", [
    pytest.param(lambda: [own("crds/meshes.crd.yaml"), own("crds/meshpassthroughs.crd.yaml")],
                 id="own"),
    pytest.param(lambda: [kuma("mesh/v2.14.3-kuma.io_meshes.crd.yaml"),
                          kuma("mesh/v2.14.3-kuma.io_meshpassthroughs.crd.yaml")],
                 id="kuma", marks=cross_check),
])
def test_webhook_rules_match_the_kuma_crds(crds: Callable[[], list[Path]]) -> None:
    """Group, version, plural and scope as Kuma's CRDs declare them."""
    [hook] = one("ValidatingWebhookConfiguration")["webhooks"]
    for path in crds():
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = crd["spec"]
        plural = spec["names"]["plural"]
        served = [v["name"] for v in spec["versions"] if v.get("served")]
        [rule] = [r for r in hook["rules"] if plural in r["resources"]]
        assert rule["apiGroups"] == [spec["group"]], path.name
        assert set(rule["apiVersions"]) <= set(served), path.name
        assert rule["scope"] == spec["scope"], path.name


def test_webhook_reaches_the_service_and_its_certificate_names() -> None:
    [hook] = one("ValidatingWebhookConfiguration")["webhooks"]
    ref = hook["clientConfig"]["service"]
    svc = one("Service", ref["name"])
    assert svc["metadata"]["namespace"] == ref["namespace"]
    [port] = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]]
    assert port["targetPort"] in ("https", CONTAINER_PORT)
    # The API server connects to <service>.<namespace>.svc: on the certificate.
    host = f"{ref['name']}.{ref['namespace']}.svc"
    ns, name = one("ValidatingWebhookConfiguration")["metadata"]["annotations"][
        WEBHOOK_ANNOTATION].split("/")
    cert = one("Certificate", name)
    assert cert["metadata"]["namespace"] == ns
    assert host in cert["spec"]["dnsNames"]
    # ...and the pod serves that certificate's Secret.
    files = mounted_files()
    raw = passguard_yaml()
    for key in ("cert_file", "key_file"):
        kind, secret, _ = files[raw["auth"]["tls"][key]]
        assert (kind, secret) == ("secret", cert["spec"]["secretName"])


# -- Service, PDB ----------------------------------------------------------------------------


def test_service_routes_443_to_the_container_port() -> None:
    svc = one("Service", "passguard")
    assert svc["spec"]["selector"] == APP_LABELS
    [port] = svc["spec"]["ports"]
    assert port["port"] == 443
    [cport] = [p for p in container()["ports"]
               if port["targetPort"] in (p.get("name"), p["containerPort"])]
    assert cport["containerPort"] == CONTAINER_PORT


def test_pod_disruption_budget() -> None:
    pdb = one("PodDisruptionBudget", "passguard")
    assert pdb["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["selector"] == {"matchLabels": APP_LABELS}
    assert APP_LABELS.items() <= deployment()["spec"]["template"]["metadata"]["labels"].items()
    # minAvailable 1 of 2 leaves room for one voluntary eviction at a time.
    assert deployment()["spec"]["replicas"] > pdb["spec"]["minAvailable"]


# -- the Deployment ---------------------------------------------------------------------------


def test_deployment_replicas_image_and_args() -> None:
    d = deployment()
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["selector"] == {"matchLabels": APP_LABELS}
    assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    c = container()
    assert c["image"] == IMAGE_PLACEHOLDER
    text = (KUBE_DIR / "deployment.yaml").read_text(encoding="utf-8")
    assert re.search(r"# REPLACE: placeholder image", text), "the placeholder must say so"
    # The name is the one the Containerfile documents, at the version of the code.
    containerfile = (REPO / "Containerfile").read_text(encoding="utf-8")
    assert "Image name: localhost/passguard:<version>" in containerfile
    assert "USER 65532:65532" in containerfile
    assert c["args"] == ["run", "-c", CONFIG_PATH]
    assert "command" not in c, "the image's entrypoint is the passguard console script"


def test_deployment_security_context() -> None:
    pod = pod_spec()
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container()["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # No Kubernetes API access is needed (the kuma source uses the Kuma API).
    assert pod["automountServiceAccountToken"] is False
    sa = one("ServiceAccount", pod["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    rbac = [o for _, o in OBJECTS if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert not rbac, "passguard needs no RBAC on the Kubernetes API"
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_deployment_probes() -> None:
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["scheme"] == "HTTPS", probe
        assert ports.get(get["port"], get["port"]) == CONTAINER_PORT, probe
        assert "httpHeaders" not in get, f"{probe}: the probe routes need no token"


def test_deployment_resources() -> None:
    res = container()["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), f"resources.{kind}: cpu and memory"


def test_deployment_spreads_replicas_over_nodes() -> None:
    pod = pod_spec()
    spread = [t for t in pod.get("topologySpreadConstraints", [])
              if t["topologyKey"] == "kubernetes.io/hostname"
              and t["whenUnsatisfiable"] == "DoNotSchedule"]
    anti = pod.get("affinity", {}).get("podAntiAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", [])
    anti = [a for a in anti if a["topologyKey"] == "kubernetes.io/hostname"]
    assert spread or anti, "the two replicas must land on different nodes"
    for t in spread:
        assert t["maxSkew"] == 1
        assert t["labelSelector"] == {"matchLabels": APP_LABELS}


def test_writable_paths_are_volumes() -> None:
    """With a read-only root filesystem, state.path and /tmp must be emptyDirs."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container()["volumeMounts"]}
    assert "emptyDir" in mounts[STATE_DIR]
    assert "emptyDir" in mounts["/tmp"]
    state = Path(passguard_yaml()["state"]["path"])
    assert state.parent == Path(STATE_DIR)
    for m in container()["volumeMounts"]:
        if "emptyDir" not in volumes[m["name"]]:
            assert m.get("readOnly") is True, f"{m['mountPath']} should be read-only"


# -- the ConfigMap's passguard.yaml --------------------------------------------------------


def test_configmap_passes_passguards_config_loader() -> None:
    """passguard.yaml as `passguard run -c /etc/passguard/passguard.yaml` would load it.

    Needs the `kind: kuma` source in passguard.config (DESIGN §3 keys).
    """
    raw = passguard_yaml()
    cfg = config.build(raw, Path(CONFIG_PATH).parent)
    assert str(cfg.listen) == f"0.0.0.0:{CONTAINER_PORT}"
    assert not cfg.listen.is_loopback
    # A non-loopback bind is allowed because auth is configured (tokens_file),
    # not because of auth.insecure.
    assert cfg.auth.configured and cfg.auth.tokens_file is not None
    assert cfg.auth.insecure is False
    assert cfg.auth.protect_metrics is False, "the kubelet's probes carry no token"
    assert cfg.auth.tls is not None
    assert cfg.auth.tls.client_ca_file is None, "the kubelet's HTTPS probes have no client cert"
    assert str(cfg.auth.tls.cert_file) == "/etc/passguard/tls/tls.crt"
    assert str(cfg.auth.tls.key_file) == "/etc/passguard/tls/tls.key"
    assert cfg.auth.tls.reload_interval == 10.0
    assert cfg.state_path.parent == Path(STATE_DIR)
    assert cfg.gate.mode == "enforce"
    assert len(cfg.sources) == 1


def test_configmap_kuma_source() -> None:
    src = kuma_source(passguard_yaml())
    assert src["url"] == "https://kuma-control-plane.kuma-system:5682"
    assert src["token_file"] == "/etc/passguard/kuma/token"
    assert src["ca_file"].startswith("/etc/passguard/kuma/")
    assert set(src) <= {"kind", "url", "token_file", "ca_file", "meshes", "discovery_interval",
                        "stats"}, "DESIGN §3 keys of a kuma source"


def test_every_file_the_config_names_is_mounted() -> None:
    raw = passguard_yaml()
    files = mounted_files()
    src = kuma_source(raw)
    wanted = {
        CONFIG_PATH: ("configMap", "passguard"),
        raw["auth"]["tokens_file"]: ("secret", "passguard-tokens"),
        raw["auth"]["tls"]["cert_file"]: ("secret", "passguard-tls"),
        raw["auth"]["tls"]["key_file"]: ("secret", "passguard-tls"),
        src["token_file"]: ("secret", "passguard-kuma"),
        src["ca_file"]: ("secret", "passguard-kuma"),
    }
    for path, (kind, name) in wanted.items():
        assert path in files, f"{path} is not mounted into the container"
        got_kind, got_name, key = files[path]
        assert (got_kind, got_name) == (kind, name), f"{path} comes from {got_kind} {got_name}"
        if kind == "secret":
            assert key in SECRET_KEYS[name], f"{path}: Secret {name} has no key {key!r}"
        else:
            assert key in one("ConfigMap", name)["data"], f"{path}: no key {key!r} in {name}"


def test_docs_create_the_secret_keys_the_pod_reads() -> None:
    """docs/kubernetes.md's commands create the Secrets with the keys mounted above."""
    text = DOCS.read_text(encoding="utf-8")
    used = {(name, key) for kind, name, key in mounted_files().values() if kind == "secret"}
    for name, key in sorted(used):
        if name == "passguard-tls":
            continue  # cert-manager's
        assert f"secret generic {name}" in text, f"docs: no command creating Secret {name}"
        assert re.search(rf"--from-(file|literal)={re.escape(key)}[=\s]", text), \
            f"docs: Secret {name} must be created with the key {key!r}"


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_configmap_comments_explain_auth() -> None:
    """The issue asks the ConfigMap to say how `auth` is satisfied."""
    text = one("ConfigMap", "passguard")["data"]["passguard.yaml"]
    assert "How `auth` is satisfied" in text
    assert "tokens_file" in text and "/v1/admission" in text
    # And nothing in the manifests disables authentication.
    assert not any(isinstance(n, dict) and n.get("insecure") is True
                   for n in _walk(passguard_yaml()))
