//! `mode = "channel"`, the daemon's side: creates (0600) and initialises the
//! channel file with a new generation, then serves it from a dedicated
//! interpreter thread that runs the handler itself while traffic flows (a
//! hand-off per message to another thread would cost more than the message).
//!
//! Waiting for requests: an adaptive spin of a few microseconds, then a sleep
//! in the kernel on the request ring's doorbell (a futex in the mapping that
//! the client rings), all with the GIL released: an idle channel costs
//! nothing, and a request after idle wakes the thread at once.
//!
//! Client epochs (docs/shm-protocol.md): a request of an older epoch than the
//! header's (a client that has gone) is dropped unanswered, and so is a reply
//! whose client went away while its call ran or while the response ring was
//! full, so a new client never sees another client's replies and never waits
//! behind them. Bad records get their own error reply: a checksum mismatch or
//! an over-long record (the ones behind it are answered), or a `RESET` when
//! the framing is lost (everything published so far is dropped).
//!
//! A file found truncated under the mapping (`super::sigbus`) ends the
//! thread; the instance then initialises the file afresh and serves it again
//! ([`ShmChannel::run`]). `serve` holds the thread's loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::ring::{Channel, Dir, LayoutError, MAGIC, State, file_size};
use super::sigbus::Guard;
use crate::config::ShmRegionConfig;
use crate::py::handler::{Handler, Runs};
use crate::py::target::ResolveError;
use crate::role::Context;

mod serve;

/// How long a sleeping channel thread sleeps before looking at its stop flag
/// again (shutdown also wakes it at once; a client that publishes without
/// ringing the doorbell waits up to this long).
const STOP_CHECK: Duration = Duration::from_millis(500);

/// Re-initialisations of a truncated file allowed within a minute; the
/// role is down after that (until a reload).
const REINIT_MAX: usize = 5;

/// How long an instance handing its file to a replacement waits for room
/// for its last reply while the client reads none.
const HANDOVER_REPLY_WAIT: Duration = Duration::from_secs(5);

/// Why a channel cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The file could not be created, sized or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file holds something that is not a compatible channel.
    #[error("{path}: refusing to reuse it: {source}")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: LayoutError,
    },
}

/// What a channel instance resolved in Python: kept by a replacement whose
/// handler did not change.
#[derive(Clone)]
pub struct ChannelParts {
    handler: Arc<Handler>,
}

impl ChannelParts {
    /// Resolves the handler of `cfg` (a plain `def`: it runs on the channel's
    /// own thread), or takes `old`'s when `same` says it is unchanged.
    ///
    /// # Errors
    /// [`ResolveError`] if it cannot be resolved.
    pub fn resolve(
        py: Python<'_>,
        cfg: &ShmRegionConfig,
        old: Option<&ChannelParts>,
        same: impl Fn(&str) -> bool,
    ) -> Result<Self, ResolveError> {
        if let Some(o) = old.filter(|_| same("handler")) {
            return Ok(o.clone());
        }
        let spec = cfg.handler.as_deref().unwrap_or_default();
        let key = format!("shm.region `{}` handler", cfg.name);
        let handler = Handler::resolve(py, &cfg.name, &key, spec, Runs::OnOwnThread)?;
        Ok(Self {
            handler: Arc::new(handler),
        })
    }
}

/// How [`ShmChannel::open`] treats an existing channel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Initialise it afresh with a new generation (attached clients notice).
    Fresh,
    /// Adopt it as it is, from the instance this one replaces: same
    /// generation, same rings, attached clients notice nothing.
    Adopt,
}

/// A channel region, initialised and with its handler resolved.
pub struct ShmChannel {
    name: Arc<str>,
    /// For a re-initialisation after the file was truncated.
    config: ShmRegionConfig,
    /// The file, to notice that it shrank while the channel is idle.
    file: std::fs::File,
    /// Declared before `channel`: unregistered before the mapping goes.
    guard: Option<Guard>,
    /// Set when the file was seen shorter than the mapping.
    shrank: AtomicBool,
    /// The generation served (kept here: the mapping may read zeros).
    generation: u64,
    channel: Channel,
    handler: Arc<Handler>,
    /// Hand the handler a view into the mapping instead of a copy.
    zero_copy: bool,
    /// A zero-copy view was still alive in Python at shutdown.
    view_held_at_stop: AtomicBool,
    /// Set (before the stop) when a replacement adopts the file.
    handover: Arc<AtomicBool>,
}

