//! Features of a job for run-time prediction: its kind, the envelope's `features`
//! object (numbers as numbers, strings and booleans as categories) and its payload size.
//!
//! Extraction never panics and never trusts input: non-finite or huge numbers are
//! clamped, long strings are cut, nested values are ignored, and only the first
//! [`MAX_FEATURES`] keys count. A [`FeatureSpace`] learned from history turns features
//! into a fixed-width vector: kinds and categories one-hot (unseen values fall into an
//! "other" slot), numbers as `ln(1 + |x|)` with their sign, missing values as 0.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most feature keys read from one envelope.
pub const MAX_FEATURES: usize = 32;
/// Longest key or category value kept (longer ones are cut).
pub const MAX_TEXT: usize = 64;
/// Most category values per key remembered by a feature space.
pub const MAX_CATEGORIES: usize = 32;
const NUMBER_LIMIT: f64 = 1e12;

/// One feature value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FeatureValue {
    /// A number (clamped to ±1e12).
    Num(f64),
    /// A category (a string or a boolean), at most [`MAX_TEXT`] characters.
    Cat(String),
}

/// The features of one job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// The job's kind.
    pub kind: String,
    /// Named features from the envelope.
    pub values: BTreeMap<String, FeatureValue>,
    /// Size of the payload in bytes.
    pub payload_bytes: u64,
}

fn cut(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

impl Features {
    /// Features from a kind, the envelope's raw `features` JSON (if any) and the
    /// payload's size. Anything that is not a JSON object yields no named features.
    pub fn extract(kind: &str, features: Option<&str>, payload_bytes: usize) -> Features {
        let mut values = BTreeMap::new();
        if let Some(Value::Object(map)) = features.and_then(|f| serde_json::from_str::<Value>(f).ok()) {
            for (key, value) in map.into_iter().take(MAX_FEATURES) {
                let v = match value {
                    Value::Number(n) => match n.as_f64() {
                        Some(x) if x.is_finite() => FeatureValue::Num(x.clamp(-NUMBER_LIMIT, NUMBER_LIMIT)),
                        _ => continue,
                    },
                    Value::String(s) => FeatureValue::Cat(cut(&s)),
                    Value::Bool(b) => FeatureValue::Cat(b.to_string()),
                    _ => continue,
                };
                values.insert(cut(&key), v);
            }
        }
        Features {
            kind: cut(kind),
            values,
            payload_bytes: payload_bytes as u64,
        }
    }
}

/// The size of a JSON payload as Postgres prints it back from `jsonb`, which is what
/// training measures (`octet_length(payload::text)`): no whitespace except one space
/// after every `:` and `,` outside strings. Measuring the raw bytes instead would make
/// `{"ms":300}` and the stored `{"ms": 300}` differ, and a model that leans on payload
/// size would be skewed between training and serving. One pass over the bytes, no parse.
pub fn stored_size(raw: &str) -> usize {
    let (mut size, mut in_string, mut escaped) = (0, false, false);
    for &b in raw.as_bytes() {
        if in_string {
            size += 1;
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b' ' | b'\n' | b'\r' | b'\t' => {}
            b':' | b',' => size += 2,
            b'"' => {
                in_string = true;
                size += 1;
            }
            _ => size += 1,
        }
    }
    size
}

/// The vector layout learned from history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpace {
    kinds: Vec<String>,
    numeric: Vec<String>,
    categorical: Vec<(String, Vec<String>)>,
}

fn signed_log(x: f64) -> f64 {
    x.signum() * x.abs().ln_1p()
}

