/* libmigbedtrace.so: the LD_PRELOAD allocator of `migbed trace record`.
 *
 * Why: an unmodified program's heap is scattered over glibc's arenas and mmaps, which no one
 * range of write tracking covers. This library serves malloc/calloc/realloc/free/memalign/
 * posix_memalign/aligned_alloc/valloc/pvalloc from one anonymous mapping (the "region"),
 * registers it for userfaultfd write-protect in async mode (WP_ASYNC + WP_UNPOPULATED: the
 * kernel marks each page on its first write since the last scan, nothing to read), and hands
 * the uffd, the region's address and length to the recorder over the unix socket named by
 * MIGBED_TRACE_FD (SCM_RIGHTS). The recorder scans the process's pagemap with PAGEMAP_SCAN.
 * Anonymous mmap is not intercepted: Python is run with PYTHONMALLOC=malloc instead.
 *
 * Only the first process (whose parent is MIGBED_TRACE_PARENT) is tracked; exec'd and forked
 * children say "C" on the socket (counted) and allocate from an untracked region. Once the
 * region is used up, blocks come from an untracked spill mapping (a plain mmap for what even
 * that cannot hold), once told ("O") to the recorder.
 *
 * Sizes: power-of-two classes from 32 bytes, a free list per class, one spin lock; a 16-byte
 * header before every pointer (magic, class, offset back to the block's start).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#define MAGIC 0x6d696774u
#define CLASS_MMAP 255u
#define NCLASSES 48
#define HDR 16

struct hdr { uint32_t magic, cls; uint64_t offset; };

static char *region, *region_end;
static char *volatile bump;
static size_t region_len;
static void *free_lists[NCLASSES];
static volatile int lock_word;
static int ready, tracked, sock_fd = -1, told_out;
static void tell_outgrown(size_t n);

static void lock(void) { while (__atomic_exchange_n(&lock_word, 1, __ATOMIC_ACQUIRE)) sched_yield(); }
static void unlock(void) { __atomic_store_n(&lock_word, 0, __ATOMIC_RELEASE); }

static long env_long(const char *name, long dflt) {
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : dflt;
}

static void say(const char *msg, int fd_to_pass, const uint64_t *words, int nwords) {
    /* One SOCK_SEQPACKET message: a tag byte, then u64 words; maybe a descriptor. */
    char buf[64];
    struct iovec iov;
    struct msghdr mh;
    char ctl[CMSG_SPACE(sizeof(int))];
    if (sock_fd < 0) return;
    buf[0] = msg[0];
    memcpy(buf + 8, words, 8 * (size_t)nwords);
    iov.iov_base = buf;
    iov.iov_len = 8 + 8 * (size_t)nwords;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (fd_to_pass >= 0) {
        struct cmsghdr *c;
        memset(ctl, 0, sizeof ctl);
        mh.msg_control = ctl;
        mh.msg_controllen = sizeof ctl;
        c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd_to_pass, sizeof(int));
    }
    while (sendmsg(sock_fd, &mh, MSG_NOSIGNAL) < 0 && errno == EINTR) {}
}

static int track(void) {
    /* The uffd, handshaken for async write-protect, the region registered and protected. */
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED};
    struct uffdio_register reg = {.range = {(uint64_t)region, region_len},
                                  .mode = UFFDIO_REGISTER_MODE_WP};
    struct uffdio_writeprotect wp = {.range = {(uint64_t)region, region_len},
                                     .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1 /* user only */);
    if (fd < 0) return -errno;
    if (ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg)
        || ioctl(fd, UFFDIO_WRITEPROTECT, &wp)) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

static void child_after_fork(void) {
    say("C", -1, NULL, 0);          /* counted; a forked child's writes are not tracked */
}

static void init(void) {
    long parent = env_long("MIGBED_TRACE_PARENT", -1);
    region_len = (size_t)env_long("MIGBED_TRACE_REGION", 1L << 32);
    sock_fd = (int)env_long("MIGBED_TRACE_FD", -1);
    region = mmap(NULL, region_len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) { region = NULL; region_len = 0; }
    bump = region;
    region_end = region + region_len;
    ready = 1;
    if (parent > 0 && getppid() == parent && region) {
        int fd = track();
        /* The last word: where the bump pointer lives, so the recorder scans only the part
           of the region handed out so far. */
        uint64_t w[5] = {(uint64_t)region, region_len, (uint64_t)getpid(),
                         (uint64_t)(fd < 0 ? -fd : 0), (uint64_t)&bump};
        tracked = fd >= 0;
        say(tracked ? "H" : "E", tracked ? fd : -1, w, 5);
        if (tracked) close(fd);     /* the recorder holds it now */
    } else {
        say("C", -1, NULL, 0);
    }
    pthread_atfork(NULL, NULL, child_after_fork);
}

static unsigned class_of(size_t n) {
    unsigned c = 5;
    while (((size_t)1 << c) < n && c < NCLASSES - 1) c++;
    return c;
}

