//! Reading a file in a child process under a time and a memory limit. A hostile or broken PDF
//! can make a parser recurse until the stack overflows (a form XObject that draws itself),
//! loop for hours (XObjects that draw each other in a fan) or allocate without end (a
//! compressed stream that expands to terabytes). None of that can be caught in process, so
//! the file is read by a child (the caller's own program, re-run in a reading mode) that the
//! parent stops at the limits; the failure is that file's alone, and the ingest goes on.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use wait_timeout::ChildExt;

use crate::document::{load_document, Document};
use crate::failure::{Failure, FailureReason};

/// The limits on reading one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimits {
    /// Wall-clock time allowed.
    pub time: Duration,
    /// Address space allowed, in bytes (`RLIMIT_AS`; Unix only, ignored elsewhere).
    pub memory_bytes: Option<u64>,
}

impl Default for FileLimits {
    /// Five minutes and 4 GiB: far more than any sound file needs (the largest manuals take
    /// seconds and tens of MiB), little enough that a bad one cannot stall a night's ingest.
    fn default() -> Self {
        Self {
            time: Duration::from_secs(300),
            memory_bytes: Some(4 << 30),
        }
    }
}

/// How to read files in a child process: `program args... PATH` must run
/// [`read_document_for_parent`] on PATH (a binary gives itself a hidden subcommand for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The program to run, usually the caller's own executable.
    pub program: PathBuf,
    /// Arguments before the path.
    pub args: Vec<OsString>,
    /// The limits the child runs under.
    pub limits: FileLimits,
}

/// What Rust's runtime prints when an allocation fails (under the memory limit).
const OUT_OF_MEMORY: &str = "memory allocation of";
/// What it prints when a thread overflows its stack.
const STACK_OVERFLOW: &str = "has overflowed its stack";

/// Stderr lines kept from a failed child, for the failure message.
const STDERR_TAIL: usize = 4096;

impl Isolation {
    /// Reads `path` in a child process under the limits; the result is what
    /// [`load_document`] would give, or a failure saying which limit stopped it.
    pub fn load(&self, path: &Path) -> Result<Document, Failure> {
        let fail = |reason| Failure::file(path, reason);
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            // Its own process group, so a timeout stops whatever it started too (a child
            // holding our pipes open would otherwise outlive the kill).
            command.process_group(0);
        }
        #[cfg(unix)]
        if let Some(limit) = self.limits.memory_bytes {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec, calling only setrlimit, which is
            // async-signal-safe, on a value computed before the fork.
            unsafe {
                command.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().map_err(|e| {
            fail(FailureReason::Io(format!(
                "cannot start the file reader {} ({e})",
                self.program.display()
            )))
        })?;
        // Both pipes are drained while waiting, so a chatty child never blocks on a full pipe.
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let out_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut buf);
            }
            buf
        });
        let err_reader = std::thread::spawn(move || forward_stderr(stderr.as_mut()));
        let status = match child.wait_timeout(self.limits.time) {
            Ok(Some(status)) => status,
            Ok(None) | Err(_) => {
                #[cfg(unix)]
                if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                    // SAFETY: plain syscall; the group is the child's own (see above).
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
                // The readers end when the last holder of the pipes is gone; not waited for.
                drop((out_reader, err_reader));
                return Err(fail(FailureReason::TimedOut {
                    seconds: self.limits.time.as_secs().max(1),
                }));
            }
        };
        let out = out_reader.join().unwrap_or_default();
        let tail = err_reader.join().unwrap_or_default();
        if status.success() {
            if let Ok(result) = serde_json::from_slice::<Result<Document, Failure>>(&out) {
                return result;
            }
        }
        let tail = String::from_utf8_lossy(&tail);
        let reason = if tail.contains(OUT_OF_MEMORY) && self.limits.memory_bytes.is_some() {
            FailureReason::OutOfMemory {
                limit_mib: self.limits.memory_bytes.unwrap_or(0) >> 20,
            }
        } else if tail.contains(STACK_OVERFLOW) {
            FailureReason::Crashed("stack overflow: the file nests without end".into())
        } else {
            let last = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            FailureReason::Crashed(format!("the reader exited with {status}; {last}"))
        };
        Err(fail(reason))
    }
}

/// Passes the child's stderr through to ours (its `-v` log lines), holding back the runtime's
/// own crash messages, which the failure reports instead; returns the last few KiB.
fn forward_stderr(stderr: Option<&mut std::process::ChildStderr>) -> Vec<u8> {
    let Some(stderr) = stderr else {
        return Vec::new();
    };
    let mut tail = Vec::new();
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match stderr.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let crash = text.contains(OUT_OF_MEMORY)
                || text.contains(STACK_OVERFLOW)
                || text.starts_with("fatal runtime error");
            if !crash {
                let _ = std::io::stderr().write_all(&line);
            }
            tail.extend_from_slice(&line);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
    }
    tail.extend_from_slice(&pending);
    tail
}

/// The child's side of [`Isolation`]: reads `path` and writes the result to `out` as JSON.
pub fn read_document_for_parent(path: &Path, out: &mut impl Write) -> std::io::Result<()> {
    let result = load_document(path);
    serde_json::to_writer(&mut *out, &result).map_err(std::io::Error::other)?;
    out.flush()
}
