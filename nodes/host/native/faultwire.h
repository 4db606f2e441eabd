/* faultwire.h: what both sides of libmigbedfault.so share (see faultpath.c): the wire's
 * header, the uffd structs and ioctl number, and blocking socket helpers. */
#ifndef MIGBED_FAULTWIRE_H
#define MIGBED_FAULTWIRE_H
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x4750464dU            /* "MFPG" */
#define KIND_PAGE 1
#define KIND_END 2
#define BUCKETS 25                   /* FaultLatency: log2 from 1 us, 24 and one beyond */
#define UFFD_EVENT_PAGEFAULT 0x12
#define UFFDIO_CONTINUE_NR ((3UL << 30) | (32UL << 16) | (0xAAUL << 8) | 0x07)
#define READ_BATCH 64

struct hdr { uint32_t magic, kind; uint64_t pfn; };
struct uffd_msg_raw { uint64_t head, flags, address, feat; };
struct cont { uint64_t start, len, mode; int64_t mapped; };

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k; n -= (size_t)k;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n) {
        ssize_t k = recv(fd, p, n, MSG_WAITALL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k; n -= (size_t)k;
    }
    return 0;
}


#endif