static void *from_mmap(size_t n) {
    /* Outside the region: a mapping of its own, its length in the block's first word. */
    size_t len = (n + 2 * HDR + 4095) & ~(size_t)4095;
    char *b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct hdr *h;
    if (b == MAP_FAILED) return NULL;
    *(uint64_t *)b = len;
    h = (struct hdr *)(b + HDR);
    h->magic = MAGIC; h->cls = CLASS_MMAP; h->offset = 2 * HDR;
    tell_outgrown(n);
    return b + 2 * HDR;
}

static char *spill, *spill_end;     /* past the region: untracked, same classes */

static void tell_outgrown(size_t n) {
    uint64_t w[1] = {n};
    if (told_out || !tracked) return;
    told_out = 1;
    say("O", -1, w, 1);
}

static char *take_block(unsigned c) {
    char *b = free_lists[c];
    size_t n = (size_t)1 << c;
    if (b) { free_lists[c] = *(void **)b; return b; }
    if (region && (size_t)(region_end - bump) >= n) {
        b = bump;
        bump += n;
        return b;
    }
    if (!spill) {                       /* the region is used up: spill, once told */
        size_t len = (size_t)1 << 40;
        spill = mmap(NULL, len, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (spill == MAP_FAILED) { spill = NULL; return NULL; }
        spill_end = spill + len;
    }
    tell_outgrown(n);
    if ((size_t)(spill_end - spill) < n) return NULL;
    b = spill;
    spill += n;
    return b;
}

static void *alloc(size_t n, size_t align) {
    size_t need;
    unsigned c;
    char *b, *p;
    struct hdr *h;
    if (!ready) init();
    if (align < HDR) align = HDR;
    if (n > ((size_t)1 << 46)) { errno = ENOMEM; return NULL; }
    need = n + HDR + (align > HDR ? align : 0);
    c = class_of(need);
    lock();
    b = take_block(c);
    unlock();
    if (!b) {
        p = from_mmap(n + align);
        if (!p) { errno = ENOMEM; return NULL; }
        if (align > HDR) {
            char *a = (char *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
            struct hdr *ha = (struct hdr *)(a - HDR), *hp = (struct hdr *)(p - HDR);
            if (a != p) { ha->magic = MAGIC; ha->cls = CLASS_MMAP; ha->offset = hp->offset + (a - p); }
            p = a;
        }
        return p;
    }
    p = (char *)(((uintptr_t)b + HDR + align - 1) & ~(uintptr_t)(align - 1));
    h = (struct hdr *)(p - HDR);
    h->magic = MAGIC; h->cls = c; h->offset = (uint64_t)(p - b);
    return p;
}

static size_t usable(void *p) {
    struct hdr *h = (struct hdr *)((char *)p - HDR);
    char *b = (char *)p - h->offset;
    if (h->cls == CLASS_MMAP) return *(uint64_t *)b - h->offset;
    return ((size_t)1 << h->cls) - h->offset;
}

void free(void *p) {
    struct hdr *h;
    char *b;
    if (!p) return;
    h = (struct hdr *)((char *)p - HDR);
    if (h->magic != MAGIC) return;          /* not ours (glibc's, from before us): leave it */
    b = (char *)p - h->offset;
    if (h->cls == CLASS_MMAP) { munmap(b, *(uint64_t *)b); return; }
    lock();
    *(void **)b = free_lists[h->cls];
    free_lists[h->cls] = b;
    unlock();
}

void *malloc(size_t n) { return alloc(n, HDR); }

void *calloc(size_t k, size_t n) {
    size_t total;
    void *p;
    if (__builtin_mul_overflow(k, n, &total)) { errno = ENOMEM; return NULL; }
    p = alloc(total, HDR);
    if (p) memset(p, 0, total);
    return p;
}

void *realloc(void *old, size_t n) {
    void *p;
    size_t have;
    if (!old) return malloc(n);
    if (!n) { free(old); return NULL; }
    have = usable(old);
    if (n <= have) return old;
    p = malloc(n);
    if (p) { memcpy(p, old, have); free(old); }
    return p;
}

void *memalign(size_t align, size_t n) {
    if (align & (align - 1)) { errno = EINVAL; return NULL; }
    return alloc(n, align);
}

int posix_memalign(void **out, size_t align, size_t n) {
    void *p;
    if (align < sizeof(void *) || (align & (align - 1))) return EINVAL;
    p = alloc(n, align);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

void *aligned_alloc(size_t align, size_t n) { return memalign(align, n); }
void *valloc(size_t n) { return alloc(n, 4096); }
void *pvalloc(size_t n) { return alloc((n + 4095) & ~(size_t)4095, 4096); }
size_t malloc_usable_size(void *p) { return p ? usable(p) : 0; }

__attribute__((constructor)) static void at_load(void) { if (!ready) init(); }

/* At a normal exit, let the recorder take its last scan before the memory goes: say "X" and
   wait (at most 2 s) for its answer. A process killed by a signal skips this. */
__attribute__((destructor)) static void at_unload(void) {
    struct timeval tv = {2, 0};
    char ack;
    if (!tracked || sock_fd < 0) return;
    setsockopt(sock_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    say("X", -1, NULL, 0);
    while (recv(sock_fd, &ack, 1, 0) < 0 && errno == EINTR) {}
}
