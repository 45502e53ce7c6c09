//! A throwaway PostgreSQL server with pgvector for tests and benchmarks: a fresh cluster on a
//! free loopback port, started by `scripts/setup-postgres.sh` and stopped (its files removed)
//! when dropped. Feature `test-server`; needs `scripts/setup-postgres.sh install` run once.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running test server; stopped on drop.
#[derive(Debug)]
pub struct TestServer {
    root: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    stopped: bool,
}

/// The repository's setup script.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup-postgres.sh")
}

impl TestServer {
    /// Starts a fresh server, or explains how to install one.
    pub fn start() -> Result<Self, String> {
        let pg_ctl = Path::new("/usr/lib/postgresql/15/bin/pg_ctl");
        if !pg_ctl.exists() {
            return Err(format!(
                "PostgreSQL 15 is not installed ({} missing); run `{} install` (CI does)",
                pg_ctl.display(),
                script().display()
            ));
        }
        let root = tempfile::Builder::new()
            .prefix("thinkrag-pg-")
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        // The server runs as user postgres when the tests run as root: it must reach the
        // data directory.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755));
        }
        let data = root.path().join("data");
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let out = Command::new(script())
                .arg("start")
                .arg(&data)
                .arg(port.to_string())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
            if out.status.success() {
                return Ok(Self {
                    root,
                    data,
                    port,
                    stopped: false,
                });
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // A port taken between choosing and starting: try another.
            let _ = Command::new(script()).arg("stop").arg(&data).output();
        }
        Err(format!("the test server did not start: {last}"))
    }

    /// The superuser URL of the `postgres` database, with the given `schema`.
    pub fn url(&self, schema: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable&schema={schema}",
            self.port
        )
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory (its `postgresql.conf`, `server.log`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// A scratch directory beside the cluster (for certificates and the like).
    pub fn scratch(&self) -> &Path {
        self.root.path()
    }

    /// Restarts the server (to take up changed settings, such as TLS).
    pub fn restart(&self) -> Result<(), String> {
        let _ = Command::new(script()).arg("stop").arg(&self.data).output();
        let out = Command::new(script())
            .arg("start")
            .arg(&self.data)
            .arg(self.port.to_string())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Stops the server now.
    pub fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = Command::new(script()).arg("stop").arg(&self.data).output();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free loopback port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}