impl ShmChannel {
    /// Creates or re-initialises the channel file (bumping its generation so
    /// attached clients notice the restart), or adopts it as the previous
    /// instance left it ([`Take::Adopt`], after that instance stopped).
    ///
    /// # Errors
    /// [`ChannelError`] naming the file.
    pub fn open(
        cfg: &ShmRegionConfig,
        parts: ChannelParts,
        take: Take,
    ) -> Result<Self, ChannelError> {
        let (ring, max, io) = layout(cfg);
        let handler = parts.handler;
        if take == Take::Adopt {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&cfg.path)
                .map_err(io)?;
            let map = memmap2::MmapOptions::new().map_raw(&file).map_err(io)?;
            let guard = Guard::register(map.as_ptr(), map.len());
            let foreign = |source| ChannelError::Foreign {
                path: cfg.path.clone(),
                source,
            };
            let channel = Channel::attach(map).map_err(foreign)?;
            if channel.ring_size() != ring || channel.max_record() != max {
                return Err(foreign(LayoutError::Size(
                    "not the layout the previous instance used".into(),
                )));
            }
            return Ok(Self::serving(cfg, file, guard, channel, handler));
        }
        Self::create(cfg, handler, 0)
    }

    /// Creates or re-initialises the file with a generation above both the
    /// file's and `floor`.
    fn create(
        cfg: &ShmRegionConfig,
        handler: Arc<Handler>,
        floor: u64,
    ) -> Result<Self, ChannelError> {
        let (ring, max, io) = layout(cfg);
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true),
            0o600,
        )
        .open(&cfg.path)
        .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let previous = if len == 0 {
            0
        } else {
            previous_generation(&file, &cfg.path)?
        };
        if len >= 36 {
            // Clients wait from here on: the file is about to be resized and
            // rewritten (a crashed daemon may have left it "ready").
            std::os::unix::fs::FileExt::write_at(
                &file,
                &(State::Initialising as u32).to_le_bytes(),
                32,
            )
            .map_err(io)?;
        }
        file.set_len(file_size(ring) as u64).map_err(io)?;
        allocate(&file, file_size(ring), &cfg.path).map_err(io)?;
        let map = memmap2::MmapOptions::new().map_raw(&file).map_err(io)?;
        let guard = Guard::register(map.as_ptr(), map.len());
        let generation = previous.max(floor).wrapping_add(1).max(1);
        let channel = Channel::initialise(map, ring, max, generation).map_err(|source| {
            ChannelError::Foreign {
                path: cfg.path.clone(),
                source,
            }
        })?;
        Ok(Self::serving(cfg, file, guard, channel, handler))
    }

    fn serving(
        cfg: &ShmRegionConfig,
        file: std::fs::File,
        guard: Option<Guard>,
        channel: Channel,
        handler: Arc<Handler>,
    ) -> Self {
        Self {
            name: Arc::from(cfg.name.as_str()),
            config: cfg.clone(),
            file,
            guard,
            shrank: AtomicBool::new(false),
            generation: channel.generation(),
            channel,
            handler,
            zero_copy: cfg.zero_copy,
            view_held_at_stop: AtomicBool::new(false),
            handover: Arc::default(),
        }
    }

    /// Serves until `ctx.stop` is cancelled (on a thread of its own, whose
    /// calls the stuck-call monitor watches), then marks the channel stopped,
    /// unless `handover` was set first: a replacement adopts the file then.
    /// A file found truncated under the mapping is initialised afresh (a new
    /// generation, so attached clients notice) and served again, at most
    /// [`REINIT_MAX`] times a minute.
    pub async fn run(self, ctx: Context, handover: Arc<AtomicBool>) {
        let mut this = self;
        let mut recent: Vec<Instant> = Vec::new();
        loop {
            let (name, config, handler, generation) = (
                this.name.clone(),
                this.config.clone(),
                this.handler.clone(),
                this.generation,
            );
            if this.serve_until_stopped(&ctx, handover.clone()).await == Ended::Stopped {
                return;
            }
            if ctx.intake.is_cancelled() || handover.load(Ordering::SeqCst) {
                // Stopping, or a replacement takes the file: not ours to redo.
                return;
            }
            let needed = file_size(layout(&config).0) as u64;
            let now = std::fs::metadata(&config.path).map_or(0, |m| m.len());
            let what = if now < needed {
                format!(
                    "was truncated while the daemon used it (it has {now} bytes, the channel needs {needed})"
                )
            } else {
                "has a page the system could not provide (is its file system full?)".to_string()
            };
            recent.retain(|t| t.elapsed() < Duration::from_secs(60));
            let fresh = if recent.len() >= REINIT_MAX {
                Err(format!("{REINIT_MAX} times within a minute"))
            } else {
                recent.push(Instant::now());
                tracing::error!(
                    role = %name,
                    path = %config.path.display(),
                    "the channel file {what}: initialising it afresh; requests not yet \
                     answered and replies not yet read are lost"
                );
                Self::create(&config, handler, generation).map_err(|e| e.to_string())
            };
            match fresh {
                Ok(fresh) => this = fresh,
                Err(e) => {
                    tracing::error!(role = %name, path = %config.path.display(), "the channel file {what}; not initialising it again: {e}");
                    ctx.down_until_stopped(&format!("channel file lost: {e}"))
                        .await;
                    return;
                }
            }
        }
    }

    /// Serves on a thread of its own until a stop or a truncated file.
    async fn serve_until_stopped(mut self, ctx: &Context, handover: Arc<AtomicBool>) -> Ended {
        self.handover = handover;
        let token = ctx.stop.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<Ended>();
        let name = self.name.clone();
        let flag = stop.clone();
        let this = Arc::new(self);
        let served = this.clone();
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("py-shm-{name}"))
            .spawn(move || {
                crate::py::output::set_thread_role(Some(&served.name));
                let ended = serve::serve(&served, &ctx, &flag);
                if ended == Ended::Stopped && !served.handover.load(Ordering::SeqCst) {
                    served.channel.set_state(State::Stopped);
                }
                let _ = done_tx.send(ended);
            });
        if let Err(e) = spawned {
            tracing::error!(role = %name, "cannot start the channel thread: {e}");
            return Ended::Stopped;
        }
        let ended = tokio::select! {
            _ = token.cancelled() => None,
            ended = &mut done_rx => Some(ended.unwrap_or(Ended::Stopped)),
        };
        let ended = match ended {
            Some(ended) => ended,
            None => {
                stop.store(true, Ordering::SeqCst);
                this.channel.bell(Dir::Request).wake();
                done_rx.await.unwrap_or(Ended::Stopped)
            }
        };
        if this.view_held_at_stop.load(Ordering::SeqCst) {
            // Python still holds a view into the mapping: never unmap it.
            tracing::warn!(role = %name, "a handler still holds a view of the channel's memory; leaving it mapped");
            std::mem::forget(this.clone());
        }
        if ended == Ended::Stopped {
            tracing::info!(role = %name, "channel stopped");
        }
        ended
    }

    /// Whether the file was found shorter than the mapping: a page of it
    /// touched past the end, or [`ShmChannel::check_length`].
    fn truncated(&self) -> bool {
        self.shrank.load(Ordering::Relaxed) || self.guard.as_ref().is_some_and(Guard::truncated)
    }

    /// Looks at the file's length (a system call: only while idle), for a
    /// truncation that left the pages the idle channel touches in place.
    fn check_length(&self) {
        let mapped = file_size(self.channel.ring_size()) as u64;
        if self.file.metadata().is_ok_and(|m| m.len() < mapped) {
            self.shrank.store(true, Ordering::Relaxed);
        }
    }
}

