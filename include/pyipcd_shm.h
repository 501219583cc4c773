/* pyipcd_shm.h - single-header C11 client for a pyipcd shared-memory channel.
 *
 * Layout and protocol: docs/shm-protocol.md. Usage:
 *
 *     #include "pyipcd_shm.h"
 *     pyipcd_shm ch;
 *     int rc = pyipcd_shm_open(&ch, "/run/pyipcd/ch.shm", 5000);
 *     if (rc) { fprintf(stderr, "%s\n", pyipcd_shm_strerror(rc)); ... }
 *     uint32_t n, flags;
 *     rc = pyipcd_shm_call(&ch, "hi", 2, buf, sizeof buf, &n, &flags);
 *     pyipcd_shm_close(&ch);
 *
 * Everything is static inline; link nothing. Needs Linux (mmap, flock) and
 * lock-free 64-bit atomics (x86-64, aarch64), with GCC or Clang (__atomic
 * builtins). Compiles as C11 or later, strict (-std=c11) or not, and as
 * C++11 or later; it needs no feature-test macro from the includer, before
 * or after other system headers. One client per channel at a time
 * (an exclusive flock, released by the kernel if the process dies).
 */
#ifndef PYIPCD_SHM_H
#define PYIPCD_SHM_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PYIPCD_SHM_CLMUL 1
#endif

/* POSIX names that the C library hides in strict ISO C (-std=c11 without
 * _DEFAULT_SOURCE or _POSIX_C_SOURCE). The includer may have included system
 * headers before this one, so a feature-test macro defined here would come
 * too late: instead, when one is hidden, declare it with its POSIX type (C
 * allows a compatible redeclaration should it be declared again later).
 * glibc tells what it shows with __USE_*; musl shows pread and O_CLOEXEC
 * always and syscall with _GNU_SOURCE or _BSD_SOURCE (or _DEFAULT_SOURCE);
 * both keep CLOCK_MONOTONIC, clock_gettime and nanosleep together. C++
 * compilers on Linux define _GNU_SOURCE, which shows everything. */
#if !defined(CLOCK_MONOTONIC)
#define PYIPCD_SHM__HIDDEN_TIME 1
#endif
#if defined(__GLIBC__)
#if !defined(__USE_MISC)
#define PYIPCD_SHM__HIDDEN_SYSCALL 1
#endif
#if !defined(__USE_UNIX98) && !defined(__USE_XOPEN2K8)
#define PYIPCD_SHM__HIDDEN_PREAD 1
#endif
#elif !defined(_GNU_SOURCE) && !defined(_BSD_SOURCE)
#define PYIPCD_SHM__HIDDEN_SYSCALL 1
#endif
#if defined(PYIPCD_SHM__HIDDEN_TIME) || defined(PYIPCD_SHM__HIDDEN_SYSCALL) || defined(PYIPCD_SHM__HIDDEN_PREAD)
#if defined(__cplusplus)
#error "pyipcd_shm.h: the C library hides POSIX functions; compile with _GNU_SOURCE (g++ and clang++ define it on Linux)"
#elif !defined(__LP64__) || (!defined(__x86_64__) && !defined(__aarch64__))
#error "pyipcd_shm.h: on this target define _DEFAULT_SOURCE before including any system header"
#endif
#endif
#ifdef PYIPCD_SHM__HIDDEN_TIME
int clock_gettime(int, struct timespec *); /* clockid_t is int on Linux */
int nanosleep(const struct timespec *, struct timespec *);
#define PYIPCD_SHM__CLOCK_MONOTONIC 1 /* CLOCK_MONOTONIC on Linux */
#else
#define PYIPCD_SHM__CLOCK_MONOTONIC CLOCK_MONOTONIC
#endif
#ifdef PYIPCD_SHM__HIDDEN_SYSCALL
long syscall(long, ...);
#endif
#ifdef PYIPCD_SHM__HIDDEN_PREAD
ssize_t pread(int, void *, size_t, off_t);
#endif
#if defined(O_CLOEXEC)
#define PYIPCD_SHM__O_CLOEXEC O_CLOEXEC
#elif defined(__O_CLOEXEC) /* glibc without __USE_XOPEN2K8 */
#define PYIPCD_SHM__O_CLOEXEC __O_CLOEXEC
#else
#define PYIPCD_SHM__O_CLOEXEC 02000000 /* x86-64, aarch64 */
#endif
#undef PYIPCD_SHM__HIDDEN_TIME
#undef PYIPCD_SHM__HIDDEN_SYSCALL
#undef PYIPCD_SHM__HIDDEN_PREAD

