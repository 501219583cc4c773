//! One worker process: `pyipcd run` on the same config, exec'd fresh (never
//! forked from a process with an interpreter), given the servers' listening
//! sockets (`LISTEN_FDS`/`LISTEN_FDNAMES`, the socket-activation
//! convention), its identity, and a notify socket of its own on which it
//! says `READY=1`, `WATCHDOG=1` and `STATUS=` as it would to systemd.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::identity::{
    CONFIG_ENV, DEFER_ENV, MAX_REQUESTS_ENV, SERIAL_ENV, WORKER_ENV, WORKERS_ENV,
};

/// What a worker process tells the supervisor.
#[derive(Debug)]
pub(super) enum Event {
    /// Lines it sent to its notify socket.
    Notice { serial: u64, text: String },
    /// It exited (reaped).
    Exited {
        serial: u64,
        status: std::process::ExitStatus,
    },
}

/// How to start a worker.
pub(super) struct Spec<'a> {
    /// The binary (this one).
    pub exe: &'a Path,
    /// The config file it runs (its folder anchors relative paths).
    pub config: &'a Path,
    /// That file's text as the supervisor loaded it.
    pub config_text: &'a str,
    /// Its index, 0 to `processes` − 1.
    pub index: usize,
    /// How many workers its generation has.
    pub workers: usize,
    /// Unique per process the supervisor starts.
    pub serial: u64,
    /// The listening sockets, by the name it looks them up under.
    pub sockets: &'a [(String, BorrowedFd<'a>)],
    /// Where its notify socket goes (the supervisor's private folder).
    pub run_dir: &'a Path,
    /// Whether its worker-0 roles wait for SIGUSR1.
    pub defer_singletons: bool,
    /// The watchdog period it is given (`WATCHDOG_USEC`), if any.
    pub watchdog: Option<Duration>,
    /// After how many requests it asks to be replaced, if ever.
    pub max_requests: Option<u64>,
    /// It takes the place of a worker that died (its balance slot is void).
    pub after_death: bool,
}

/// A running worker process.
#[derive(Debug)]
pub(super) struct Child {
    /// Its index.
    pub index: usize,
    /// Its process id (valid until its `Exited` event).
    pub pid: u32,
    /// When it said `READY=1`.
    pub ready: Option<Instant>,
    /// When it last said `WATCHDOG=1` (or started).
    pub pinged: Instant,
    /// Its own admin endpoint (`X_PYIPCD_ADMIN=`), on loopback.
    pub admin: Option<String>,
    /// When its `lifetime` ends.
    pub deadline: Option<Instant>,
    /// Memory samples in a row over `max_rss`.
    pub over_rss: u32,
    /// Not replaced again before this (its last replacement failed).
    pub recycle_after: Option<Instant>,
    /// A replacement asked for while one could not start (why).
    pub wanted: Option<&'static str>,
    /// When it was started.
    pub started: Instant,
    /// Set once it has been reaped: its pid may belong to another process.
    reaped: Arc<AtomicBool>,
    /// Its notify socket, removed when the child is dropped.
    notify_path: PathBuf,
    listener: JoinHandle<()>,
}

impl Drop for Child {
    fn drop(&mut self) {
        self.listener.abort();
        let _ = std::fs::remove_file(&self.notify_path);
    }
}

