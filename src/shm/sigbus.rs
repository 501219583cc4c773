//! Surviving a shared file that shrinks under its mapping.
//!
//! Touching a page of a `MAP_SHARED` mapping that lies past the end of its
//! file raises `SIGBUS`, whose default action kills the process. Another
//! process can do that to the daemon at any time (`open(path, "wb")`,
//! `truncate`). A [`Guard`] registers a mapping with a process-wide `SIGBUS`
//! handler: a fault inside a registered mapping replaces the faulting page
//! with a private zero page (so the access completes, reading zeros) and
//! marks the guard [`Guard::truncated`]; its owner then logs it and drops
//! the mapping, which no longer mirrors the file. Faults anywhere else keep
//! their previous disposition (by default the process dies, as it would
//! without the guard).
//!
//! The handler only reads atomics and calls `mmap` and `sigaction`, both
//! plain system calls on Linux. It is installed when the first guard is
//! registered; Python's `faulthandler`, if a handler enables it later, sees
//! `SIGBUS` first and ends the process as before.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering, fence};

/// Mappings guarded at once; more are served unguarded (logged).
const SLOTS: usize = 64;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

/// A registered mapping, as the signal handler sees it.
struct Slot {
    /// Bumped before each change of `start` and `len` (a sequence lock).
    seq: AtomicU32,
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    faults: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    seq: AtomicU32::new(0),
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faults: AtomicU32::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
/// Whether the handler is in place (set once, on first use).
static INSTALLED: OnceLock<bool> = OnceLock::new();
/// The disposition found at install time, for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Our own disposition, to put back after a handler that resets it.
static OURS: OnceLock<libc::sigaction> = OnceLock::new();

/// A mapping registered with the `SIGBUS` handler, until dropped. Drop it
/// before the mapping is unmapped.
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers the `len` bytes at `start` (installing the handler on first
    /// use). `None`, with a warning logged, when the handler cannot be
    /// installed or every slot is taken: the mapping then works unguarded.
    pub fn register(start: *const u8, len: usize) -> Option<Self> {
        if !*INSTALLED.get_or_init(install) {
            tracing::warn!(
                "cannot install a SIGBUS handler: a shared file truncated under the daemon kills it"
            );
            return None;
        }
        for (i, slot) in TABLE.iter().enumerate() {
            if slot
                .state
                .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.seq.fetch_add(1, Ordering::Relaxed);
                fence(Ordering::Release);
                slot.start.store(start as usize, Ordering::Relaxed);
                slot.len.store(len, Ordering::Relaxed);
                slot.faults.store(0, Ordering::Relaxed);
                slot.state.store(LIVE, Ordering::Release);
                return Some(Self { slot: i });
            }
        }
        tracing::warn!(
            "{SLOTS} shared mappings are guarded already: this one is not (truncating its file kills the daemon)"
        );
        None
    }

    /// Whether a page of the mapping was found past the end of its file
    /// (and replaced by zeros in this process).
    pub fn truncated(&self) -> bool {
        TABLE[self.slot].faults.load(Ordering::Relaxed) > 0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &TABLE[self.slot];
        slot.state.store(BUSY, Ordering::Relaxed);
        slot.seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        slot.start.store(0, Ordering::Relaxed);
        slot.len.store(0, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Release);
    }
}

/// Installs [`on_sigbus`]; whether it is in place.
#[allow(unsafe_code)]
fn install() -> bool {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE_SIZE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: a zeroed sigaction is a valid value and sigaction() is given
    // valid pointers. PREVIOUS is set before the handler that reads it is.
    unsafe {
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
            return false;
        }
        let _ = PREVIOUS.set(previous);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        let _ = OURS.set(action);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0
    }
}

/// `si_code` of a `SIGBUS` for an address with no backing (past the end of
/// a file); signals sent with `kill` have a code of 0 or below.
const BUS_ADRERR: libc::c_int = 2;