/* The mapped words are accessed with the GCC/Clang __atomic builtins (the
 * operations of C11 <stdatomic.h>, which C++ cannot include). */
#if !defined(__GCC_ATOMIC_INT_LOCK_FREE) || __GCC_ATOMIC_INT_LOCK_FREE != 2 || \
    !defined(__GCC_ATOMIC_LLONG_LOCK_FREE) || __GCC_ATOMIC_LLONG_LOCK_FREE != 2
#error "pyipcd_shm.h needs GCC or Clang and lock-free 32- and 64-bit atomics"
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define PYIPCD_SHM_PAGE 4096u
#define PYIPCD_SHM_RECORD_HEADER 24u /* len, seq, crc32, flags (u32 each), epoch (u64) */
#define PYIPCD_SHM_WRAP 0xFFFFFFFFu
#define PYIPCD_SHM_VERSION 2u

/* Reply flags. */
#define PYIPCD_SHM_OK 0u
#define PYIPCD_SHM_NO_REPLY 1u
#define PYIPCD_SHM_ERROR 2u
#define PYIPCD_SHM_RESET 3u /* never returned in *flags: recv returns PYIPCD_SHM_ERESET */

/* Error codes (negative). */
enum {
    PYIPCD_SHM_EIO = -1,        /* open/mmap failed: see errno */
    PYIPCD_SHM_EMAGIC = -2,     /* not a pyipcd channel */
    PYIPCD_SHM_EVERSION = -3,   /* another layout version */
    PYIPCD_SHM_ESIZE = -4,      /* sizes do not fit */
    PYIPCD_SHM_EBUSY = -5,      /* another client is attached */
    PYIPCD_SHM_ENOTREADY = -6,  /* the daemon is not serving */
    PYIPCD_SHM_ERESTARTED = -7, /* the daemon restarted: reopen */
    PYIPCD_SHM_ESTOPPED = -8,   /* the daemon stopped */
    PYIPCD_SHM_ETOOLARGE = -9,  /* request over max_message */
    PYIPCD_SHM_ETIMEOUT = -10,  /* no progress in time */
    PYIPCD_SHM_ECORRUPT = -11,  /* reply failed its checksum or sequence */
    PYIPCD_SHM_ESPACE = -12,    /* reply buffer too small */
    PYIPCD_SHM_ERESET = -13,    /* the daemon dropped every request sent so far */
};

typedef struct {
    uint8_t *base;
    size_t len;
    int fd;
    uint32_t ring;
    uint32_t max_record;
    uint64_t generation;
    uint64_t epoch;
    uint32_t next_seq;
    int timeout_ms;
    int64_t spin_ns; /* adaptive spin budget before sleeping on a doorbell */
} pyipcd_shm;

static inline const char *pyipcd_shm_strerror(int rc) {
    switch (rc) {
    case 0: return "ok";
    case PYIPCD_SHM_EIO: return "cannot open or map the channel file";
    case PYIPCD_SHM_EMAGIC: return "bad magic: not a pyipcd channel";
    case PYIPCD_SHM_EVERSION: return "unsupported layout version";
    case PYIPCD_SHM_ESIZE: return "bad sizes in the channel header";
    case PYIPCD_SHM_EBUSY: return "another client is attached";
    case PYIPCD_SHM_ENOTREADY: return "the daemon is not serving this channel";
    case PYIPCD_SHM_ERESTARTED: return "the daemon restarted; reopen";
    case PYIPCD_SHM_ESTOPPED: return "the daemon stopped";
    case PYIPCD_SHM_ETOOLARGE: return "message over max_message";
    case PYIPCD_SHM_ETIMEOUT: return "timed out";
    case PYIPCD_SHM_ECORRUPT: return "corrupt reply";
    case PYIPCD_SHM_ESPACE: return "reply buffer too small";
    case PYIPCD_SHM_ERESET: return "the daemon lost the request framing and dropped every request sent so far";
    default: return "unknown error";
    }
}

