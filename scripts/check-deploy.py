#!/usr/bin/env python3
"""Offline validation of everything the repository ships for Kubernetes.

- keda/ and infra/k8s/ are what scripts/render-manifests.py renders from the chart;
- the chart: `helm lint --strict` and values.schema.json for each environment
  (infra/envs/*/values.yaml), rendered with the Helm 4 library (helm-python-sdk) for
  each environment and for the chart's switches (prometheus trigger, no autoscaling);
- every manifest (rendered environments, keda/, infra/k8s/ and its kustomize build when
  kubectl is installed) against the Kubernetes schemas (kubernetes-validate, strict) or,
  for KEDA's kinds, the CRD schemas vendored in infra/schemas/crds/ (jsonschema);
- consistency: every stream and consumer a trigger names exists in streams/ (or is a
  lane consumer `streams apply` creates); every metric a prometheus trigger queries is
  one the code exports; every ScaledObject targets a Deployment shipped beside it, with
  a lag threshold no lower than what one pod holds in flight; every MLSCHED__* variable
  a container gets is a real config key with a valid value (`mlsched config` loads
  them); probes use /healthz or /readyz on the port metrics.listen binds; the pod's
  termination grace outlasts the drain grace; every command is a binary the image has;
  no Secret values; the NATS monitoring port open only to KEDA and Prometheus;
- the Dockerfile with hadolint, the YAML with yamllint.

Usage: scripts/check-deploy.py MLSCHED_BINARY   (run with the deploy virtualenv's python)
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml
from helm_python import Chart, lint

root = pathlib.Path(__file__).resolve().parent.parent
chart_dir = root / "infra/helm/mlsched"
mlsched = sys.argv[1]
bindir = pathlib.Path(sys.executable).parent
KUBE = "1.30"
problems = []
counts = {}


def problem(where, what):
    problems.append(f"{where}: {what}")


def load_all(text, where):
    try:
        return [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as e:
        problem(where, f"not YAML: {e}")
        return []


# 1. The shipped plain manifests are the chart's rendering.
r = subprocess.run([sys.executable, str(root / "scripts/render-manifests.py"), "--check"], capture_output=True, text=True)
if r.returncode != 0:
    problems.append(r.stderr.strip())

# 2. The chart, per environment and per switch.
chart = Chart.load(str(chart_dir))
sets = {}
variants = {f"env {p.parent.name}": yaml.safe_load(p.read_text()) for p in sorted((root / "infra/envs").glob("*/values.yaml"))}
if len(variants) < 3:
    problem("infra/envs", "expected dev, staging and prod values")
variants["chart defaults"] = {}
variants["autoscaling.trigger=prometheus"] = {"autoscaling": {"trigger": "prometheus"}}
variants["autoscaling and policies off"] = {
    "autoscaling": {"enabled": False},
    "networkPolicy": {"workers": False, "natsMonitoring": {"enabled": False}},
}
for name, values in variants.items():
    try:
        chart.validate_schema(values)
    except Exception as e:  # noqa: BLE001 - the library raises its own error kinds
        problem(name, f"values.schema.json: {e}")
        continue
    result = lint(str(chart_dir), values, strict=True, kube_version=f"v{KUBE}.0")
    for m in result.get("errors", []) + [m for m in result.get("messages", []) if m.get("severity", 0) > 1]:
        problem(name, f"helm lint: {m}")
    rendered = chart.render(values, name="mlsched", namespace="mlsched", is_install=True)
    sets[name] = [d for path, text in sorted(rendered.items()) for d in load_all(text, f"{name} {path}")]

# 3. The plain manifests.
for d in ("keda", "keda/prometheus", "infra/k8s"):
    docs = []
    for p in sorted((root / d).glob("*.yaml")):
        if p.name != "kustomization.yaml":
            docs += load_all(p.read_text(), str(p.relative_to(root)))
    sets[d + "/"] = docs
kubectl = shutil.which("kubectl")
if kubectl:
    r = subprocess.run([kubectl, "kustomize", str(root / "infra/k8s")], capture_output=True, text=True)
    if r.returncode != 0:
        problem("kubectl kustomize infra/k8s", r.stderr.strip())
    else:
        sets["kubectl kustomize infra/k8s"] = load_all(r.stdout, "kustomize build")

# 4. Schemas.
crd_dir = root / "infra/schemas/crds"


def validate(doc, where):
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    group, _, version = api.rpartition("/")
    if group and "." in group and not group.endswith(".k8s.io"):
        path = crd_dir / group / f"{kind.lower()}_{version}.json"
        if not path.exists():
            problem(where, f"no vendored schema for {api} {kind} ({path.relative_to(root)})")
            return
        errors = sorted(jsonschema.Draft7Validator(json.loads(path.read_text())).iter_errors(doc), key=str)
        for e in errors[:5]:
            problem(where, f"{kind}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        return
    try:
        kubernetes_validate.validate(doc, KUBE, strict=True)
    except kubernetes_validate.ValidationError as e:
        problem(where, f"{kind}: {'/'.join(map(str, e.path))}: {e.message}")
    except Exception as e:  # noqa: BLE001 - schema lookups raise several kinds
        problem(where, f"{kind}: {e}")


for name, docs in sets.items():
    for doc in docs:
        validate(doc, f"{name} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}")
    counts[name] = len(docs)

# 5. Consistency.
streams = {p.stem for p in (root / "streams").glob("*.json")}
consumers = {(p.parent.name, p.stem) for p in (root / "streams").glob("*/*.json")}
metrics_rs = (root / "src/telemetry/metrics.rs").read_text()
exported = set(re.findall(r'pub const [A-Z_]+: &str = "(mlsched_[a-z_]+)";', metrics_rs))
server_rs = (root / "src/telemetry/server.rs").read_text()
served = set(re.findall(r'\.route\("(/[a-z]+)"', server_rs))
dockerfile = (root / "Dockerfile").read_text()
binaries = {"mlsched", "mlsched-executor", "mlsched-predictor"}
for b in binaries:
    if f"target/release/{b}" not in dockerfile:
        problem("Dockerfile", f"does not copy {b} into the image")
config_checked = {}


def env_of(container, configmaps):
    env = {}
    for src in container.get("envFrom", []):
        cm = configmaps.get(src.get("configMapRef", {}).get("name"))
        if cm is None:
            problem(container["name"], f"envFrom names a ConfigMap not shipped: {src}")
        else:
            env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
    for e in container.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def check_config_keys(where, env):
    mlsched_env = {k: v for k, v in env.items() if k.startswith("MLSCHED__")}
    key = json.dumps(mlsched_env, sort_keys=True)
    if key not in config_checked:
        r = subprocess.run(
            [mlsched, "config"],
            env={"PATH": os.environ.get("PATH", ""), **mlsched_env},
            capture_output=True,
            text=True,
            cwd="/",
        )
        config_checked[key] = r.stderr.strip() if r.returncode else None
    if config_checked[key]:
        problem(where, f"environment is not a valid configuration: {config_checked[key]}")


for name, docs in sets.items():
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    configmaps = by_kind.get("ConfigMap", {})
    deployments = by_kind.get("Deployment", {})
    for s in by_kind.get("Secret", {}).values():
        if s.get("data") or s.get("stringData"):
            problem(name, f"Secret {s['metadata']['name']} carries values: the chart may only name Secrets")
    workloads = list(deployments.values()) + list(by_kind.get("Job", {}).values())
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        wname = f"{name} {w['kind']}/{w['metadata']['name']}"
        for c in spec.get("initContainers", []) + spec["containers"]:
            cname = f"{wname} container {c['name']}"
            command = c.get("command", [])
            if not command or pathlib.PurePath(command[0]).name not in binaries:
                problem(cname, f"command {command} is not one of the image's binaries {sorted(binaries)}")
            env = env_of(c, configmaps)
            for k, v in env.items():
                if k.startswith("MLSCHED") and not k.startswith("MLSCHED__"):
                    problem(cname, f"{k} is no config variable (MLSCHED__SECTION__KEY)")
            check_config_keys(cname, env)
            listen = env.get("MLSCHED__METRICS__LISTEN", "0.0.0.0:9464")
            port = int(listen.rsplit(":", 1)[1])
            named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = c.get(probe, {}).get("httpGet")
                if w["kind"] == "Deployment" and not get:
                    problem(cname, f"{probe} missing")
                    continue
                if not get:
                    continue
                p = named.get(get["port"], get["port"])
                if p != port:
                    problem(cname, f"{probe} uses port {get['port']} ({p}), the process listens on {port}")
                if get["path"] not in served:
                    problem(cname, f"{probe} asks for {get['path']}, the process serves {sorted(served)}")
            grace = int(env.get("MLSCHED__SHUTDOWN__GRACE_S") or 25)
            if w["kind"] == "Deployment" and spec.get("terminationGracePeriodSeconds", 30) <= grace:
                problem(cname, f"terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds', 30)} <= drain grace {grace}")
    for so in by_kind.get("ScaledObject", {}).values():
        sname = f"{name} ScaledObject/{so['metadata']['name']}"
        target = so["spec"]["scaleTargetRef"]["name"]
        dep = deployments.get(target)
        if deployments and dep is None:
            problem(sname, f"targets Deployment {target}, which is not shipped beside it")
        c_env = {}
        if dep:
            c_env = env_of(dep["spec"]["template"]["spec"]["containers"][0], configmaps)
        for t in so["spec"]["triggers"]:
            m = t["metadata"]
            if t["type"] == "nats-jetstream":
                stream, consumer = m["stream"], m["consumer"]
                lane_consumer = stream == "JOBS_RUN" and consumer.startswith("executor-")
                if stream not in streams:
                    problem(sname, f"stream {stream} is not in streams/")
                elif (stream, consumer) not in consumers and not lane_consumer:
                    problem(sname, f"consumer {stream}/{consumer} is not in streams/")
                if "natsServerMonitoringEndpoint" in m or "account" in m:
                    problem(sname, "endpoint and account belong in the TriggerAuthentication's Secret")
                threshold = int(m["lagThreshold"])
                if dep and "MLSCHED__EXECUTOR__CONCURRENCY" in c_env:
                    held = int(c_env["MLSCHED__EXECUTOR__CONCURRENCY"])
                    if threshold < held:
                        problem(sname, f"lagThreshold {threshold} < executor concurrency {held}: a busy pod could never scale in")
                    lane = consumer.removeprefix("executor-")
                    if c_env.get("MLSCHED__EXECUTOR__LANES") != lane:
                        problem(sname, f"scales on {consumer} but the Deployment runs lanes {c_env.get('MLSCHED__EXECUTOR__LANES')}")
                if dep and "MLSCHED__PREDICTOR__BATCH_SIZE" in c_env:
                    held = 5 * int(c_env["MLSCHED__PREDICTOR__BATCH_SIZE"])
                    if threshold < held:
                        problem(sname, f"lagThreshold {threshold} < the {held} submissions a predictor holds in flight")
            elif t["type"] == "prometheus":
                for metric in re.findall(r"mlsched_[a-z_]+", m["query"]):
                    if metric not in exported:
                        problem(sname, f"query uses {metric}, which the code does not export")
            else:
                problem(sname, f"unexpected trigger {t['type']}")
    for np in by_kind.get("NetworkPolicy", {}).values():
        if not np["metadata"]["name"].endswith("-nats-monitoring"):
            continue
        npname = f"{name} NetworkPolicy/{np['metadata']['name']}"
        guarded = [r for r in np["spec"].get("ingress", []) if r.get("from")]
        open_rules = [r for r in np["spec"].get("ingress", []) if not r.get("from")]
        if len(guarded) != 1 or len(guarded[0].get("ports", [])) != 1:
            problem(npname, "expected one rule, for the monitoring port alone, with sources")
            continue
        port = guarded[0]["ports"][0]["port"]
        for peer in guarded[0]["from"]:
            if not peer.get("namespaceSelector", {}).get("matchLabels") or not peer.get("podSelector", {}).get("matchLabels"):
                problem(npname, f"port {port} must be open only to selected pods of selected namespaces: {peer}")
        for rule in open_rules:
            for p in rule.get("ports", []):
                if p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"]):
                    problem(npname, f"a rule without sources opens the monitoring port {port}: {p}")
        tcp = sorted((p["port"], p.get("endPort", p["port"])) for r in open_rules for p in r.get("ports", []) if p.get("protocol", "TCP") == "TCP")
        if tcp != [(1, port - 1), (port + 1, 65535)]:
            problem(npname, f"every TCP port but {port} should stay open to all (client, cluster, leafnode ports): {tcp}")

# 6. Dockerfile and YAML style.
r = subprocess.run([str(bindir / "hadolint"), "--failure-threshold", "warning", str(root / "Dockerfile")], capture_output=True, text=True)
if r.returncode != 0:
    problem("hadolint", (r.stdout + r.stderr).strip())
yamllint_config = "{extends: default, rules: {line-length: {max: 120}, indentation: {spaces: consistent, indent-sequences: whatever}, document-start: disable, comments: {min-spaces-from-content: 1}, braces: {max-spaces-inside: 1}}}"
targets = [root / "keda", root / "infra/k8s", root / "infra/envs", chart_dir / "values.yaml", chart_dir / "Chart.yaml"]
r = subprocess.run([str(bindir / "yamllint"), "-s", "-d", yamllint_config] + [str(t) for t in targets], capture_output=True, text=True)
if r.returncode != 0:
    problem("yamllint", (r.stdout + r.stderr).strip())

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
summary = ", ".join(f"{name}: {n}" for name, n in counts.items())
print(f"check-deploy: every manifest valid (Kubernetes {KUBE}, KEDA CRDs) and consistent; objects per set: {summary}")
print(f"check-deploy: {len(config_checked)} distinct container environments load as configuration; Dockerfile passes hadolint")