impl FeatureSpace {
    /// Learns kinds, numeric keys and the most frequent categories of each key.
    pub fn fit<'a>(samples: impl IntoIterator<Item = &'a Features>) -> FeatureSpace {
        let mut kinds = BTreeSet::new();
        let mut numeric = BTreeSet::new();
        let mut cats: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for f in samples {
            kinds.insert(f.kind.clone());
            for (k, v) in &f.values {
                match v {
                    FeatureValue::Num(_) => {
                        numeric.insert(k.clone());
                    }
                    FeatureValue::Cat(c) => *cats.entry(k.clone()).or_default().entry(c.clone()).or_default() += 1,
                }
            }
        }
        let categorical = cats
            .into_iter()
            .map(|(k, counts)| {
                let mut by_count: Vec<(String, usize)> = counts.into_iter().collect();
                by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                (k, by_count.into_iter().take(MAX_CATEGORIES).map(|(v, _)| v).collect())
            })
            .collect();
        FeatureSpace {
            kinds: kinds.into_iter().collect(),
            numeric: numeric.into_iter().collect(),
            categorical,
        }
    }

    /// Width of the vectors this space produces.
    pub fn width(&self) -> usize {
        self.kinds.len()
            + 1
            + self.numeric.len() * 2
            + self.categorical.iter().map(|(_, v)| v.len() + 1).sum::<usize>()
            + 1
    }

    /// The vector of `f` (always [`FeatureSpace::width`] long).
    pub fn vectorize(&self, f: &Features) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.width());
        let kind = self.kinds.iter().position(|k| *k == f.kind);
        out.extend((0..self.kinds.len()).map(|i| if kind == Some(i) { 1.0 } else { 0.0 }));
        out.push(if kind.is_none() { 1.0 } else { 0.0 });
        for key in &self.numeric {
            match f.values.get(key) {
                Some(FeatureValue::Num(x)) => {
                    out.push(signed_log(*x));
                    out.push(1.0);
                }
                _ => {
                    out.push(0.0);
                    out.push(0.0);
                }
            }
        }
        for (key, values) in &self.categorical {
            let seen = match f.values.get(key) {
                Some(FeatureValue::Cat(c)) => values.iter().position(|v| v == c),
                _ => None,
            };
            let present = f.values.contains_key(key);
            out.extend((0..values.len()).map(|i| if seen == Some(i) { 1.0 } else { 0.0 }));
            out.push(if present && seen.is_none() { 1.0 } else { 0.0 });
        }
        out.push((f.payload_bytes as f64).ln_1p());
        out
    }

    /// Known kinds.
    pub fn kinds(&self) -> &[String] {
        &self.kinds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_size_is_measured_as_postgres_prints_it() {
        // Right-hand sides are what `SELECT '<raw>'::jsonb::text` prints.
        for (raw, stored) in [
            (r#"{"ms":300}"#, r#"{"ms": 300}"#),
            (r#"{ "ms" : 300 ,"a":[1,2, 3] }"#, r#"{"a": [1, 2, 3], "ms": 300}"#),
            (r#"{"s":"a:b, \"c\": d"}"#, r#"{"s": "a:b, \"c\": d"}"#),
            ("{}", "{}"),
            ("null", "null"),
        ] {
            assert_eq!(stored_size(raw), stored.len(), "{raw}");
        }
    }

    #[test]
    fn extraction_keeps_numbers_and_categories_and_drops_the_rest() {
        let f = Features::extract(
            "train",
            Some(r#"{"size":"large","gpu":true,"memory_mb":2048,"nested":{"a":1},"list":[1],"none":null}"#),
            120,
        );
        assert_eq!(f.values.get("size"), Some(&FeatureValue::Cat("large".into())));
        assert_eq!(f.values.get("gpu"), Some(&FeatureValue::Cat("true".into())));
        assert_eq!(f.values.get("memory_mb"), Some(&FeatureValue::Num(2048.0)));
        assert_eq!(f.values.len(), 3);
        assert_eq!(f.payload_bytes, 120);
    }

    #[test]
    fn garbage_never_panics_and_is_bounded() {
        let long = "x".repeat(10_000);
        let many: String = (0..500).map(|i| format!("\"k{i}\":{i}")).collect::<Vec<_>>().join(",");
        let cases = [
            "not json".to_string(),
            "[1,2]".to_string(),
            "1e999".to_string(),
            format!("{{\"{long}\":\"{long}\"}}"),
            format!("{{{many}}}"),
            r#"{"size":-1e300,"n":1e308}"#.to_string(),
            String::new(),
        ];
        for c in &cases {
            let f = Features::extract(&long, Some(c), usize::MAX);
            assert!(f.values.len() <= MAX_FEATURES);
            assert!(f.kind.len() <= MAX_TEXT);
            for (k, v) in &f.values {
                assert!(k.chars().count() <= MAX_TEXT);
                match v {
                    FeatureValue::Num(x) => assert!(x.is_finite() && x.abs() <= NUMBER_LIMIT),
                    FeatureValue::Cat(s) => assert!(s.chars().count() <= MAX_TEXT),
                }
            }
            let space = FeatureSpace::fit([&f]);
            let v = space.vectorize(&f);
            assert_eq!(v.len(), space.width());
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn vectors_have_a_fixed_layout_and_unseen_values_go_to_other() {
        let a = Features::extract("cpu", Some(r#"{"size":"small","n":10}"#), 10);
        let b = Features::extract("io", Some(r#"{"size":"large"}"#), 10);
        let space = FeatureSpace::fit([&a, &b]);
        let unseen = Features::extract("gpu", Some(r#"{"size":"huge","n":"ten"}"#), 0);
        for f in [&a, &b, &unseen] {
            assert_eq!(space.vectorize(f).len(), space.width());
        }
        let v = space.vectorize(&unseen);
        // kinds cpu, io, other → the "other kind" slot is set.
        assert_eq!(&v[..3], &[0.0, 0.0, 1.0]);
    }
}
