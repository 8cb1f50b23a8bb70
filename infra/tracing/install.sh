#!/usr/bin/env bash
# Installs the tracing backend for mlsched into the current kubectl context:
# cert-manager (the OpenTelemetry operator's webhooks need it), the Jaeger and
# OpenTelemetry operators, then infra/tracing/{jaeger,otel-collector}.yaml in the
# `observability` namespace. Versions match the CRD schemas the manifests are
# validated against (infra/schemas/crds). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

CERT_MANAGER_VERSION="${CERT_MANAGER_VERSION:-v1.16.2}"
JAEGER_OPERATOR_VERSION="${JAEGER_OPERATOR_VERSION:-v1.65.0}"
OTEL_OPERATOR_VERSION="${OTEL_OPERATOR_VERSION:-v0.158.0}"

kubectl apply -f "https://github.com/cert-manager/cert-manager/releases/download/${CERT_MANAGER_VERSION}/cert-manager.yaml"
kubectl -n cert-manager rollout status deploy/cert-manager-webhook --timeout=180s

kubectl create namespace observability --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -n observability -f "https://github.com/jaegertracing/jaeger-operator/releases/download/${JAEGER_OPERATOR_VERSION}/jaeger-operator.yaml"
kubectl apply -f "https://github.com/open-telemetry/opentelemetry-operator/releases/download/${OTEL_OPERATOR_VERSION}/opentelemetry-operator.yaml"
kubectl -n observability rollout status deploy/jaeger-operator --timeout=180s
kubectl -n opentelemetry-operator-system rollout status deploy/opentelemetry-operator-controller-manager --timeout=180s

kubectl apply -f jaeger.yaml -f otel-collector.yaml
echo "Traces: set OTEL_EXPORTER_OTLP_ENDPOINT=http://mlsched-collector.observability.svc:4317 on the workers;"
echo "UI: kubectl -n observability port-forward svc/mlsched-jaeger-query 16686"