/* ---- internals -------------------------------------------------------- */

static inline uint64_t *pyipcd_shm__u64(const pyipcd_shm *c, size_t off) {
    return (uint64_t *)(void *)(c->base + off);
}
static inline uint32_t *pyipcd_shm__u32(const pyipcd_shm *c, size_t off) {
    return (uint32_t *)(void *)(c->base + off);
}
static inline size_t pyipcd_shm__ctl(const pyipcd_shm *c, int response) {
    return response ? 2u * PYIPCD_SHM_PAGE + c->ring : PYIPCD_SHM_PAGE;
}
static inline size_t pyipcd_shm__data(const pyipcd_shm *c, int response) {
    return pyipcd_shm__ctl(c, response) + PYIPCD_SHM_PAGE;
}
static inline uint32_t pyipcd_shm__round8(uint32_t n) { return (n + 7u) & ~7u; }

/* The doorbell (docs/shm-protocol.md): after publishing, wake the ring's
 * consumer if it sleeps on the bell; a consumer sleeps on it after spinning. */
static inline void pyipcd_shm__ring(const pyipcd_shm *c, size_t ctl) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(pyipcd_shm__u32(c, ctl + 132), __ATOMIC_RELAXED) != 0u) {
        __atomic_fetch_add(pyipcd_shm__u32(c, ctl + 128), 1u, __ATOMIC_RELEASE);
        syscall(SYS_futex, (void *)pyipcd_shm__u32(c, ctl + 128), FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    }
}

/* Sleeps on a ring's bell for at most slice_us unless its tail moved from
 * seen_tail (what the caller last found nothing new behind). */
static inline void pyipcd_shm__sleep_on(const pyipcd_shm *c, size_t ctl, int64_t slice_us, uint64_t seen_tail) {
    uint32_t *bell = pyipcd_shm__u32(c, ctl + 128), *sleeping = pyipcd_shm__u32(c, ctl + 132);
    uint32_t seen = __atomic_load_n(bell, __ATOMIC_ACQUIRE);
    __atomic_store_n(sleeping, 1u, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(pyipcd_shm__u64(c, ctl), __ATOMIC_ACQUIRE) == seen_tail) {
        struct timespec ts = {(time_t)(slice_us / 1000000), (long)(slice_us % 1000000) * 1000};
        syscall(SYS_futex, (void *)bell, FUTEX_WAIT, seen, &ts, NULL, 0);
    }
    __atomic_store_n(sleeping, 0u, __ATOMIC_RELAXED);
}

#ifdef PYIPCD_SHM_CLMUL
/* CRC-32 by carry-less multiplication (PCLMULQDQ): the bit-reflected folding
 * and Barrett reduction of Gopal et al., "Fast CRC Computation for Generic
 * Polynomials Using PCLMULQDQ" (Intel, 2009). Constants, for the reflected
 * polynomial 0xEDB88320, are x^n mod P reflected and shifted left by one:
 * fold by 4 x 128 bits: n = 4*128+32, 4*128-32; by 128: n = 128+32, 128-32;
 * to 64 bits: n = 64; Barrett: P' = 0x1DB710641, mu' = floor(x^64/P)'.
 * Takes and returns the inverted running state; n >= 64. */
__attribute__((target("pclmul,sse4.1"))) static inline uint32_t pyipcd_shm__crc_clmul(uint32_t state,
                                                                                     const uint8_t *p, size_t n) {
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i barrett = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL);
    const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
    __m128i a = _mm_loadu_si128((const __m128i *)(const void *)p);
    __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(p + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(p + 32));
    __m128i d = _mm_loadu_si128((const __m128i *)(const void *)(p + 48));
    a = _mm_xor_si128(a, _mm_cvtsi32_si128((int)state));
    p += 64;
    n -= 64;
