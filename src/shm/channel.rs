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

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::doorbell::Spin;
use super::ring::{Channel, Dir, Fault, InPlace, LayoutError, MAGIC, State, file_size, flags};
use super::sigbus::Guard;
use crate::admin::series::{self, MessageSeries};
use crate::config::ShmRegionConfig;
use crate::py::handler::{Handler, HandlerError, Runs, format_exception, with_reply_bytes};
use crate::py::lent::Returned;
use crate::py::target::ResolveError;
use crate::role::Context;

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
        allocate(&file, file_size(ring)).map_err(io)?;
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
            let why = if recent.len() >= REINIT_MAX {
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
            match why {
                Ok(fresh) => this = fresh,
                Err(e) => {
                    tracing::error!(role = %name, path = %config.path.display(), "the channel file {what}; not initialising it again: {e}");
                    ctx.health.down(&format!("channel file lost: {e}"));
                    // Down until stopped, not "stopped by itself".
                    ctx.stop.cancelled().await;
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
                let ended = serve(&served, &ctx, &flag);
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
/// system fails here instead of as a `SIGBUS` on a later page fault.
#[allow(unsafe_code)]
fn allocate(file: &std::fs::File, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor and a range within `off_t`.
    let err = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match err {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
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

/// What serving one record left to do.
enum Flow {
    /// Go on with the next record.
    Next,
    /// The daemon is stopping.
    Stop,
}

/// The channel's metrics.
struct Counters {
    series: MessageSeries,
    stale: metrics::Counter,
    /// Whether calls are timed (only when a recorder is installed).
    timed: bool,
}

fn serve(ch: &ShmChannel, ctx: &Context, stop: &AtomicBool) -> Ended {
    let channel = &ch.channel;
    let role = ch.name.to_string();
    let counters = Counters {
        series: MessageSeries::register(&role),
        stale: series::channel_stale(&role),
        timed: crate::admin::metrics_enabled(),
    };
    Python::attach(|py| {
        let watched = ctx
            .monitor
            .watch(py, &format!("py-shm-{}", ch.name), ctx.health.clone());
        channel.set_state(State::Ready);
        // Logged once clients can attach.
        tracing::info!(
            role = %ch.name,
            generation = channel.generation(),
            ring = channel.ring_size(),
            max_message = channel.max_record(),
            zero_copy = ch.zero_copy,
            "channel ready"
        );
        let mut spin = Spin::default();
        loop {
            // Checked before each request, not only when idle: a busy client
            // must not keep a stopping instance (or its replacement) waiting.
            // What is left in the ring is answered by the replacement, if any.
            if stop.load(Ordering::Relaxed) {
                return Ended::Stopped;
            }
            if ch.truncated() {
                // Nothing more is read or written through this mapping.
                return Ended::Truncated;
            }
            // The request stays in the ring (its space held) until it is
            // answered: zero-copy handlers read it where it lies.
            let served = channel.pop_in_place(Dir::Request, |request| {
                serve_one(py, ch, &request, stop, &counters, |call| watched.call(call))
            });
            match served {
                Some(Flow::Next) => {}
                Some(Flow::Stop) => return Ended::Stopped,
                None => {
                    if stop.load(Ordering::Relaxed) {
                        return Ended::Stopped;
                    }
                    // Without the GIL until the client publishes, a stop or
                    // a truncated file.
                    let news = || {
                        channel.readable(Dir::Request)
                            || stop.load(Ordering::Relaxed)
                            || ch.truncated()
                    };
                    py.detach(|| {
                        let bell = channel.bell(Dir::Request);
                        while !bell.wait(&mut spin, STOP_CHECK, news) {
                            ch.check_length();
                        }
                    });
                }
            }
        }
    })
}

/// Answers one request: its fault, or the handler's reply, pushed straight
/// from Python's bytes into the response ring. `watch` runs the handler call
/// under the stuck-call monitor.
fn serve_one<'py>(
    py: Python<'py>,
    ch: &ShmChannel,
    request: &InPlace<'_>,
    stop: &AtomicBool,
    counters: &Counters,
    watch: impl FnOnce(
        &mut dyn FnMut() -> Result<Bound<'py, PyAny>, HandlerError>,
    ) -> Result<Bound<'py, PyAny>, HandlerError>,
) -> Flow {
    let channel = &ch.channel;
    if ch.truncated() {
        // Read from zero pages, maybe: the serving loop ends at once.
        return Flow::Next;
    }
    // A framing fault has no trustworthy epoch: it concerns whoever is
    // attached now.
    let epoch = match request.fault {
        Some(Fault::Framing { .. }) => channel.epoch(),
        _ => request.epoch,
    };
    if epoch != channel.epoch() {
        // Sent by a client that has gone: its side effects would be for
        // nobody, and its reply must not reach the next client.
        counters.stale.increment(1);
        tracing::debug!(role = %ch.name, seq = request.seq, epoch, "dropped a request of a client that has gone");
        return Flow::Next;
    }
    let started = counters.timed.then(Instant::now);
    let push = |fl: u32, reply: &[u8]| {
        if fl >= flags::ERROR {
            counters.series.errors.increment(1);
        }
        if let Some(t) = started {
            counters.series.latency.record(t.elapsed());
        }
        push_reply(py, ch, request.seq, fl, epoch, reply, stop, counters)
    };
    counters.series.messages.increment(1);
    crate::workers::identity::note_requests(1);
    counters
        .series
        .bytes_in
        .increment(request.payload.len() as u64);
    if let Some((fl, text)) = fault_reply(ch, request) {
        return push(fl, &text);
    }
    let max = channel.max_record();
    let answer = |called: Result<Bound<'py, PyAny>, HandlerError>,
                  view: Option<&Bound<'py, PyAny>>| {
        let obj = match called {
            Ok(obj) => obj,
            Err(e) => return push(flags::ERROR, e.summary.as_bytes()),
        };
        if view.is_some_and(|v| obj.is(v)) {
            // Echoing the lent view: the bytes are right there.
            return push(flags::OK, request.payload);
        }
        let pushed = with_reply_bytes(&obj, |reply| {
            if reply.len() <= max {
                push(flags::OK, reply)
            } else {
                tracing::warn!(role = %ch.name, "reply of {} bytes is over max_message ({max})", reply.len());
                push(
                    flags::ERROR,
                    format!("reply over max_message ({max} bytes)").as_bytes(),
                )
            }
        });
        match pushed {
            Ok(Some(flow)) => flow,
            Ok(None) => push(flags::NO_REPLY, &[]),
            Err(e) => {
                let e = ch.handler.error(py, &e);
                push(flags::ERROR, e.summary.as_bytes())
            }
        }
    };
    if ch.zero_copy {
        // A view read while the file is truncated shows zeros; the reply to
        // it is then dropped (`push_reply`).
        let lent = crate::py::lent::lend(py, request.payload, &ch.name, stop, |view| {
            let called = watch(&mut || ch.handler.call_with(py, view.clone(), None));
            answer(called, Some(view))
        });
        match lent {
            Ok(Returned::Free(flow)) => flow,
            Ok(Returned::StillHeld(_)) => {
                // Stopping with a view of the mapping still alive in Python:
                // the mapping must outlive it (see ShmChannel::run).
                ch.view_held_at_stop.store(true, Ordering::SeqCst);
                Flow::Stop
            }
            Err(e) => push(flags::ERROR, format_exception(py, &e).as_bytes()),
        }
    } else {
        let copy = crate::copy::py_bytes(py, request.payload).into_any();
        if ch.truncated() {
            // The copy may hold zeros that passed the checksum: not a request.
            return Flow::Next;
        }
        let called = watch(&mut || ch.handler.call_with(py, copy.clone(), None));
        answer(called, None)
    }
}

/// The error reply a faulty request record gets, if it is one.
fn fault_reply(ch: &ShmChannel, request: &InPlace<'_>) -> Option<(u32, Vec<u8>)> {
    let max = ch.channel.max_record();
    let (fl, text) = match request.fault? {
        Fault::Checksum => (
            flags::ERROR,
            format!("request {} failed its checksum", request.seq),
        ),
        Fault::OverMax { len } => (flags::ERROR, format!("length {len} over max {max}")),
        Fault::Framing { len, dropped } => (
            flags::RESET,
            format!(
                "framing lost: a record claims length {len}, which cannot fit; dropped \
                 {dropped} bytes of requests, none sent before this reply will be answered"
            ),
        ),
    };
    tracing::warn!(role = %ch.name, seq = request.seq, "bad request record: {text}");
    Some((fl, text.into_bytes()))
}

/// Pushes a reply, waiting (GIL released) while the client is not reading
/// its replies; never overwrites. A new client attaching ends the wait and
/// drops the reply (it was for the client that has gone).
#[allow(clippy::too_many_arguments)]
fn push_reply(
    py: Python<'_>,
    ch: &ShmChannel,
    seq: u32,
    fl: u32,
    epoch: u64,
    reply: &[u8],
    stop: &AtomicBool,
    counters: &Counters,
) -> Flow {
    let channel = &ch.channel;
    // Error texts (a traceback line, CPython's message) are cut to fit.
    let reply = &reply[..reply.len().min(channel.max_record())];
    let mut handing_over = None;
    while channel.epoch() == epoch && !ch.truncated() {
        if channel.try_push(Dir::Response, seq, fl, epoch, reply) {
            counters.series.bytes_out.increment(reply.len() as u64);
            return Flow::Next;
        }
        if stop.load(Ordering::Relaxed) {
            if !ch.handover.load(Ordering::SeqCst) {
                return Flow::Stop;
            }
            // Handing the file over: this request was taken from the ring,
            // so only this instance can answer it. Wait for the client to
            // make room, for a while.
            let since = *handing_over.get_or_insert_with(Instant::now);
            if since.elapsed() > HANDOVER_REPLY_WAIT {
                tracing::warn!(role = %ch.name, seq, "handing the channel over: the client read no reply for {HANDOVER_REPLY_WAIT:?}; its reply to request {seq} is lost");
                return Flow::Stop;
            }
        }
        py.detach(|| std::thread::sleep(Duration::from_micros(100)));
    }
    counters.stale.increment(1);
    tracing::debug!(role = %ch.name, seq, epoch, "dropped a reply: its client has gone");
    Flow::Next
}
