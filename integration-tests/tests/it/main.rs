//! Integration tests: mlsched against real nats-server and PostgreSQL processes.
//! One test binary; each test builds its own `TestEnv`.

mod cli;
mod faults;
mod harness;
mod http;
mod model;
mod observability;
mod pipeline;
mod scaling;
mod tracing_export;