#define PYIPCD_SHM__FOLD(x, k, next)                                                                     \
    x = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), \
                      next)
    while (n >= 64) {
        PYIPCD_SHM__FOLD(a, k1k2, _mm_loadu_si128((const __m128i *)(const void *)p));
        PYIPCD_SHM__FOLD(b, k1k2, _mm_loadu_si128((const __m128i *)(const void *)(p + 16)));
        PYIPCD_SHM__FOLD(c, k1k2, _mm_loadu_si128((const __m128i *)(const void *)(p + 32)));
        PYIPCD_SHM__FOLD(d, k1k2, _mm_loadu_si128((const __m128i *)(const void *)(p + 48)));
        p += 64;
        n -= 64;
    }
    PYIPCD_SHM__FOLD(a, k3k4, b);
    PYIPCD_SHM__FOLD(a, k3k4, c);
    PYIPCD_SHM__FOLD(a, k3k4, d);
    while (n >= 16) {
        PYIPCD_SHM__FOLD(a, k3k4, _mm_loadu_si128((const __m128i *)(const void *)p));
        p += 16;
        n -= 16;
    }
#undef PYIPCD_SHM__FOLD
    /* 128 -> 96 -> 64 bits, then Barrett reduction to 32. */
    a = _mm_xor_si128(_mm_srli_si128(a, 8), _mm_clmulepi64_si128(a, k3k4, 0x10));
    a = _mm_xor_si128(_mm_srli_si128(a, 4), _mm_clmulepi64_si128(_mm_and_si128(a, low32), k5, 0x00));
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(a, low32), barrett, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), barrett, 0x00);
    state = (uint32_t)_mm_extract_epi32(_mm_xor_si128(a, t), 1);
    return state;
}
#endif

/* CRC-32 (IEEE, as zlib's crc32). Carry-less multiplication on x86-64 CPUs
 * that have it (16 bytes per step), else slicing-by-8 (little-endian hosts). */