#[allow(unsafe_code)]
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local and ours to save and restore.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let ours = code == BUS_ADRERR && zero_page_at(addr);
    if !ours {
        pass_on(sig, code, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Replaces the page holding `addr` with a zero page if a guarded mapping
/// holds it; whether it did.
#[allow(unsafe_code)]
fn zero_page_at(addr: usize) -> bool {
    let page_size = PAGE_SIZE.load(Ordering::Relaxed);
    for slot in &TABLE {
        let seq = slot.seq.load(Ordering::Acquire);
        if slot.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let (start, len) = (
            slot.start.load(Ordering::Relaxed),
            slot.len.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        if slot.seq.load(Ordering::Relaxed) != seq || addr < start || addr - start >= len {
            // Being registered or dropped meanwhile: not a consistent view.
            continue;
        }
        let page = addr & !(page_size - 1);
        // SAFETY: the page lies in a mapping its owner registered and keeps
        // alive; replacing it with a private zero page is the documented
        // effect of a fault there. The faulting access is retried when the
        // handler returns.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            slot.faults.fetch_add(1, Ordering::Relaxed);
            return true;
        }
    }
    false
}

/// Hands a signal that is not ours to the disposition found at install.
#[allow(unsafe_code)]
fn pass_on(
    sig: libc::c_int,
    code: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let (Some(previous), Some(ours)) = (PREVIOUS.get(), OURS.get()) else {
        return;
    };
    let handler = previous.sa_sigaction;
    let sent = code <= 0;
    if handler == libc::SIG_IGN && sent {
        return;
    }
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: a valid sigaction value, saved at install.
        unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
        if sent {
            // Delivered when this handler returns: the default action.
            // SAFETY: raise() is async-signal-safe.
            unsafe { libc::raise(sig) };
        }
        // A fault repeats when this handler returns and the kernel applies
        // the default action (a fault's SIGBUS cannot be ignored).
        return;
    }
    if previous.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed as an SA_SIGINFO one.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the previous handler was installed as a plain one.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
    if sent {
        // The previous handler may have reset the disposition (Rust's own
        // does): a sent signal must not disarm the guard.
        // SAFETY: a valid sigaction value, set at install.
        unsafe { libc::sigaction(libc::SIGBUS, ours, std::ptr::null_mut()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_page_past_the_end_of_the_file_reads_as_zeros_and_is_reported() {
        let page = 4096;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 3 * page]).unwrap();
        let map = memmap2::MmapOptions::new()
            .len(3 * page)
            .map_raw(&file)
            .unwrap();
        let guard = Guard::register(map.as_ptr(), map.len()).expect("guarded");
        assert!(!guard.truncated());
        file.set_len(page as u64).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: within the live mapping; the second page is past the end
        // of the file now, which is what the guard is for.
        let (kept, lost) = unsafe {
            (
                map.as_ptr().read_volatile(),
                map.as_ptr().add(page + 5).read_volatile(),
            )
        };
        assert_eq!((kept, lost), (7, 0));
        assert!(guard.truncated());
        // The replaced page is writable and private to this process.
        #[allow(unsafe_code)]
        // SAFETY: as above.
        unsafe {
            map.as_mut_ptr().add(2 * page).write_volatile(9)
        };
        assert_eq!(file.metadata().unwrap().len(), page as u64);
        drop(guard);
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_fault_outside_every_guarded_mapping_still_kills() {
        let page = 4096;
        let guarded = tempfile::tempfile().unwrap();
        guarded.set_len(page as u64).unwrap();
        let other = tempfile::tempfile().unwrap();
        other.set_len(2 * page as u64).unwrap();
        let (a, b) = (
            memmap2::MmapOptions::new().map_raw(&guarded).unwrap(),
            memmap2::MmapOptions::new().map_raw(&other).unwrap(),
        );
        let _guard = Guard::register(a.as_ptr(), a.len()).expect("guarded");
        other.set_len(0).unwrap();
        // SAFETY: the child only reads a page of its copy of the unguarded
        // mapping, past the end of its file, and exits; the parent waits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let _ = b.as_ptr().add(page).read_volatile();
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
                "status {status:#x}"
            );
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_sent_sigbus_goes_to_the_previous_handler_and_leaves_the_guard_armed() {
        let page = 4096;
        let file = tempfile::tempfile().unwrap();
        file.set_len(2 * page as u64).unwrap();
        let map = memmap2::MmapOptions::new().map_raw(&file).unwrap();
        let guard = Guard::register(map.as_ptr(), map.len()).expect("guarded");
        // SAFETY: the child raises SIGBUS (Rust's own handler, installed
        // before ours, takes it and returns), truncates the file, reads the
        // lost page and exits with what it read; the parent waits.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::raise(libc::SIGBUS);
                libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&file), 0);
                let byte = map.as_ptr().add(page).read_volatile();
                libc::_exit(if guard.truncated() {
                    40 + i32::from(byte)
                } else {
                    1
                });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 40,
                "status {status:#x}"
            );
        }
    }
}
