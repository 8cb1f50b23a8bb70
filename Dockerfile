# syntax=docker/dockerfile:1
# The mlsched image: mlsched (CLI: migrate, streams apply, config, health, ...),
# mlsched-executor and mlsched-predictor, on a distroless base with no shell, running as
# the unprivileged user 65532. The Helm chart (infra/helm/mlsched) picks the binary per
# Deployment; the default command is an executor.
#
#   docker build -t mlsched:dev .
#   docker run --rm -e NATS_URL=... -e DATABASE_URL=... mlsched:dev
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p mlsched -p mlsched-executor -p mlsched-predictor \
    && mkdir -p /out \
    && cp target/release/mlsched target/release/mlsched-executor target/release/mlsched-predictor /out/

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mlsched" \
      org.opencontainers.image.description="Event-driven ML job scheduler on NATS JetStream: executor, predictor and CLI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/mlsched/mlsched"
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
WORKDIR /home/nonroot
# /metrics, /healthz and /readyz of every worker (metrics.listen).
EXPOSE 9464
# Kubernetes uses the chart's probes; this is for docker and compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/mlsched", "health"]
CMD ["/usr/local/bin/mlsched-executor"]
