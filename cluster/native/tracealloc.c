/* libmigbedtrace.so: the LD_PRELOAD allocator of `migbed trace record`.
 *
 * Why: an unmodified program's heap is scattered over glibc's arenas and mmaps, which no one
 * range of write tracking covers. This library serves malloc/calloc/realloc/free/memalign/
 * posix_memalign/aligned_alloc/valloc/pvalloc, and the program's own anonymous private
 * mmap/munmap/mremap (pymalloc's arenas, for one), from one anonymous mapping (the "region"),
 * registers it for userfaultfd write-protect in async mode (WP_ASYNC: the kernel marks each
 * page on its first write since the last scan, nothing to read), and hands
 * the uffd, the region's address and length to the recorder over the unix socket named by
 * MIGBED_TRACE_FD (SCM_RIGHTS). The recorder scans the process's pagemap with PAGEMAP_SCAN,
 * only up to the bump pointer (its address is in the hello).
 *
 * Only the first process (whose parent is MIGBED_TRACE_PARENT) is tracked; exec'd and forked
 * children say "C" on the socket (counted) and allocate from an untracked region. Once the
 * region is used up, blocks come from an untracked spill mapping (a plain mmap for what even
 * that cannot hold), once told ("O") to the recorder.
 *
 * Cost: every page written since the last scan costs the program one in-kernel write fault
 * per interval, so the allocator packs blocks as densely as glibc's does (a block touches no
 * more pages than it would there): size classes 16 bytes apart up to 1 KiB, then eight per
 * doubling (at most 12.5 % rounding), a free list per class, one spin lock, a 16-byte header
 * before every pointer (magic, class, offset back to the block's start); a block at the bump
 * pointer grows in place. mmap'd spans are page runs beside those: a munmapped span is kept
 * in a table, and dropped (MADV_DONTNEED: zero again, as a new mapping is) when reused; their
 * bookkeeping lives outside the region, so it writes no traced page.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#define MAGIC 0x6d696774u
#define CLASS_MMAP 0xffffu
#define SMALL_CLASSES 64                    /* 16, 32, ... 1024 bytes */
#define NCLASSES (SMALL_CLASSES + 8 * 37)   /* then 8 per doubling, to 2^47 */
#define HDR 16
#define PAGE 4096UL
#define MAX_SPANS 4096

struct hdr { uint32_t magic, cls; uint64_t offset; };

static char *region, *region_end;
static char *volatile bump;
static size_t region_len;
static void *free_lists[NCLASSES];
static char *span_at[MAX_SPANS];            /* freed mmap spans: start, pages */
static size_t span_pages[MAX_SPANS];
static int nspans;
static volatile int lock_word;
static int ready, tracked, sock_fd = -1, told_out;
static void tell_outgrown(size_t n);

static void lock(void) { while (__atomic_exchange_n(&lock_word, 1, __ATOMIC_ACQUIRE)) sched_yield(); }
static void unlock(void) { __atomic_store_n(&lock_word, 0, __ATOMIC_RELEASE); }

/* The kernel's own calls (this library defines mmap, munmap and mremap). */
static void *sys_mmap(void *a, size_t n, int prot, int flags, int fd, off_t off) {
    return (void *)syscall(SYS_mmap, a, n, prot, flags, fd, off);
}
static int sys_munmap(void *a, size_t n) { return (int)syscall(SYS_munmap, a, n); }

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
    /* The uffd, handshaken for async write-protect, the region registered. Nothing in it is
       populated yet, so nothing needs protecting: a page's first write populates it without
       the write-protect bit, which PAGEMAP_SCAN reads as written. (WP_UNPOPULATED would
       instead fill the whole region's page tables with markers up front: tens of ms and
       MiBs of page tables for a 1 GiB region, and two faults for each fresh page.) */
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC};
    struct uffdio_register reg = {.range = {(uint64_t)region, region_len},
                                  .mode = UFFDIO_REGISTER_MODE_WP};
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1 /* user only */);
    if (fd < 0) return -errno;
    if (ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg)) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* fork() holds the allocator's lock across the fork (as glibc's malloc does), so a child of
   a threaded program never inherits it held by a thread it does not have. */
static void before_fork(void) { lock(); }
static void parent_after_fork(void) { unlock(); }

static void child_after_fork(void) {
    unlock();
    say("C", -1, NULL, 0);          /* counted; a forked child's writes are not tracked */
    tracked = 0;                    /* ... nor does its exit wait for a last scan */
}

static void init(void) {
    long parent = env_long("MIGBED_TRACE_PARENT", -1);
    ready = 1;
    region_len = (size_t)env_long("MIGBED_TRACE_REGION", 1L << 32) & ~(PAGE - 1);
    sock_fd = (int)env_long("MIGBED_TRACE_FD", -1);
    region = sys_mmap(NULL, region_len, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) { region = NULL; region_len = 0; }
    bump = region;
    region_end = region + region_len;
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
    pthread_atfork(before_fork, parent_after_fork, child_after_fork);
}

