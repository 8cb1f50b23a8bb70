#!/usr/bin/env python3
"""Offline checks of the observability layer that promtool and amtool cannot do alone.

- prometheus.yml with its Kubernetes service discovery swapped for a static target
  (Debian's promtool is built without Kubernetes SD), written next to a copy of the
  rules so `promtool check config` validates everything else;
- every alert has severity, summary, description and a runbook_url whose anchor is a
  section of docs/runbooks.md;
- every metric the rules use is one the code exports (src/telemetry/metrics.rs);
- the Grafana dashboards: uid, title, schemaVersion, unique panel ids, a gridPos and
  targets on every panel, and every panel's PromQL written to OUT_DIR/dashboard-rules.yml
  (with Grafana's $__ variables replaced) for `promtool check rules` to parse, using
  only metrics the code exports or the rules record;
- the tracing manifests (infra/tracing/*.yaml) against the vendored CRD schemas in
  infra/schemas/crds/.

Usage: scripts/check-observability.py OUT_DIR   (prints the config path to check)
"""
import pathlib
import re
import shutil
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
out = pathlib.Path(sys.argv[1])
problems = []

# 1. prometheus.yml for promtool.
prom = yaml.safe_load((root / "infra/prometheus/prometheus.yml").read_text())
for job in prom["scrape_configs"]:
    for sd in job.pop("kubernetes_sd_configs", []):
        if sd.get("role") not in {"node", "pod", "service", "endpoints", "endpointslice", "ingress"}:
            problems.append(f"{job['job_name']}: kubernetes_sd_configs role {sd.get('role')!r} is not a valid role")
        job.setdefault("static_configs", []).append({"targets": ["pod.example:9464"]})
shutil.copytree(root / "infra/prometheus/alerts", out / "alerts", dirs_exist_ok=True)
(out / "prometheus.yml").write_text(yaml.safe_dump(prom))

# 2. alert annotations and runbook anchors.
def anchor(heading):
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")

runbook = (root / "docs/runbooks.md").read_text()
anchors = {anchor(line[3:]) for line in runbook.splitlines() if line.startswith("## ")}
rules = yaml.safe_load((root / "infra/prometheus/alerts/slo-alerts.yml").read_text())
alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
for a in alerts:
    name = a["alert"]
    if a.get("labels", {}).get("severity") not in {"critical", "warning", "info"}:
        problems.append(f"{name}: severity label missing or unknown")
    for key in ("summary", "description", "runbook_url"):
        if not a.get("annotations", {}).get(key):
            problems.append(f"{name}: annotation {key} missing")
    url = a.get("annotations", {}).get("runbook_url", "")
    if "#" not in url or url.split("#", 1)[1] not in anchors:
        problems.append(f"{name}: runbook_url {url!r} names no section of docs/runbooks.md")

# 3. metrics used by the rules exist in the code.
code = (root / "src/telemetry/metrics.rs").read_text()
exported = set(re.findall(r'pub const [A-Z_]+: &str = "(mlsched_[a-z_]+)";', code))
used = set()
for g in rules["groups"]:
    for r in g["rules"]:
        used |= set(re.findall(r"(?<![:\w])(mlsched_[a-z_]+)", r["expr"]))
for m in sorted(used):
    base = re.sub(r"_(bucket|count|sum)$", "", m)
    if m not in exported and base not in exported:
        problems.append(f"rules use {m}, which the code does not export")

# 4. Grafana dashboards.
import json
recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
dash_rules = []
for path in sorted((root / "infra/grafana/dashboards").glob("*.json")):
    d = json.loads(path.read_text())
    for key in ("uid", "title", "schemaVersion", "panels"):
        if not d.get(key):
            problems.append(f"{path.name}: {key} missing")
    ids = [p["id"] for p in d["panels"]]
    if len(ids) != len(set(ids)):
        problems.append(f"{path.name}: panel ids are not unique")
    for p in d["panels"]:
        where = f"{path.name} panel {p.get('id')} {p.get('title')!r}"
        if not all(k in p.get("gridPos", {}) for k in ("x", "y", "w", "h")):
            problems.append(f"{where}: gridPos incomplete")
        if p["type"] == "row":
            continue
        if not p.get("targets"):
            problems.append(f"{where}: no targets")
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for var, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
                expr = expr.replace(var, value)
            if "$" in expr.replace('"$1"', ""):
                problems.append(f"{where}: unknown variable in {expr!r}")
            dash_rules.append({"record": f"dashboard:check:{len(dash_rules)}", "expr": expr})
            for m in set(re.findall(r"(?<![:\w])(mlsched_[a-z_]+)", expr)):
                base = re.sub(r"_(bucket|count|sum)$", "", m)
                if m not in exported and base not in exported:
                    problems.append(f"{where}: uses {m}, which the code does not export")
            for m in set(re.findall(r"(mlsched:[a-z0-9_:]+)", expr)):
                if m not in recorded:
                    problems.append(f"{where}: uses {m}, which no rule records")
(out / "dashboard-rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": dash_rules}]}))

# 5. Custom resources against their CRD schemas.
import jsonschema

for path in sorted((root / "infra/tracing").glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        group, _, version = doc["apiVersion"].rpartition("/")
        schema_path = root / "infra/schemas/crds" / group / f"{doc['kind'].lower()}_{version}.json"
        if not schema_path.is_file():
            problems.append(f"{path.name}: no schema for {doc['apiVersion']} {doc['kind']}")
            continue
        schema = json.loads(schema_path.read_text())
        for err in jsonschema.Draft7Validator(schema).iter_errors(doc):
            problems.append(f"{path.name}: {'/'.join(map(str, err.path))}: {err.message}")

for p in problems:
    print("check-observability:", p, file=sys.stderr)
if problems:
    sys.exit(1)
print(out / "prometheus.yml")
