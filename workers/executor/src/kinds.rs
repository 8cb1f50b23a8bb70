//! The built-in job kinds: `noop`, `sleep`, `cpu` and `http`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::handler::{HandlerError, HandlerResult, JobInput, Registry};

/// A registry with every built-in kind.
pub fn builtin() -> Registry {
    let mut r = Registry::new();
    let http = reqwest::Client::builder()
        .user_agent(concat!("mlsched-executor/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default();
    r.register("noop", noop).expect("valid kind");
    r.register("sleep", sleep).expect("valid kind");
    r.register("cpu", cpu).expect("valid kind");
    r.register("http", move |job: JobInput| call_http(http.clone(), job))
        .expect("valid kind");
    r
}

async fn noop(_job: JobInput) -> HandlerResult {
    Ok(Value::Null)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
    #[serde(default)]
    fail_first: u32,
}

/// Sleeps `ms`, then fails if this is one of the first `fail_first` attempts.
async fn sleep(job: JobInput) -> HandlerResult {
    let args: SleepArgs = job.payload()?;
    tokio::time::sleep(Duration::from_millis(args.ms)).await;
    if job.attempt <= args.fail_first {
        return Err(HandlerError::retry(format!(
            "failing attempt {} of the first {} on purpose",
            job.attempt, args.fail_first
        )));
    }
    Ok(json!({"slept_ms": args.ms}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CpuArgs {
    iterations: u64,
}

/// Deterministic compute: a xorshift chain of `iterations` steps. Large jobs run on
/// the blocking pool so they never stall other jobs' I/O, and stop early once the
/// attempt is abandoned (timeout, hard stop): the thread is not left spinning.
async fn cpu(job: JobInput) -> HandlerResult {
    struct Abandon(Arc<AtomicBool>);
    impl Drop for Abandon {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let args: CpuArgs = job.payload()?;
    let abandoned = Arc::new(AtomicBool::new(false));
    let _guard = Abandon(abandoned.clone());
    let work = move || {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..args.iterations {
            if i % (1 << 20) == 0 && abandoned.load(Ordering::Relaxed) {
                return None;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x = x.wrapping_add(i);
        }
        Some(x)
    };
    let checksum = if args.iterations < 100_000 {
        work()
    } else {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| HandlerError::retry(format!("compute task failed: {e}")))?
    };
    let checksum = checksum.ok_or_else(|| HandlerError::retry("abandoned"))?;
    Ok(json!({"iterations": args.iterations, "checksum": checksum.to_string()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpArgs {
    url: String,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

fn default_method() -> String {
    "GET".into()
}

/// Calls a URL: 2xx succeeds; 5xx, 429, timeouts and connection errors retry; any
/// other status is permanent.
async fn call_http(client: reqwest::Client, job: JobInput) -> HandlerResult {
    let args: HttpArgs = job.payload()?;
    let method = reqwest::Method::from_bytes(args.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| HandlerError::fatal(format!("`method` {:?} is not an HTTP method", args.method)))?;
    let url = reqwest::Url::parse(&args.url).map_err(|e| HandlerError::fatal(format!("`url` is invalid: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(HandlerError::fatal(format!(
            "`url` scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    let timeout = Duration::from_millis(args.timeout_ms.unwrap_or(30_000)).min(job.timeout);
    let mut req = client.request(method, url).timeout(timeout);
    if let Some(body) = &args.body {
        req = req.json(body);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return Err(HandlerError::retry(format!(
                "timed out after {} ms",
                timeout.as_millis()
            )))
        }
        Err(e) => return Err(HandlerError::retry(format!("request failed: {e}"))),
    };
    let status = resp.status();
    let code = status.as_u16();
    if status.is_success() {
        return Ok(json!({"status": code}));
    }
    let after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let reason = format!("HTTP {code}");
    if status.is_server_error() || code == 429 || code == 408 {
        Err(HandlerError::Retry { reason, after })
    } else {
        Err(HandlerError::fatal(reason))
    }
}
