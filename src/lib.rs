//! mlsched: an event-driven ML task scheduler on NATS JetStream.
//!
//! Jobs are published to `jobs.submit.<kind>`; the predictor (workers/predictor)
//! validates them, records them in Postgres and routes them to `jobs.run.<lane>.<kind>`;
//! executors (workers/executor) run them and record the outcome. DESIGN.md is the
//! contract. This crate is the core both workers and the `mlsched` CLI build on:
//!
//! - [`job`]: ids, kinds, lanes, statuses, subjects and the envelope (wire format).
//! - [`config`]: layered, validated [`config::Settings`].
//! - [`streams`]: the JetStream definitions in streams/ and `streams apply`.
//! - [`client`]: connecting to NATS and publishing jobs.
//! - [`store`]: Postgres: migrations, the group-committing writer, read queries.
//! - [`predict`]: run-time features and models (smartcore).
//! - [`runtime`]: what workers share: shutdown, backoff, fetching, dead-lettering.
//! - [`slo`]: the backlog SLIs sampled from JetStream.
//! - [`autoscale`]: the lag KEDA reads and the replicas it asks for (keda/).
//! - [`stack`]: private `nats-server` and Postgres processes for `mlsched dev` and tests.
//! - [`telemetry`]: logs, Prometheus metrics and the `/metrics` `/healthz` `/readyz` endpoint.
//! - [`cli`]: the `mlsched` command line.

pub mod autoscale;
pub mod cli;
pub mod client;
pub mod config;
pub mod job;
pub mod predict;
pub mod runtime;
pub mod slo;
pub mod stack;
pub mod store;
pub mod streams;
pub mod telemetry;
