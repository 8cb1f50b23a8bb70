//! JetStream stream and consumer definitions (streams/*.json, embedded in the binary)
//! and `mlsched streams apply`, which creates or updates them idempotently.
//!
//! The files are in the NATS server API's own JSON format, so `nats stream add
//! --config streams/JOBS_RUN.json` accepts them too. `apply` talks to the JetStream API
//! with that JSON directly and compares only the keys a definition sets, so a second
//! run changes nothing and says so. A key the connected server does not know (a 2.10+
//! feature on a 2.9 server) is refused loudly instead of being silently dropped.

use std::fmt;
use std::path::Path;

use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::job::Lane;

mod apply;

pub use apply::{apply, Change};

/// A stream definition: its name and server-format config.
#[derive(Debug, Clone)]
pub struct StreamDef {
    /// Stream name.
    pub name: String,
    /// Server-format `StreamConfig` JSON.
    pub config: Map<String, Value>,
}

/// A durable consumer definition.
#[derive(Debug, Clone)]
pub struct ConsumerDef {
    /// The stream it reads.
    pub stream: String,
    /// Durable name.
    pub name: String,
    /// Server-format `ConsumerConfig` JSON.
    pub config: Map<String, Value>,
}

/// All definitions to apply.
#[derive(Debug, Clone)]
pub struct Definitions {
    /// Streams, in apply order.
    pub streams: Vec<StreamDef>,
    /// Consumers, applied after their streams.
    pub consumers: Vec<ConsumerDef>,
}

/// Why definitions could not be loaded or applied.
#[derive(Debug, Error)]
pub enum StreamsError {
    /// A definition file is unreadable or not a JSON object.
    #[error("{file}: {reason}")]
    Definition {
        /// The file (or override key).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The server is older than mlsched supports.
    #[error("nats-server {0} is too old: mlsched needs 2.9.0 or newer")]
    ServerTooOld(String),
    /// A definition uses a feature the connected server lacks.
    #[error("{what} sets `{key}`, which needs nats-server {needs} or newer; the server is {server}")]
    Unsupported {
        /// Stream or consumer name.
        what: String,
        /// The JSON key.
        key: String,
        /// Minimum server version.
        needs: &'static str,
        /// The connected server's version.
        server: String,
    },
    /// The JetStream API refused a request.
    #[error("{what}: JetStream API error {code}: {description}")]
    Api {
        /// Stream or consumer name.
        what: String,
        /// `err_code`.
        code: u64,
        /// Server's description.
        description: String,
    },
    /// The request did not complete.
    #[error("{what}: {source}")]
    Request {
        /// Stream or consumer name.
        what: String,
        /// Underlying error.
        source: async_nats::jetstream::context::RequestError,
    },
}

const BUILTIN_STREAMS: &[(&str, &str)] = &[
    ("JOBS_SUBMIT", include_str!("../../streams/JOBS_SUBMIT.json")),
    ("JOBS_RUN", include_str!("../../streams/JOBS_RUN.json")),
    ("JOBS_DEAD", include_str!("../../streams/JOBS_DEAD.json")),
    ("JOBS_EVENTS", include_str!("../../streams/JOBS_EVENTS.json")),
    ("JOBS_ADVISORIES", include_str!("../../streams/JOBS_ADVISORIES.json")),
];
const BUILTIN_CONSUMERS: &[(&str, &str, &str)] = &[
    (
        "JOBS_SUBMIT",
        "predictor",
        include_str!("../../streams/JOBS_SUBMIT/predictor.json"),
    ),
    (
        "JOBS_RUN",
        "executor-fast",
        include_str!("../../streams/JOBS_RUN/executor-fast.json"),
    ),
    (
        "JOBS_RUN",
        "executor-slow",
        include_str!("../../streams/JOBS_RUN/executor-slow.json"),
    ),
    (
        "JOBS_ADVISORIES",
        "dead-letterer",
        include_str!("../../streams/JOBS_ADVISORIES/dead-letterer.json"),
    ),
];

/// Keys that need a newer server than 2.9, and the version that added them.
const NEWER_KEYS: &[(&str, &str)] = &[
    ("compression", "2.10.0"),
    ("first_seq", "2.10.0"),
    ("subject_transform", "2.10.0"),
    ("metadata", "2.10.0"),
    ("consumer_limits", "2.10.0"),
    ("filter_subjects", "2.10.0"),
    ("allow_msg_ttl", "2.11.0"),
    ("subject_delete_marker_ttl", "2.11.0"),
    ("pause_until", "2.11.0"),
    ("priority_groups", "2.11.0"),
    ("priority_policy", "2.11.0"),
    ("allow_msg_counter", "2.12.0"),
    ("allow_atomic", "2.12.0"),
];

fn parse_object(file: &str, text: &str) -> Result<Map<String, Value>, StreamsError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(StreamsError::Definition {
            file: file.into(),
            reason: "not a JSON object".into(),
        }),
        Err(e) => Err(StreamsError::Definition {
            file: file.into(),
            reason: e.to_string(),
        }),
    }
}