impl Child {
    /// Starts a worker as `spec` says; its notices and its exit come on `events`.
    ///
    /// # Errors
    /// If its notify socket cannot be bound or the process cannot start.
    pub(super) fn spawn(spec: &Spec<'_>, events: &mpsc::Sender<Event>) -> io::Result<Self> {
        let notify_path = spec.run_dir.join(format!("worker-{}.sock", spec.serial));
        let _ = std::fs::remove_file(&notify_path);
        let notices = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
        notices.set_nonblocking(true)?;
        let notices = UnixDatagram::from_std(notices)?;

        let n = spec.sockets.len();
        // Copies numbered above 3 + n, so that moving them into place (3, 4,
        // …) in the child never overwrites one not yet moved.
        let above = RawFd::try_from(3 + n).unwrap_or(RawFd::MAX);
        let copies = spec
            .sockets
            .iter()
            .map(|(_, fd)| dup_at_least(*fd, above))
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        let raw: Vec<RawFd> = copies.iter().map(AsRawFd::as_raw_fd).collect();
        let names: Vec<&str> = spec.sockets.iter().map(|(name, _)| name.as_str()).collect();

        let mut cmd = std::process::Command::new(spec.exe);
        cmd.arg("run")
            .arg("--config")
            .arg(spec.config)
            .stdin(Stdio::null())
            .env(CONFIG_ENV, spec.config_text)
            .env(WORKER_ENV, spec.index.to_string())
            .env(WORKERS_ENV, spec.workers.to_string())
            .env(SERIAL_ENV, spec.serial.to_string())
            .env("NOTIFY_SOCKET", &notify_path)
            .env("LISTEN_FDS", n.to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            // The worker names itself (its pid is not known before the fork).
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_PID");
        if spec.after_death {
            cmd.env(super::balance::RESET_ENV, "1");
        } else {
            cmd.env_remove(super::balance::RESET_ENV);
        }
        if spec.defer_singletons {
            cmd.env(DEFER_ENV, "1");
        } else {
            cmd.env_remove(DEFER_ENV);
        }
        match spec.max_requests {
            Some(n) => cmd.env(MAX_REQUESTS_ENV, n.to_string()),
            None => cmd.env_remove(MAX_REQUESTS_ENV),
        };
        match spec.watchdog {
            Some(period) => cmd.env("WATCHDOG_USEC", period.as_micros().to_string()),
            None => cmd.env_remove("WATCHDOG_USEC"),
        };
        let supervisor = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        // SAFETY: the closure runs in the forked child before exec and makes
        // only async-signal-safe calls (dup2, setpgid, prctl, getppid, on
        // integers it owns; iterating the vector does not allocate).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    // dup2 clears close-on-exec on the copy: it is inherited.
                    if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Its own process group: a terminal's Ctrl-C reaches the
                // supervisor only, which stops the workers itself.
                if libc::setpgid(0, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // A worker whose supervisor died (SIGKILL) stops too.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != supervisor {
                    // (No allocation here, after a fork.)
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        // std opens its exec-error pipe just before the fork, at the lowest
        // free descriptor: keep 3 .. 3 + n taken so that it lands above
        // them (the child's dup2 into 3 .. 3 + n would close it).
        let placeholders = hold_descriptors(3..above)?;
        let spawned = tokio::process::Command::from(cmd).spawn();
        drop(placeholders);
        let mut process = spawned?;
        drop(copies);
        let pid = process.id().unwrap_or(0);
        let serial = spec.serial;
        let tx = events.clone();
        let reaped = Arc::new(AtomicBool::new(false));
        let reaped_here = reaped.clone();
        let listener = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut exited = std::pin::pin!(process.wait());
            loop {
                tokio::select! {
                    got = notices.recv(&mut buf) => {
                        let Ok(len) = got else { continue };
                        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                        if tx.send(Event::Notice { serial, text }).await.is_err() {
                            return;
                        }
                    }
                    status = &mut exited => {
                        reaped_here.store(true, Ordering::SeqCst);
                        // Notices sent just before the exit come first.
                        while let Ok(len) = notices.try_recv(&mut buf) {
                            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                            let _ = tx.send(Event::Notice { serial, text }).await;
                        }
                        // If waiting failed, say it exited (1) anyway: the
                        // supervisor must not wait for it forever.
                        let status = status.unwrap_or_else(|e| {
                            tracing::error!("cannot wait for worker pid {pid}: {e}");
                            std::os::unix::process::ExitStatusExt::from_raw(1 << 8)
                        });
                        let _ = tx.send(Event::Exited { serial, status }).await;
                        return;
                    }
                }
            }
        });
        let now = Instant::now();
        Ok(Self {
            index: spec.index,
            pid,
            ready: None,
            pinged: now,
            admin: None,
            deadline: None,
            over_rss: 0,
            recycle_after: None,
            wanted: None,
            started: now,
            reaped,
            notify_path,
            listener,
        })
    }

    /// Sends it `signal`, unless it has been reaped (its pid may then be
    /// another process's).
    pub(super) fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.reaped.load(Ordering::SeqCst) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).unwrap_or(0));
        if let Err(e) = nix::sys::signal::kill(pid, signal) {
            tracing::warn!(
                worker = self.index,
                pid = self.pid,
                "cannot send {signal}: {e}"
            );
        }
    }
}

/// Close-on-exec placeholders (`/dev/null`) on the free descriptors in
/// `range`, race-free with other threads (each is a duplicate numbered at
/// least its target: a number taken meanwhile just stays taken).
fn hold_descriptors(range: std::ops::Range<RawFd>) -> io::Result<Vec<OwnedFd>> {
    let null = OwnedFd::from(std::fs::File::open("/dev/null")?);
    let mut held = Vec::new();
    for fd in range {
        let copy = dup_at_least(null.as_fd(), fd)?;
        if copy.as_raw_fd() == fd {
            held.push(copy);
        }
    }
    Ok(held)
}

/// A close-on-exec duplicate of `fd` numbered at least `above`.
fn dup_at_least(fd: BorrowedFd<'_>, above: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor we borrow; on success the result is a
    // new descriptor that nothing else owns.
    #[allow(unsafe_code)]
    unsafe {
        let new = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above);
        if new < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(new))
    }
}

/// The supervisor's private folder (mode 0700) for the workers' notify
/// sockets: under `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`) or
/// the temporary folder; removed when the supervisor ends.
pub(super) struct RunDir(PathBuf);

impl RunDir {
    pub(super) fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("RUNTIME_DIRECTORY")
            .and_then(|v| v.to_string_lossy().split(':').next().map(PathBuf::from))
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("pyipcd-workers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self(dir))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new shared mapping for a generation's accept balance (`balance`).
///
/// # Errors
/// If the memfd cannot be made or sized.
pub(super) fn balance_map() -> io::Result<OwnedFd> {
    // SAFETY: memfd_create with a valid C string; on success the result is
    // a new descriptor nothing else owns.
    #[allow(unsafe_code)]
    let fd = unsafe {
        let fd = libc::memfd_create(c"pyipcd-balance".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    let file = std::fs::File::from(fd);
    file.set_len(super::balance::BYTES as u64)?;
    Ok(file.into())
}
