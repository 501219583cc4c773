//! The Rust client of a shared-memory channel (the C and Python clients in
//! `include/` and `python/` follow the same steps; see docs/shm-protocol.md).
//!
//! One client at a time: [`ShmClient::connect`] takes an exclusive `flock` on
//! the file (the kernel releases it if the client dies), waits for the daemon
//! to be ready, checks the layout, and starts a new client epoch: the daemon
//! drops what the previous client left, and replies of older epochs are
//! skipped here, so attaching never waits on a dead client's leftovers.
//! Every wait watches the daemon's generation, so a daemon restart surfaces as
//! [`ClientError::DaemonRestarted`] instead of a hang.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::doorbell::Spin;
use super::ring::{Channel, Dir, Fault, LayoutError, MAGIC, State, VERSION, flags, off};

/// Longest sleep on the doorbell before the daemon's state is looked at again.
const SLICE: Duration = Duration::from_millis(50);

/// Why a call did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The file could not be opened or mapped.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file is not a compatible channel.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Another live process is attached (its pid, as it recorded it).
    #[error("another client (pid {0}) is attached")]
    Busy(u32),
    /// The daemon did not become ready in time.
    #[error("the daemon is not serving this channel")]
    NotReady,
    /// The daemon restarted: reconnect (requests in flight are lost).
    #[error("the daemon restarted; reconnect")]
    DaemonRestarted,
    /// The daemon stopped.
    #[error("the daemon stopped")]
    DaemonStopped,
    /// The message is longer than the channel's `max_message`.
    #[error("message of {0} bytes is over max_message ({1})")]
    TooLarge(usize, usize),
    /// No reply in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The handler failed; its last traceback line.
    #[error("handler failed: {0}")]
    Handler(String),
    /// A reply failed its checksum or did not match the request.
    #[error("corrupt reply: {0}")]
    Corrupt(String),
    /// The daemon lost the framing of the request stream and dropped every
    /// request sent so far: none still outstanding will be answered.
    #[error("the daemon reset the request stream: {0}")]
    Reset(String),
}

/// An attached client.
#[derive(Debug)]
pub struct ShmClient {
    ch: Channel,
    /// Holds the client flock.
    _file: std::fs::File,
    generation: u64,
    epoch: u64,
    next_seq: u32,
    pid: u32,
    timeout: Duration,
    spin: Spin,
}

