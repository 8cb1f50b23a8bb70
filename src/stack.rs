//! Private `nats-server` and PostgreSQL processes from the system's binaries, for
//! `mlsched dev` and the integration tests.
//!
//! Each runs as a child process on a free loopback port with its data in a folder the
//! caller owns, is killed when dropped, and can be stopped and started again on the
//! same port and data (to test restarts). Postgres refuses to run as root, so as root
//! the cluster runs as the `postgres` system user.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(8).collect();
            return Err(io::Error::other(format!(
                "{what} exited with {status} before listening on port {port}; log {}:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::other(format!(
        "{what} did not listen on port {port} within 30 s"
    )))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds `nats-server`: `MLSCHED_NATS_SERVER`, then `PATH`, then `/usr/sbin`.
pub fn nats_server_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MLSCHED_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    on_path("nats-server")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
        .ok_or_else(|| {
            io::Error::other(
                "nats-server not found: install it (apt-get install nats-server) or set MLSCHED_NATS_SERVER",
            )
        })
}

/// A private `nats-server -js` with monitoring on.
pub struct NatsServer {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with its JetStream store under `dir`.
    pub fn start(binary: &Path, dir: &Path) -> io::Result<NatsServer> {
        std::fs::create_dir_all(dir)?;
        let mut s = NatsServer {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            port: free_port()?,
            monitor_port: free_port()?,
            child: None,
        };
        s.resume()?;
        Ok(s)
    }

    /// Starts the server again (same port and store) after [`NatsServer::stop`].
    pub fn resume(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = self.dir.join("nats-server.log");
        let mut child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-m",
                &self.monitor_port.to_string(),
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::other(format!("cannot run {}: {e}", self.binary.display())))?;
        wait_for_port(self.port, &mut child, "nats-server", &log)?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the server (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<monitor port>`
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds the directory holding `initdb` and `postgres`: `PATH`, then the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian does not put them on `PATH`).
pub fn postgres_bin_dir() -> io::Result<PathBuf> {
    if let Some(p) = on_path("initdb").and_then(|p| std::fs::canonicalize(p).ok()) {
        if let Some(dir) = p.parent().filter(|d| d.join("postgres").is_file()) {
            return Ok(dir.to_path_buf());
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).ok_or_else(|| {
        io::Error::other("PostgreSQL server binaries not found: install them (apt-get install postgresql)")
    })
}

/// The uid and gid of the `postgres` user, read from /etc/passwd.
fn postgres_user() -> io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| io::Error::other("running as root, but there is no `postgres` user to run PostgreSQL as"))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A private PostgreSQL cluster with trust authentication on 127.0.0.1.
pub struct PgCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

impl PgCluster {
    /// Initializes a cluster in `dir/data` (unless one is there) and starts it.
    /// `durable = false` turns fsync off, for tests.
    pub fn start(dir: &Path, durable: bool) -> io::Result<PgCluster> {
        std::fs::create_dir_all(dir)?;
        let user = if is_root() { Some(postgres_user()?) } else { None };
        if let Some((uid, gid)) = user {
            check_reachable(dir, uid)?;
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        }
        let bin = postgres_bin_dir()?;
        let data = dir.join("data");
        if !data.join("PG_VERSION").is_file() {
            let mut cmd = Command::new(bin.join("initdb"));
            cmd.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ]);
            let out = as_user(&mut cmd, user).output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            let mut conf =
                String::from("listen_addresses = '127.0.0.1'\nmax_connections = 200\nshared_buffers = '128MB'\n");
            if !durable {
                conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
            }
            std::fs::write(data.join("postgresql.auto.conf"), conf)?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(data.join("postgresql.auto.conf"), Some(uid), Some(gid))?;
            }
        }
        let mut c = PgCluster {
            bin,
            dir: dir.to_path_buf(),
            port: free_port()?,
            user,
            child: None,
        };
        c.resume()?;
        Ok(c)
    }

    /// Starts the server again (same port and data) after [`PgCluster::stop`].
    pub fn resume(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = self.dir.join("postgres.log");
        let logfile = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(&log, Some(uid), Some(gid))?;
        }
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(logfile.try_clone()?)
            .stderr(logfile);
        let mut child = as_user(&mut cmd, self.user).spawn()?;
        wait_for_port(self.port, &mut child, "postgres", &log)?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the server with a fast shutdown (clients are disconnected).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// URL of database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// As root, PostgreSQL runs as `postgres`, which must be able to reach `dir`.
fn check_reachable(dir: &Path, uid: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::canonicalize(dir)?;
    for ancestor in dir.ancestors().skip(1) {
        let m = std::fs::metadata(ancestor)?;
        if m.mode() & 0o001 == 0 && m.uid() != uid {
            return Err(io::Error::other(format!(
                "PostgreSQL runs as the `postgres` user here, which cannot enter {} (mode {:o}): \
                 choose a data folder it can reach, e.g. under /tmp",
                ancestor.display(),
                m.mode() & 0o777
            )));
        }
    }
    Ok(())
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}
