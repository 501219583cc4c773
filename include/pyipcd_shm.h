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
 * lock-free 64-bit atomics (x86-64, aarch64). One client per channel at a time
 * (an exclusive flock, released by the kernel if the process dies).
 */
#ifndef PYIPCD_SHM_H
#define PYIPCD_SHM_H

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

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

static inline _Atomic uint64_t *pyipcd_shm__u64(const pyipcd_shm *c, size_t off) {
    return (_Atomic uint64_t *)(void *)(c->base + off);
}
static inline _Atomic uint32_t *pyipcd_shm__u32(const pyipcd_shm *c, size_t off) {
    return (_Atomic uint32_t *)(void *)(c->base + off);
}
static inline size_t pyipcd_shm__ctl(const pyipcd_shm *c, int response) {
    return response ? 2u * PYIPCD_SHM_PAGE + c->ring : PYIPCD_SHM_PAGE;
}
static inline size_t pyipcd_shm__data(const pyipcd_shm *c, int response) {
    return pyipcd_shm__ctl(c, response) + PYIPCD_SHM_PAGE;
}
static inline uint32_t pyipcd_shm__round8(uint32_t n) { return (n + 7u) & ~7u; }

/* CRC-32 (IEEE, as zlib), slicing-by-8 (little-endian hosts). */
static inline uint32_t pyipcd_shm_crc32(const uint8_t *p, size_t n) {
    static uint32_t t[8][256];
    static atomic_int ready;
    if (!atomic_load_explicit(&ready, memory_order_acquire)) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; i++)
            for (int k = 1; k < 8; k++) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFu];
        atomic_store_explicit(&ready, 1, memory_order_release);
    }
    uint32_t crc = 0xFFFFFFFFu;
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
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Spin, then yield, then sleep; checks the daemon. 0 to go on, or an error. */
static inline int pyipcd_shm__wait(const pyipcd_shm *c, int64_t start_us, unsigned *spins) {
    if (atomic_load_explicit(pyipcd_shm__u64(c, 24), memory_order_acquire) != c->generation)
        return PYIPCD_SHM_ERESTARTED;
    if (atomic_load_explicit(pyipcd_shm__u32(c, 32), memory_order_acquire) == 2u) return PYIPCD_SHM_ESTOPPED;
    if (++*spins < 2000u) return 0;
    int64_t waited = pyipcd_shm__now_us() - start_us;
    if (waited > (int64_t)c->timeout_ms * 1000) return PYIPCD_SHM_ETIMEOUT;
    if (waited < 2000) {
        sched_yield();
    } else {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

/* ---- API -------------------------------------------------------------- */

/* Attaches: takes the client lock, waits up to timeout_ms for the daemon to
 * be ready, maps and checks the layout, starts a new client epoch. 0 or an error. */
static inline int pyipcd_shm_open(pyipcd_shm *c, const char *path, int timeout_ms) {
    memset(c, 0, sizeof *c);
    c->timeout_ms = timeout_ms;
    c->fd = open(path, O_RDWR | O_CLOEXEC);
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
        static const uint8_t zeros[8];
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
        atomic_store_explicit(pyipcd_shm__u32(c, 40), (uint32_t)getpid(), memory_order_release);
        c->generation = atomic_load_explicit(pyipcd_shm__u64(c, 24), memory_order_acquire);
        /* A new epoch: the daemon drops the previous client's requests and
         * replies from now on; what is in the response ring is not ours. */
        c->epoch = atomic_load_explicit(pyipcd_shm__u64(c, 48), memory_order_acquire) + 1u;
        atomic_store_explicit(pyipcd_shm__u64(c, 48), c->epoch, memory_order_release);
        size_t resp = pyipcd_shm__ctl(c, 1);
        uint64_t t = atomic_load_explicit(pyipcd_shm__u64(c, resp), memory_order_acquire);
        atomic_store_explicit(pyipcd_shm__u64(c, resp + 64), t, memory_order_release);
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
    for (;;) {
        uint64_t tail = atomic_load_explicit(pyipcd_shm__u64(c, ctl), memory_order_relaxed);
        uint64_t head = atomic_load_explicit(pyipcd_shm__u64(c, ctl + 64), memory_order_acquire);
        uint32_t pos = (uint32_t)(tail % c->ring), room = c->ring - pos;
        uint32_t skip = room < need ? room : 0;
        if (tail + skip + need - head <= c->ring) {
            uint32_t at = pos;
            if (skip) {
                if (skip >= PYIPCD_SHM_RECORD_HEADER)
                    atomic_store_explicit(pyipcd_shm__u32(c, base + at), PYIPCD_SHM_WRAP, memory_order_relaxed);
                at = 0;
            }
            uint32_t hdr[4] = {len, c->next_seq, pyipcd_shm_crc32((const uint8_t *)data, len), PYIPCD_SHM_OK};
            memcpy(c->base + base + at, hdr, sizeof hdr);
            memcpy(c->base + base + at + 16, &c->epoch, 8);
            memcpy(c->base + base + at + PYIPCD_SHM_RECORD_HEADER, data, len);
            atomic_store_explicit(pyipcd_shm__u64(c, ctl), tail + skip + need, memory_order_release);
            return c->next_seq++;
        }
        int rc = pyipcd_shm__wait(c, start, &spins);
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
    for (;;) {
        uint64_t head = atomic_load_explicit(pyipcd_shm__u64(c, ctl + 64), memory_order_relaxed);
        uint64_t tail = atomic_load_explicit(pyipcd_shm__u64(c, ctl), memory_order_acquire);
        while (head != tail) {
            uint32_t pos = (uint32_t)(head % c->ring), room = c->ring - pos;
            uint32_t hdr[4];
            uint64_t epoch;
            if (room < PYIPCD_SHM_RECORD_HEADER) { head += room; continue; }
            memcpy(hdr, c->base + base + pos, sizeof hdr);
            if (hdr[0] == PYIPCD_SHM_WRAP) { head += room; continue; }
            memcpy(&epoch, c->base + base + pos + 16, 8);
            uint64_t need = PYIPCD_SHM_RECORD_HEADER + (((uint64_t)hdr[0] + 7u) & ~(uint64_t)7u);
            if (need > room || head + need > tail) { /* framing lost */
                atomic_store_explicit(pyipcd_shm__u64(c, ctl + 64), tail, memory_order_release);
                return PYIPCD_SHM_ECORRUPT;
            }
            if (epoch != c->epoch) { /* another client's reply, pushed before the daemon saw our epoch */
                head += need;
                atomic_store_explicit(pyipcd_shm__u64(c, ctl + 64), head, memory_order_release);
                continue;
            }
            if (hdr[0] > c->max_record) {
                atomic_store_explicit(pyipcd_shm__u64(c, ctl + 64), head + need, memory_order_release);
                return PYIPCD_SHM_ECORRUPT;
            }
            if (hdr[0] > cap) return PYIPCD_SHM_ESPACE;
            memcpy(buf, c->base + base + pos + PYIPCD_SHM_RECORD_HEADER, hdr[0]);
            atomic_store_explicit(pyipcd_shm__u64(c, ctl + 64), head + need, memory_order_release);
            if (pyipcd_shm_crc32((const uint8_t *)buf, hdr[0]) != hdr[2]) return PYIPCD_SHM_ECORRUPT;
            *len = hdr[0];
            if (hdr[3] == PYIPCD_SHM_RESET) return PYIPCD_SHM_ERESET;
            *flags = hdr[3];
            return hdr[1];
        }
        int rc = pyipcd_shm__wait(c, start, &spins);
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

#endif /* PYIPCD_SHM_H */