/// A `major.minor.patch` server version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32, pub u32, pub u32);

impl ServerVersion {
    /// Parses `2.10.25` (a `-suffix` is ignored).
    pub fn parse(s: &str) -> Option<ServerVersion> {
        let core = s.trim_start_matches('v').split(['-', '+']).next()?;
        let mut it = core.split('.').map(|p| p.parse::<u32>().ok());
        Some(ServerVersion(
            it.next()??,
            it.next()??,
            it.next().flatten().unwrap_or(0),
        ))
    }

    /// The version of the server `client` is connected to.
    pub fn of(client: &async_nats::Client) -> Option<ServerVersion> {
        Self::parse(&client.server_info().version)
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Definitions {
    /// The definitions shipped in streams/, embedded at build time.
    pub fn builtin() -> Result<Definitions, StreamsError> {
        let mut streams = Vec::new();
        for (name, text) in BUILTIN_STREAMS {
            streams.push(StreamDef {
                name: name.to_string(),
                config: parse_object(&format!("streams/{name}.json"), text)?,
            });
        }
        let mut consumers = Vec::new();
        for (stream, name, text) in BUILTIN_CONSUMERS {
            consumers.push(ConsumerDef {
                stream: stream.to_string(),
                name: name.to_string(),
                config: parse_object(&format!("streams/{stream}/{name}.json"), text)?,
            });
        }
        Ok(Definitions { streams, consumers })
    }

    /// Definitions read from a directory laid out like streams/: `<STREAM>.json` and
    /// `<STREAM>/<consumer>.json`.
    pub fn from_dir(dir: &Path) -> Result<Definitions, StreamsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| StreamsError::Definition {
                file: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let mut streams = Vec::new();
        let mut consumers = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| StreamsError::Definition {
                file: dir.display().to_string(),
                reason: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
            let config = parse_object(&path.display().to_string(), &read(path)?)?;
            let name = config
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            streams.push(StreamDef { name, config });
        }
        for stream in &streams {
            let sub = dir.join(&stream.name);
            let Ok(rd) = std::fs::read_dir(&sub) else {
                continue;
            };
            let mut files: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            for path in files.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
                let config = parse_object(&path.display().to_string(), &read(path)?)?;
                let name = config
                    .get("durable_name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                consumers.push(ConsumerDef {
                    stream: stream.name.clone(),
                    name,
                    config,
                });
            }
        }
        Ok(Definitions { streams, consumers })
    }

    /// Adds an `executor-<lane>` consumer for each lane that has none, shaped like
    /// `executor-fast` with the lane's filter.
    pub fn with_lanes(mut self, lanes: &[Lane]) -> Self {
        let template = self.consumers.iter().find(|c| c.name == "executor-fast").cloned();
        for lane in lanes {
            let name = crate::job::executor_consumer(lane);
            if self.consumers.iter().any(|c| c.name == name) {
                continue;
            }
            if let Some(mut c) = template.clone() {
                c.config.insert("durable_name".into(), json!(name));
                c.config
                    .insert("description".into(), json!(format!("Executors of the {lane} lane")));
                c.config
                    .insert("filter_subject".into(), json!(format!("jobs.run.{lane}.*")));
                c.name = name;
                self.consumers.push(c);
            }
        }
        self
    }

    /// Applies per-environment overrides: a JSON object whose keys are stream or
    /// consumer names (`"JOBS_DEAD"`, `"JOBS_RUN/executor-fast"`) or `"*"` for every
    /// stream, and whose values are objects of config keys to set, e.g.
    /// `{"*": {"num_replicas": 3}, "JOBS_DEAD": {"max_age": 604800000000000}}`.
    pub fn with_overrides(mut self, overrides: &Value) -> Result<Self, StreamsError> {
        let Value::Object(map) = overrides else {
            return Err(StreamsError::Definition {
                file: "overrides".into(),
                reason: "must be a JSON object".into(),
            });
        };
        for (key, value) in map {
            let Value::Object(fields) = value else {
                return Err(StreamsError::Definition {
                    file: format!("overrides.{key}"),
                    reason: "must be an object of config keys".into(),
                });
            };
            let mut matched = false;
            for s in &mut self.streams {
                if key == "*" || *key == s.name {
                    matched = true;
                    s.config.extend(fields.clone());
                }
            }
            for c in &mut self.consumers {
                if *key == format!("{}/{}", c.stream, c.name) {
                    matched = true;
                    c.config.extend(fields.clone());
                }
            }
            if !matched {
                return Err(StreamsError::Definition {
                    file: format!("overrides.{key}"),
                    reason: "names no stream or consumer".into(),
                });
            }
        }
        Ok(self)
    }