static inline uint32_t pyipcd_shm_crc32(const uint8_t *p, size_t n) {
    static uint32_t t[8][256];
    static int state; /* 0 empty, 1 being built (by one thread), 2 ready */
    if (__atomic_load_n(&state, __ATOMIC_ACQUIRE) != 2) {
        int empty = 0;
        if (__atomic_compare_exchange_n(&state, &empty, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            for (uint32_t i = 0; i < 256; i++) {
                uint32_t c = i;
                for (int k = 0; k < 8; k++) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
                t[0][i] = c;
            }
            for (uint32_t i = 0; i < 256; i++)
                for (int k = 1; k < 8; k++) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFu];
            __atomic_store_n(&state, 2, __ATOMIC_RELEASE);
        } else {
            while (__atomic_load_n(&state, __ATOMIC_ACQUIRE) != 2) sched_yield();
        }
    }
    uint32_t crc = 0xFFFFFFFFu;
#ifdef PYIPCD_SHM_CLMUL
    if (n >= 64 && __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1")) {
        size_t whole = n & ~(size_t)15;
        crc = pyipcd_shm__crc_clmul(crc, p, whole);
        p += whole;
        n -= whole;
    }
#endif
    while (n >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        a ^= crc;
        crc = t[7][a & 0xFFu] ^ t[6][(a >> 8) & 0xFFu] ^ t[5][(a >> 16) & 0xFFu] ^ t[4][a >> 24] ^
              t[3][b & 0xFFu] ^ t[2][(b >> 8) & 0xFFu] ^ t[1][(b >> 16) & 0xFFu] ^ t[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = t[0][(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

static inline int64_t pyipcd_shm__now_us(void) {
    struct timespec ts;
    clock_gettime(PYIPCD_SHM__CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Waits once more for progress; checks the daemon. 0 to go on, or an error.
 * Without a doorbell (waiting for room): spin, then yield and short sleeps.
 * With one (bell_ctl, waiting for a reply): spin for the adaptive budget,
 * then sleep on the ring's doorbell; *slept records that spinning did not
 * pay, and the caller adapts the budget (doubling to 50 us when a spin saw
 * the reply, halving to 2 us when it had to sleep), so a partner that is not
 * running, as on a busy host, soon costs almost no spinning. */
static inline int pyipcd_shm__wait(pyipcd_shm *c, int64_t start_us, unsigned *spins, size_t bell_ctl, int *slept,
                                   uint64_t seen_tail) {
    if (__atomic_load_n(pyipcd_shm__u64(c, 24), __ATOMIC_ACQUIRE) != c->generation)
        return PYIPCD_SHM_ERESTARTED;
    if (__atomic_load_n(pyipcd_shm__u32(c, 32), __ATOMIC_ACQUIRE) == 2u) return PYIPCD_SHM_ESTOPPED;
    ++*spins;
    if (bell_ctl) {
        if (!*slept && ((*spins & 31u) != 0u || pyipcd_shm__now_us() * 1000 - start_us * 1000 < c->spin_ns))
            return 0;
    } else if (*spins < 2000u) {
        return 0;
    }
    int64_t waited = pyipcd_shm__now_us() - start_us, left = (int64_t)c->timeout_ms * 1000 - waited;
    if (left <= 0) return PYIPCD_SHM_ETIMEOUT;
    if (bell_ctl) {
        *slept = 1;
        pyipcd_shm__sleep_on(c, bell_ctl, left < 50000 ? left : 50000, seen_tail);
    } else if (waited < 2000) {
        sched_yield();
    } else {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

/* After a wait for a reply: adapt the spin budget. */
static inline void pyipcd_shm__adapt(pyipcd_shm *c, int slept) {
    int64_t next = slept ? c->spin_ns / 2 : c->spin_ns * 2;
    c->spin_ns = next < 2000 ? 2000 : next > 50000 ? 50000 : next;
}

/* ---- API -------------------------------------------------------------- */

/* Attaches: takes the client lock, waits up to timeout_ms for the daemon to
 * be ready, maps and checks the layout, starts a new client epoch. 0 or an error. */
static inline int pyipcd_shm_open(pyipcd_shm *c, const char *path, int timeout_ms) {
    memset(c, 0, sizeof *c);
    c->timeout_ms = timeout_ms;
    c->fd = open(path, O_RDWR | PYIPCD_SHM__O_CLOEXEC);
    if (c->fd < 0) return PYIPCD_SHM_EIO;
    if (flock(c->fd, LOCK_EX | LOCK_NB) != 0) {
        close(c->fd);
        return PYIPCD_SHM_EBUSY;
    }
    /* Ready before anything else is read: a daemon (re)initialising the file
     * may be resizing it and rewriting the header. */
    int64_t start = pyipcd_shm__now_us();
    for (;;) {
        uint8_t h[44] = {0};
        uint32_t version, state;
        int full = pread(c->fd, h, sizeof h, 0) == (ssize_t)sizeof h;
        static const uint8_t zeros[8] = {0};
        int ours = memcmp(h, "PYIPCSH1", 8) == 0;
        memcpy(&version, h + 8, 4);
        memcpy(&state, h + 32, 4);
        if (full && !ours && memcmp(h, zeros, 8) != 0) { /* never a channel being set up */
            close(c->fd);
            return PYIPCD_SHM_EMAGIC;
        }
        if (ours && state == 1u) break;
        if (pyipcd_shm__now_us() - start > (int64_t)timeout_ms * 1000) {
            close(c->fd);
            return ours && version != PYIPCD_SHM_VERSION ? PYIPCD_SHM_EVERSION : PYIPCD_SHM_ENOTREADY;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    struct stat st;
    if (fstat(c->fd, &st) != 0 || st.st_size < (off_t)PYIPCD_SHM_PAGE) {
        close(c->fd);
        return PYIPCD_SHM_ESIZE;
    }
    c->len = (size_t)st.st_size;
    void *m = mmap(NULL, c->len, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, 0);
    if (m == MAP_FAILED) {
        close(c->fd);
        return PYIPCD_SHM_EIO;
    }
    c->base = (uint8_t *)m;
    int rc = 0;
    uint32_t version, header;
    memcpy(&version, c->base + 8, 4);
    memcpy(&header, c->base + 12, 4);
    memcpy(&c->ring, c->base + 16, 4);
    memcpy(&c->max_record, c->base + 20, 4);
    if (memcmp(c->base, "PYIPCSH1", 8) != 0) rc = PYIPCD_SHM_EMAGIC;
    else if (version != PYIPCD_SHM_VERSION) rc = PYIPCD_SHM_EVERSION;
    else if (header != PYIPCD_SHM_PAGE || c->ring < PYIPCD_SHM_PAGE || (c->ring & (c->ring - 1)) ||
             c->len < PYIPCD_SHM_PAGE + 2u * ((size_t)PYIPCD_SHM_PAGE + c->ring) || c->max_record == 0 ||
             PYIPCD_SHM_RECORD_HEADER + pyipcd_shm__round8(c->max_record) > c->ring / 2)
        rc = PYIPCD_SHM_ESIZE;
    if (rc == 0) {
        __atomic_store_n(pyipcd_shm__u32(c, 40), (uint32_t)getpid(), __ATOMIC_RELEASE);
        c->generation = __atomic_load_n(pyipcd_shm__u64(c, 24), __ATOMIC_ACQUIRE);
        c->spin_ns = 20000;
        /* A new epoch: the daemon drops the previous client's requests and
         * replies from now on; what is in the response ring is not ours. */
        c->epoch = __atomic_load_n(pyipcd_shm__u64(c, 48), __ATOMIC_ACQUIRE) + 1u;
        __atomic_store_n(pyipcd_shm__u64(c, 48), c->epoch, __ATOMIC_RELEASE);
        size_t resp = pyipcd_shm__ctl(c, 1);
        uint64_t t = __atomic_load_n(pyipcd_shm__u64(c, resp), __ATOMIC_ACQUIRE);
        __atomic_store_n(pyipcd_shm__u64(c, resp + 64), t, __ATOMIC_RELEASE);
        /* A dead predecessor may have left its "asleep" flag set. */
        __atomic_store_n(pyipcd_shm__u32(c, resp + 132), 0u, __ATOMIC_RELAXED);
    }
    if (rc != 0) {
        munmap(c->base, c->len);
        close(c->fd);
        c->base = NULL;
    }
    return rc;
}

static inline void pyipcd_shm_close(pyipcd_shm *c) {
    if (c->base) {
        munmap(c->base, c->len);
        close(c->fd);
        c->base = NULL;
    }
}

/* Queues a request, waiting while the ring is full. Returns its seq (>= 0) or an error. */
static inline int64_t pyipcd_shm_send(pyipcd_shm *c, const void *data, uint32_t len) {
    if (len > c->max_record) return PYIPCD_SHM_ETOOLARGE;
    size_t ctl = pyipcd_shm__ctl(c, 0), base = pyipcd_shm__data(c, 0);
    uint32_t need = PYIPCD_SHM_RECORD_HEADER + pyipcd_shm__round8(len);
    int64_t start = pyipcd_shm__now_us();
    unsigned spins = 0;
    int slept = 0;
    for (;;) {
        uint64_t tail = __atomic_load_n(pyipcd_shm__u64(c, ctl), __ATOMIC_RELAXED);
        uint64_t head = __atomic_load_n(pyipcd_shm__u64(c, ctl + 64), __ATOMIC_ACQUIRE);
        uint32_t pos = (uint32_t)(tail % c->ring), room = c->ring - pos;
        uint32_t skip = room < need ? room : 0;
        if (tail + skip + need - head <= c->ring) {
            uint32_t at = pos;
            if (skip) {
                if (skip >= PYIPCD_SHM_RECORD_HEADER)
                    __atomic_store_n(pyipcd_shm__u32(c, base + at), PYIPCD_SHM_WRAP, __ATOMIC_RELAXED);
                at = 0;
            }
            uint32_t hdr[4] = {len, c->next_seq, pyipcd_shm_crc32((const uint8_t *)data, len), PYIPCD_SHM_OK};
            memcpy(c->base + base + at, hdr, sizeof hdr);
            memcpy(c->base + base + at + 16, &c->epoch, 8);
            memcpy(c->base + base + at + PYIPCD_SHM_RECORD_HEADER, data, len);
            __atomic_store_n(pyipcd_shm__u64(c, ctl), tail + skip + need, __ATOMIC_RELEASE);
            pyipcd_shm__ring(c, ctl);
            return c->next_seq++;
        }
        int rc = pyipcd_shm__wait(c, start, &spins, 0, &slept, 0);
        if (rc) return rc;
    }
}

/* Takes the next reply into buf. On success returns its seq (>= 0), sets
 * *len and *flags (PYIPCD_SHM_OK, _NO_REPLY, or _ERROR with the error text).
 * PYIPCD_SHM_ERESET: the daemon dropped every request sent so far (the
 * error text is in buf, *len bytes); none still outstanding will be answered. */
static inline int64_t pyipcd_shm_recv(pyipcd_shm *c, void *buf, uint32_t cap, uint32_t *len, uint32_t *flags) {
    size_t ctl = pyipcd_shm__ctl(c, 1), base = pyipcd_shm__data(c, 1);
    int64_t start = pyipcd_shm__now_us();
    unsigned spins = 0;
    int slept = 0;
    for (;;) {
        uint64_t head = __atomic_load_n(pyipcd_shm__u64(c, ctl + 64), __ATOMIC_RELAXED);
        uint64_t tail = __atomic_load_n(pyipcd_shm__u64(c, ctl), __ATOMIC_ACQUIRE);
        int skips = 0;
        while (head != tail) {
            uint32_t pos = (uint32_t)(head % c->ring), room = c->ring - pos;
            uint32_t hdr[4];
            uint64_t epoch;
            /* Positions no daemon could publish, or a second skip in a row:
             * the framing is lost. */
            if (tail - head > c->ring || head % 8u || skips > 1) {
                __atomic_store_n(pyipcd_shm__u64(c, ctl + 64), tail, __ATOMIC_RELEASE);
                return PYIPCD_SHM_ECORRUPT;
            }
            if (room < PYIPCD_SHM_RECORD_HEADER) { head += room; skips++; continue; }
            memcpy(hdr, c->base + base + pos, sizeof hdr);
            if (hdr[0] == PYIPCD_SHM_WRAP) { head += room; skips++; continue; }
            skips = 0;
            memcpy(&epoch, c->base + base + pos + 16, 8);
            uint64_t need = PYIPCD_SHM_RECORD_HEADER + (((uint64_t)hdr[0] + 7u) & ~(uint64_t)7u);
            if (need > room || head + need > tail) { /* framing lost */
                __atomic_store_n(pyipcd_shm__u64(c, ctl + 64), tail, __ATOMIC_RELEASE);
                return PYIPCD_SHM_ECORRUPT;
            }
            if (epoch != c->epoch) { /* another client's reply, pushed before the daemon saw our epoch */
                head += need;
                __atomic_store_n(pyipcd_shm__u64(c, ctl + 64), head, __ATOMIC_RELEASE);
                continue;
            }
            if (hdr[0] > c->max_record) {
                __atomic_store_n(pyipcd_shm__u64(c, ctl + 64), head + need, __ATOMIC_RELEASE);
                return PYIPCD_SHM_ECORRUPT;
            }
            if (hdr[0] > cap) return PYIPCD_SHM_ESPACE;
            memcpy(buf, c->base + base + pos + PYIPCD_SHM_RECORD_HEADER, hdr[0]);
            __atomic_store_n(pyipcd_shm__u64(c, ctl + 64), head + need, __ATOMIC_RELEASE);
            pyipcd_shm__adapt(c, slept);
            if (pyipcd_shm_crc32((const uint8_t *)buf, hdr[0]) != hdr[2]) return PYIPCD_SHM_ECORRUPT;
            *len = hdr[0];
            if (hdr[3] == PYIPCD_SHM_RESET) return PYIPCD_SHM_ERESET;
            *flags = hdr[3];
            return hdr[1];
        }
        int rc = pyipcd_shm__wait(c, start, &spins, ctl, &slept, tail);
        if (rc) return rc;
    }
}

/* Sends and waits for the matching reply. 0 on success (check *flags), or an error. */
static inline int pyipcd_shm_call(pyipcd_shm *c, const void *req, uint32_t req_len, void *reply, uint32_t cap,
                                  uint32_t *reply_len, uint32_t *flags) {
    int64_t seq = pyipcd_shm_send(c, req, req_len);
    if (seq < 0) return (int)seq;
    int64_t got = pyipcd_shm_recv(c, reply, cap, reply_len, flags);
    if (got < 0) return (int)got;
    return got == seq ? 0 : PYIPCD_SHM_ECORRUPT;
}

#ifdef __cplusplus
} /* extern "C" */
#endif

#undef PYIPCD_SHM__CLOCK_MONOTONIC
#undef PYIPCD_SHM__O_CLOEXEC

#endif /* PYIPCD_SHM_H */