impl ShmClient {
    /// Maps the channel at `path`, checks its layout and attaches, waiting
    /// up to `timeout` for the daemon, for the previous client's requests, and
    /// for a gone client's lock that a forked process still holds.
    ///
    /// # Errors
    /// [`ClientError`]: I/O, layout, another live client, daemon not ready.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let deadline = Instant::now() + timeout;
        // One client at a time: an exclusive flock on the file, which the
        // kernel drops when the holder dies (a crashed client never wedges it).
        // A live client (its pid recorded) means Busy at once. A lock held
        // with no client recorded is a previous client's, still open in a
        // process that forked while it was attached and has not exec'd yet
        // (its copy of the descriptor closes at exec): wait for it.
        loop {
            // SAFETY: flock on a file descriptor we own for the client's lifetime.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let holder = client_pid_of(&file);
            if holder != 0 || Instant::now() >= deadline {
                return Err(ClientError::Busy(holder));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Ready before anything else is read: a daemon (re)initialising the
        // file may be resizing it and rewriting the header.
        loop {
            let header = Header::read(&file);
            if let Some(h) = &header {
                if h.magic != MAGIC && h.magic != [0; 8] {
                    // Never a channel being set up: fail now, not at the timeout.
                    return Err(LayoutError::Magic(h.magic).into());
                }
                if h.magic == MAGIC && h.state == State::Ready as u32 {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(match header {
                    // Nobody made it ready, and we could not speak it anyway.
                    Some(h) if h.magic == MAGIC && h.version != VERSION => {
                        LayoutError::Version(h.version).into()
                    }
                    _ => ClientError::NotReady,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let map = memmap2::MmapOptions::new().map_raw(&file)?;
        let ch = Channel::attach(map)?;
        let pid = std::process::id();
        ch.client_pid().store(pid, Ordering::Release);
        // A dead predecessor may have left its "asleep" flag set.
        ch.bell(Dir::Response).sleeping.store(0, Ordering::Relaxed);
        let generation = ch.generation();
        // A new epoch: the daemon drops the previous client's requests and
        // replies from now on; what is already in the response ring is not ours.
        let epoch = ch.next_epoch();
        ch.discard(Dir::Response);
        Ok(Self {
            ch,
            _file: file,
            generation,
            epoch,
            next_seq: 0,
            pid,
            timeout,
            spin: Spin::default(),
        })
    }

    /// Largest message the channel takes.
    pub fn max_message(&self) -> usize {
        self.ch.max_record()
    }

    /// Queues a request (waiting while the ring is full); returns its sequence number.
    ///
    /// # Errors
    /// [`ClientError::TooLarge`], or the daemon restarted or stopped meanwhile.
    pub fn send(&mut self, data: &[u8]) -> Result<u32, ClientError> {
        if data.len() > self.ch.max_record() {
            return Err(ClientError::TooLarge(data.len(), self.ch.max_record()));
        }
        let seq = self.next_seq;
        let mut waiter = Waiter::new(self.timeout);
        while !self
            .ch
            .try_push(Dir::Request, seq, flags::OK, self.epoch, data)
        {
            self.check_daemon()?;
            waiter.wait()?;
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(seq)
    }

    /// Takes the next reply: `(seq, Some(bytes))`, or `(seq, None)` when the
    /// handler returned `None`.
    ///
    /// # Errors
    /// [`ClientError::Handler`] for a handler exception, or a daemon restart,
    /// stop, timeout or corrupt reply.
    pub fn recv(&mut self) -> Result<(u32, Option<Vec<u8>>), ClientError> {
        let deadline = Instant::now() + self.timeout;
        let record = loop {
            match self.ch.try_pop(Dir::Response) {
                // Another client's reply, pushed before the daemon saw our epoch.
                Some(r)
                    if r.epoch != self.epoch && !matches!(r.fault, Some(Fault::Framing { .. })) =>
                {
                    continue;
                }
                Some(r) => break r,
                None => {}
            }
            self.check_daemon()?;
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(self.timeout));
            }
            // Spin briefly, then sleep on the doorbell the daemon rings.
            let ch = &self.ch;
            ch.bell(Dir::Response)
                .wait(&mut self.spin, (deadline - now).min(SLICE), || {
                    ch.readable(Dir::Response)
                });
        };
        if let Some(fault) = record.fault {
            return Err(ClientError::Corrupt(format!(
                "reply {}: {fault:?}",
                record.seq
            )));
        }
        let text = || String::from_utf8_lossy(&record.payload).into_owned();
        match record.flags {
            flags::OK => Ok((record.seq, Some(record.payload))),
            flags::NO_REPLY => Ok((record.seq, None)),
            flags::RESET => Err(ClientError::Reset(text())),
            _ => Err(ClientError::Handler(text())),
        }
    }

    /// Sends `data` and waits for its reply.
    ///
    /// # Errors
    /// As [`ShmClient::send`] and [`ShmClient::recv`].
    pub fn call(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let seq = self.send(data)?;
        let (got, reply) = self.recv()?;
        if got != seq {
            return Err(ClientError::Corrupt(format!(
                "reply {got} for request {seq}"
            )));
        }
        Ok(reply)
    }

    fn check_daemon(&self) -> Result<(), ClientError> {
        if self.ch.generation() != self.generation {
            return Err(ClientError::DaemonRestarted);
        }
        if self.ch.state() == State::Stopped as u32 {
            return Err(ClientError::DaemonStopped);
        }
        Ok(())
    }
}

/// The header fields a client needs before mapping, read through the file
/// (the mapping may not be sized yet while a daemon initialises it).
struct Header {
    magic: [u8; 8],
    version: u32,
    state: u32,
    client_pid: u32,
}

impl Header {
    /// `None` while the file is shorter than the fields.
    fn read(file: &std::fs::File) -> Option<Self> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 44];
        file.read_exact_at(&mut b, 0).ok()?;
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[off::MAGIC..off::MAGIC + 8]);
        Some(Self {
            magic,
            version: word(off::VERSION),
            state: word(off::STATE),
            client_pid: word(off::CLIENT_PID),
        })
    }
}

fn client_pid_of(file: &std::fs::File) -> u32 {
    Header::read(file).map_or(0, |h| h.client_pid)
}

impl Drop for ShmClient {
    fn drop(&mut self) {
        let _ =
            self.ch
                .client_pid()
                .compare_exchange(self.pid, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Spin, then yield, then sleep; fails after the timeout.
struct Waiter {
    start: Instant,
    timeout: Duration,
    spins: u32,
}

impl Waiter {
    fn new(timeout: Duration) -> Self {
        Self {
            start: Instant::now(),
            timeout,
            spins: 0,
        }
    }

    fn wait(&mut self) -> Result<(), ClientError> {
        self.spins += 1;
        if self.spins < 2000 {
            std::hint::spin_loop();
            return Ok(());
        }
        let waited = self.start.elapsed();
        if waited >= self.timeout {
            return Err(ClientError::Timeout(self.timeout));
        }
        if waited < Duration::from_millis(2) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
}