/* -- size classes ----------------------------------------------------------------------- */
static unsigned class_of(size_t n) {
    unsigned k;
    if (n <= 1024) return (unsigned)((n + 15) >> 4) - 1;
    k = 63u - (unsigned)__builtin_clzl(n - 1);          /* 2^k < n <= 2^(k+1), k >= 10 */
    return SMALL_CLASSES + (k - 10) * 8 + (unsigned)((n - 1 - ((size_t)1 << k)) >> (k - 3));
}

static size_t class_size(unsigned c) {
    unsigned k, j;
    if (c < SMALL_CLASSES) return ((size_t)c + 1) << 4;
    k = (c - SMALL_CLASSES) / 8 + 10;
    j = (c - SMALL_CLASSES) % 8;
    return ((size_t)1 << k) + ((size_t)(j + 1) << (k - 3));
}

static void *from_mmap(size_t n) {
    /* Outside the region: a mapping of its own, its length in the block's first word. */
    size_t len = (n + 2 * HDR + PAGE - 1) & ~(PAGE - 1);
    char *b = sys_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
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

static char *take_block(unsigned c, int *fresh) {
    char *b = free_lists[c];
    size_t n = class_size(c);
    *fresh = 0;
    if (b) { free_lists[c] = *(void **)b; return b; }
    *fresh = 1;                     /* never handed out: still zero */
    if (region && (size_t)(region_end - bump) >= n) {
        b = bump;
        bump += n;
        return b;
    }
    if (!spill) {                       /* the region is used up: spill, once told */
        size_t len = (size_t)1 << 40;
        spill = sys_mmap(NULL, len, PROT_READ | PROT_WRITE,
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

static void *alloc(size_t n, size_t align, int *fresh) {
    size_t need;
    unsigned c;
    char *b, *p;
    struct hdr *h;
    if (!ready) init();
    if (align < HDR) align = HDR;
    if (n > ((size_t)1 << 46) || align > ((size_t)1 << 30)) { errno = ENOMEM; return NULL; }
    need = n + HDR + (align > HDR ? align : 0);
    c = class_of(need);
    lock();
    b = take_block(c, fresh);
    unlock();
    if (!b) {
        *fresh = 1;
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
    return class_size(h->cls) - h->offset;
}

void free(void *p) {
    struct hdr *h;
    char *b;
    if (!p) return;
    h = (struct hdr *)((char *)p - HDR);
    if (h->magic != MAGIC) return;          /* not ours (glibc's, from before us): leave it */
    b = (char *)p - h->offset;
    if (h->cls == CLASS_MMAP) { sys_munmap(b, *(uint64_t *)b); return; }
    lock();
    *(void **)b = free_lists[h->cls];
    free_lists[h->cls] = b;
    unlock();
}

void *malloc(size_t n) { int fresh; return alloc(n, HDR, &fresh); }

void *calloc(size_t k, size_t n) {
    size_t total;
    int fresh;
    void *p;
    if (__builtin_mul_overflow(k, n, &total)) { errno = ENOMEM; return NULL; }
    p = alloc(total, HDR, &fresh);
    if (p && !fresh) memset(p, 0, total);   /* a fresh block is zero already, as glibc knows */
    return p;
}

static int grow_in_place(void *old, size_t n) {
    /* A block that ends at the bump pointer grows by moving it (no copy, no new pages
       written), as glibc grows its top chunk. */
    struct hdr *h = (struct hdr *)((char *)old - HDR);
    char *b = (char *)old - h->offset;
    unsigned c;
    int done = 0;
    if (h->cls == CLASS_MMAP || n > ((size_t)1 << 46)) return 0;
    c = class_of(n + h->offset);
    lock();
    if (b + class_size(h->cls) == bump && (size_t)(region_end - b) >= class_size(c)) {
        bump = b + class_size(c);
        h->cls = c;
        done = 1;
    }
    unlock();
    return done;
}

void *realloc(void *old, size_t n) {
    void *p;
    size_t have;
    if (!old) return malloc(n);
    if (!n) { free(old); return NULL; }
    if (((struct hdr *)((char *)old - HDR))->magic != MAGIC) return NULL;
    have = usable(old);
    if (n <= have || grow_in_place(old, n)) return old;
    p = malloc(n);
    if (p) { memcpy(p, old, have); free(old); }
    return p;
}

void *memalign(size_t align, size_t n) {
    int fresh;
    if (align & (align - 1)) { errno = EINVAL; return NULL; }
    return alloc(n, align, &fresh);
}

int posix_memalign(void **out, size_t align, size_t n) {
    void *p;
    int fresh;
    if (align < sizeof(void *) || (align & (align - 1))) return EINVAL;
    p = alloc(n, align, &fresh);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

void *aligned_alloc(size_t align, size_t n) { return memalign(align, n); }
void *valloc(size_t n) { return memalign(PAGE, n); }
void *pvalloc(size_t n) { return memalign(PAGE, (n + PAGE - 1) & ~(PAGE - 1)); }
size_t malloc_usable_size(void *p) { return p ? usable(p) : 0; }

/* -- the program's anonymous mmaps: page spans of the region ---------------------------- */
static int ours(const void *a) { return region && (const char *)a >= region && (const char *)a < region_end; }

static char *take_span(size_t pages, int *fresh) {
    /* A freed span of exactly this size, else the front of a larger one, else fresh pages
       past the bump pointer (page-aligned); NULL when the region has no room. */
    int i, best = -1;
    char *a;
    *fresh = 0;
    for (i = 0; i < nspans; i++) {
        if (span_pages[i] == pages) { best = i; break; }
        if (span_pages[i] > pages && (best < 0 || span_pages[i] < span_pages[best])) best = i;
    }
    if (best >= 0) {
        a = span_at[best];
        if (span_pages[best] == pages) {
            span_at[best] = span_at[--nspans];
            span_pages[best] = span_pages[nspans];
        } else {
            span_at[best] += pages * PAGE;
            span_pages[best] -= pages;
        }
        return a;
    }
    *fresh = 1;
    a = (char *)(((uintptr_t)bump + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
    if (a > region_end || (size_t)(region_end - a) < pages * PAGE) return NULL;
    bump = a + pages * PAGE;
    return a;
}

static void give_span(char *a, size_t len) {
    /* Kept for reuse as it is (its pages written since the last scan are still there for
       the scan to see); forgotten if the table is full (its address space is lost, nothing
       else). */
    size_t pages = (len + PAGE - 1) / PAGE;
    if ((size_t)(region_end - a) < pages * PAGE) pages = (size_t)(region_end - a) / PAGE;
    if (nspans < MAX_SPANS) { span_at[nspans] = a; span_pages[nspans++] = pages; }
}

static int interceptable(void *addr, int prot, int flags, int fd) {
    return !addr && fd == -1 && prot == (PROT_READ | PROT_WRITE)
           && (flags & (MAP_TYPE | MAP_ANONYMOUS)) == (MAP_PRIVATE | MAP_ANONYMOUS)
           && !(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE | MAP_GROWSDOWN | MAP_STACK
                         | MAP_HUGETLB));
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    char *a = NULL;
    int fresh;
    if (!ready) init();
    if (len && interceptable(addr, prot, flags, fd) && region) {
        lock();
        a = take_span((len + PAGE - 1) / PAGE, &fresh);
        unlock();
        /* A reused span is made zero again, as a new mapping is, and its memory goes back
           to the kernel: its pages unwritten since are no longer there. (A page written
           before its munmap and dropped here before the next scan is not recorded: only
           when a span is freed and mapped again within one interval.) */
        if (a && !fresh) madvise(a, (len + PAGE - 1) & ~(PAGE - 1), MADV_DONTNEED);
        if (a) return a;
        tell_outgrown(len);
    }
    return sys_mmap(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
    __attribute__((alias("mmap")));

int munmap(void *addr, size_t len) {
    if (!ours(addr)) return sys_munmap(addr, len);
    if (((uintptr_t)addr & (PAGE - 1)) || !len) { errno = EINVAL; return -1; }
    lock();
    give_span(addr, len);
    unlock();
    return 0;
}

void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...) {
    char *a;
    va_list ap;
    void *fixed;
    va_start(ap, flags);
    fixed = (flags & MREMAP_FIXED) ? va_arg(ap, void *) : NULL;
    va_end(ap);
    if (!ours(old))
        return (void *)syscall(SYS_mremap, old, old_len, new_len, flags, fixed);
    old_len = (old_len + PAGE - 1) & ~(PAGE - 1);
    new_len = (new_len + PAGE - 1) & ~(PAGE - 1);
    if (!new_len || (flags & ~MREMAP_MAYMOVE)) { errno = EINVAL; return MAP_FAILED; }
    if (new_len <= old_len) {               /* shrinking: the tail goes back */
        lock();
        if (new_len < old_len) give_span((char *)old + new_len, old_len - new_len);
        unlock();
        return old;
    }
    if (!(flags & MREMAP_MAYMOVE)) { errno = ENOMEM; return MAP_FAILED; }
    a = mmap(NULL, new_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) return a;
    memcpy(a, old, old_len);
    munmap(old, old_len);
    return a;
}

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
