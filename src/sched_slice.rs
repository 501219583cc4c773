//! A short scheduler slice for the daemon's threads. On Linux 6.12 and
//! later a thread of the ordinary policies may ask for its own time slice
//! (`sched_setattr` with `sched_runtime`): with a short one its virtual
//! deadline comes sooner, so when a message wakes it on a host whose cores
//! are busy with other processes it runs sooner instead of waiting behind
//! their longer slices. It does not change the CPU share a thread gets.
//! Requested once, on the main thread before any other starts: every thread
//! the daemon starts later (and the worker processes it runs) inherit it.
//! Older kernels ignore the request; the policy and nice value a service
//! manager set are kept.

use std::time::Duration;

/// `SCHED_OTHER` and `SCHED_BATCH`, the policies whose slice may be set.
const FAIR_POLICIES: [u32; 2] = [0, 3];
/// `SCHED_FLAG_KEEP_PARAMS` and `SCHED_FLAG_KEEP_POLICY`: never sent back.
const KEEP_FLAGS: u64 = 0x08 | 0x10;

/// `struct sched_attr` (`SCHED_ATTR_SIZE_VER1`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// What became of a request.
#[derive(Debug)]
pub enum Outcome {
    /// The calling thread's slice is now the one asked for.
    Set,
    /// The kernel took the request but has no per-thread slices (before 6.12).
    Unsupported,
    /// The thread runs under another policy (real-time, idle): left alone.
    OtherPolicy,
    /// The kernel refused (a seccomp filter, say).
    Refused(std::io::Error),
}

/// Asks for a time slice of `slice` for the calling thread (and the threads
/// it starts later).
pub fn request(slice: Duration) -> Outcome {
    let Some(mut attr) = get() else {
        return Outcome::Refused(std::io::Error::last_os_error());
    };
    if !FAIR_POLICIES.contains(&attr.policy) {
        return Outcome::OtherPolicy;
    }
    let wanted = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    attr.runtime = wanted;
    attr.flags &= !KEEP_FLAGS;
    if let Err(e) = set(&attr) {
        return Outcome::Refused(e);
    }
    match get() {
        Some(now) if now.runtime == wanted => Outcome::Set,
        _ => Outcome::Unsupported,
    }
}

/// The calling thread's time slice, as the kernel reports it (before 6.12: 0).
pub fn current() -> Option<Duration> {
    get().map(|a| Duration::from_nanos(a.runtime))
}

/// Logs what [`request`] did (once, at start).
pub fn request_and_log(slice: Duration) {
    if slice.is_zero() {
        return;
    }
    match request(slice) {
        Outcome::Set => tracing::debug!("scheduler slice {slice:?} for the daemon's threads"),
        Outcome::Unsupported => tracing::debug!(
            "daemon.sched_slice: this kernel has no per-thread time slices (Linux 6.12+); ignored"
        ),
        Outcome::OtherPolicy => tracing::info!(
            "daemon.sched_slice: the daemon runs under a real-time or idle policy; its slice is left as it is"
        ),
        Outcome::Refused(e) => tracing::warn!(
            "daemon.sched_slice: the kernel refused a {slice:?} time slice ({e}); the default applies (under systemd, allow sched_setattr in SystemCallFilter=)"
        ),
    }
}

#[allow(unsafe_code)]
fn get() -> Option<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = u32::try_from(std::mem::size_of::<SchedAttr>()).ok()?;
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a
    // `struct sched_attr` of that size, for the calling thread (pid 0).
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            std::ptr::from_mut(&mut attr),
            size,
            0,
        )
    };
    (r == 0).then_some(attr)
}

#[allow(unsafe_code)]
fn set(attr: &SchedAttr) -> std::io::Result<()> {
    let mut attr = *attr;
    attr.size = u32::try_from(std::mem::size_of::<SchedAttr>()).unwrap_or(48);
    // SAFETY: sched_setattr reads a `struct sched_attr` of `attr.size`
    // bytes; it applies to the calling thread (pid 0).
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(&attr), 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_the_slice_and_passes_it_on() {
        std::thread::spawn(|| {
            let before = current().expect("sched_getattr");
            match request(Duration::from_micros(100)) {
                Outcome::Set => {
                    assert_eq!(current(), Some(Duration::from_micros(100)));
                    let child = std::thread::spawn(current).join().unwrap();
                    assert_eq!(child, Some(Duration::from_micros(100)), "inherited");
                }
                Outcome::Unsupported => assert_eq!(current(), Some(before)),
                other => panic!("{other:?}"),
            }
        })
        .join()
        .unwrap();
    }
}