/// Why a channel thread ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The instance is stopping.
    Stopped,
    /// The file was found truncated under the mapping.
    Truncated,
}

/// Gives the file's `len` bytes backing store now, so that a full file
/// system fails here instead of as a `SIGBUS` on a later page fault. Only a
/// lack of space is an error: a file system or a system-call filter that
/// refuses the call leaves the file sparse, as it was before (logged).
#[allow(unsafe_code)]
fn allocate(file: &std::fs::File, len: usize, path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: a valid descriptor and a range within `off_t`.
        let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        match err {
            0 => return Ok(()),
            libc::EINTR => {}
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => {
                return Err(std::io::Error::from_raw_os_error(err));
            }
            e => {
                let e = std::io::Error::from_raw_os_error(e);
                tracing::warn!(path = %path.display(), "cannot reserve the channel file's space ({e}): a full file system will show later, as a lost page");
                return Ok(());
            }
        }
    }
}

/// The ring size and record limit `cfg` asks for, and how to report an I/O
/// error on its file.
fn layout(
    cfg: &ShmRegionConfig,
) -> (
    usize,
    usize,
    impl Fn(std::io::Error) -> ChannelError + Copy + '_,
) {
    let ring = usize::try_from(cfg.ring_size.as_u64()).unwrap_or(usize::MAX);
    let max = usize::try_from(cfg.max_message.as_u64()).unwrap_or(usize::MAX);
    let path = &cfg.path;
    let io = move |source| ChannelError::Io {
        path: path.clone(),
        source,
    };
    (ring, max, io)
}

/// The generation of an existing channel file, refusing anything that is not
/// one. A channel file of ours with another layout version or other sizes is
/// re-initialised (a new generation, so attached clients notice).
fn previous_generation(file: &std::fs::File, path: &std::path::Path) -> Result<u64, ChannelError> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 32];
    if file.read_exact_at(&mut head, 0).is_err() {
        // Shorter than a header: whatever it is, it is not a channel.
        return if head[..8] == [0u8; 8] {
            Ok(0)
        } else {
            Err(ChannelError::Foreign {
                path: path.to_path_buf(),
                source: LayoutError::Size("shorter than a header".into()),
            })
        };
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&head[..8]);
    if magic == [0u8; 8] {
        return Ok(0);
    }
    if magic != MAGIC {
        return Err(ChannelError::Foreign {
            path: path.to_path_buf(),
            source: LayoutError::Magic(magic),
        });
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != super::ring::VERSION {
        tracing::info!(path = %path.display(), "channel file of layout version {version}: re-initialising it as version {}", super::ring::VERSION);
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&head[24..32]);
    Ok(u64::from_le_bytes(generation))
}
