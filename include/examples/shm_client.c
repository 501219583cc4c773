/* Example and test client for pyipcd_shm.h.
 *
 *   shm_client PATH N              N round trips against a reversing handler
 *                                  (handler returns data[::-1]), checked byte for byte
 *   shm_client PATH --bench S SIZE ping-pong for S seconds with SIZE-byte messages
 *                                  against an echo handler; prints round trips/s, p50, p99
 */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE /* for clock_gettime and CLOCK_MONOTONIC below; pyipcd_shm.h needs none */
#endif
#include "pyipcd_shm.h"

#include <stdio.h>
#include <stdlib.h>

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static int bench(pyipcd_shm *ch, double seconds, uint32_t size) {
    static uint8_t req[1 << 20], rep[1 << 20];
    memset(req, 'x', size);
    size_t cap = 1 << 24, n = 0;
    uint32_t *lat = malloc(cap * sizeof *lat);
    if (!lat) return 1;
    int64_t start = pyipcd_shm__now_us(), warm = start + 300000, end = warm + (int64_t)(seconds * 1e6);
    struct timespec a, b;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &a);
        uint32_t len = 0, flags = 0;
        int rc = pyipcd_shm_call(ch, req, size, rep, sizeof rep, &len, &flags);
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (rc || len != size || memcmp(req, rep, size) != 0) {
            fprintf(stderr, "bench call failed: %s\n", pyipcd_shm_strerror(rc));
            return 1;
        }
        int64_t now = (int64_t)b.tv_sec * 1000000 + b.tv_nsec / 1000;
        if (now >= end) break;
        if (now >= warm && n < cap)
            lat[n++] = (uint32_t)((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec));
    }
    qsort(lat, n, sizeof *lat, cmp_u32);
    printf("size=%u round_trips_per_s=%.0f p50_us=%.2f p99_us=%.2f\n", size, n / seconds, lat[n / 2] / 1000.0,
           lat[(size_t)(n * 0.99)] / 1000.0);
    free(lat);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PATH N | PATH --bench SECONDS SIZE\n", argv[0]);
        return 2;
    }
    pyipcd_shm ch;
    int rc = pyipcd_shm_open(&ch, argv[1], 5000);
    if (rc) {
        fprintf(stderr, "open %s: %s\n", argv[1], pyipcd_shm_strerror(rc));
        return 1;
    }
    if (strcmp(argv[2], "--bench") == 0 && argc == 5) {
        rc = bench(&ch, atof(argv[3]), (uint32_t)atoi(argv[4]));
        pyipcd_shm_close(&ch);
        return rc;
    }
    long n = atol(argv[2]);
    static uint8_t req[1 << 16], rep[1 << 16];
    for (long i = 0; i < n; i++) {
        uint32_t size = (uint32_t)((i * 131) % 16000);
        for (uint32_t j = 0; j < size; j++) req[j] = (uint8_t)(j ^ (uint32_t)i);
        uint32_t len = 0, flags = 0;
        rc = pyipcd_shm_call(&ch, req, size, rep, sizeof rep, &len, &flags);
        if (rc || flags != PYIPCD_SHM_OK || len != size) {
            fprintf(stderr, "call %ld: %s (flags %u, len %u)\n", i, pyipcd_shm_strerror(rc), flags, len);
            return 1;
        }
        for (uint32_t j = 0; j < size; j++) {
            if (rep[j] != req[size - 1 - j]) {
                fprintf(stderr, "call %ld: byte %u differs\n", i, j);
                return 1;
            }
        }
    }
    printf("%ld round trips ok\n", n);
    pyipcd_shm_close(&ch);
    return 0;
}