    /// `--replicas N`: the replica count of every stream.
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        for s in &mut self.streams {
            s.config.insert("num_replicas".into(), json!(replicas));
        }
        self
    }

    fn check_supported(&self, server: ServerVersion) -> Result<(), StreamsError> {
        let objects = self.streams.iter().map(|s| (s.name.clone(), &s.config)).chain(
            self.consumers
                .iter()
                .map(|c| (format!("{}/{}", c.stream, c.name), &c.config)),
        );
        for (what, config) in objects {
            for (key, needs) in NEWER_KEYS {
                let needed = ServerVersion::parse(needs).unwrap_or(ServerVersion(99, 0, 0));
                if config.contains_key(*key) && server < needed {
                    return Err(StreamsError::Unsupported {
                        what,
                        key: key.to_string(),
                        needs,
                        server: server.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::{consumer, stream};

    #[test]
    fn every_definition_parses_into_async_nats_configs() {
        let defs = Definitions::builtin().unwrap();
        for s in &defs.streams {
            let cfg: stream::Config =
                serde_json::from_value(Value::Object(s.config.clone())).unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert_eq!(cfg.name, s.name);
        }
        for c in &defs.consumers {
            let cfg: consumer::pull::Config =
                serde_json::from_value(Value::Object(c.config.clone())).unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(cfg.durable_name.as_deref(), Some(c.name.as_str()));
            assert!(defs.streams.iter().any(|s| s.name == c.stream));
        }
    }

    #[test]
    fn builtin_matches_the_streams_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("streams");
        let from_dir = Definitions::from_dir(&dir).unwrap();
        let builtin = Definitions::builtin().unwrap();
        let names = |d: &Definitions| {
            let mut v: Vec<String> = d.streams.iter().map(|s| s.name.clone()).collect();
            v.extend(d.consumers.iter().map(|c| format!("{}/{}", c.stream, c.name)));
            v.sort();
            v
        };
        assert_eq!(names(&from_dir), names(&builtin));
    }

    #[test]
    fn contract_names_and_policies() {
        let defs = Definitions::builtin().unwrap();
        let get = |n: &str| &defs.streams.iter().find(|s| s.name == n).unwrap().config;
        assert_eq!(get("JOBS_SUBMIT")["retention"], "workqueue");
        assert_eq!(get("JOBS_RUN")["retention"], "workqueue");
        assert_eq!(get("JOBS_DEAD")["retention"], "limits");
        assert!(get("JOBS_SUBMIT")["duplicate_window"].as_u64().unwrap() >= 120_000_000_000);
        let exec = defs.consumers.iter().find(|c| c.name == "executor-fast").unwrap();
        assert_eq!(
            exec.config["max_deliver"].as_u64().unwrap(),
            u64::from(crate::job::envelope::MAX_ATTEMPTS_LIMIT)
        );
    }

    #[test]
    fn lanes_and_overrides() {
        let gpu = Lane::new("gpu").unwrap();
        let defs = Definitions::builtin()
            .unwrap()
            .with_lanes(&[gpu])
            .with_overrides(&json!({"*": {"num_replicas": 3}, "JOBS_RUN/executor-gpu": {"max_ack_pending": 5}}))
            .unwrap();
        let c = defs.consumers.iter().find(|c| c.name == "executor-gpu").unwrap();
        assert_eq!(c.config["filter_subject"], "jobs.run.gpu.*");
        assert_eq!(c.config["max_ack_pending"], 5);
        assert!(defs.streams.iter().all(|s| s.config["num_replicas"] == 3));
        let err = Definitions::builtin()
            .unwrap()
            .with_overrides(&json!({"NOPE": {}}))
            .unwrap_err();
        assert!(err.to_string().contains("NOPE"));
    }

    #[test]
    fn newer_keys_are_refused_on_old_servers() {
        let mut defs = Definitions::builtin().unwrap();
        defs.streams[0].config.insert("compression".into(), json!("s2"));
        let err = defs.check_supported(ServerVersion(2, 9, 10)).unwrap_err().to_string();
        assert!(err.contains("compression") && err.contains("2.10.0"), "{err}");
        assert!(defs.check_supported(ServerVersion(2, 12, 8)).is_ok());
        assert_eq!(ServerVersion::parse("2.10.25-beta"), Some(ServerVersion(2, 10, 25)));
    }
}
