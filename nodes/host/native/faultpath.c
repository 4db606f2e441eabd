/* libmigbedfault.so: post-copy's fault path of a process guest, native on both hosts
 * (`nodes.migration.postcopy.nativefault` loads it by ctypes).
 *
 * Why native: a fault's page through the Python path crosses four interpreted threads in two
 * processes (the fault reader, the source's return-path reader, the serve, the landing), each
 * waiting for its GIL behind the push's threads: measured, 0.6 ms a fault against a 0.12 ms
 * raw round trip. Here one thread per side does the whole of it with no GIL:
 *
 * - the destination's thread (`fd_*`) sleeps in poll on the guest's userfaultfd and the
 *   fault channel: a fault on a missing page writes its pfn (8 bytes) to the channel; a page
 *   that comes back is claimed (`claim`, one byte per pfn, compare-and-swap: the Python
 *   landing claims the same way, so a page lands once and never over one the guest has
 *   written since), received straight into its frame, hashed, marked received, timed, and
 *   mapped into the guest by UFFDIO_CONTINUE, which wakes it. Page tables and requests made
 *   while the channel is down go to the Python path (`fd_drain`, an eventfd says when).
 * - the source's thread (`fs_*`) reads pfns and sends each page still unsent from its frame
 *   (the guest is paused there after the switch: its frames are frozen), taking it from the
 *   push's cursor (`unsent`) under a mutex the Python push takes too (`fs_lock`).
 *
 * The wire: pfns as little-endian u64 one way; back, a 16-byte header (magic, kind, pfn) and
 * for kind PAGE the page. END (kind 2) ends the channel.
 */
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

/* ---- the source's server ------------------------------------------------------------ */
typedef struct {
    int sock, stopfd, page_size;
    const uint8_t *frames; const int64_t *p2m; uint8_t *unsent; const uint8_t *is_pt;
    int64_t npages, nframes;
    pthread_mutex_t lock;            /* the push's cursor lock */
    pthread_mutex_t wlock;           /* one writer on the socket: the server, or END */
    pthread_t thread;
    int closing, ended, started;
    /* counters: requests, served, already sent, bytes, bad requests; unfolded since fs_fold */
    int64_t requests, served, already, bytes, bad;
    int64_t taken_unfolded, bytes_unfolded, last_pfn;
} fsrv;

static void fs_serve_one(fsrv *s, uint64_t pfn) {
    s->requests++;
    if (pfn >= (uint64_t)s->npages || s->is_pt[pfn]) { s->bad++; return; }
    int took = 0;
    pthread_mutex_lock(&s->wlock);   /* held to the page's last byte: END waits for it */
    pthread_mutex_lock(&s->lock);
    if (!s->closing && s->unsent[pfn]) {
        s->unsent[pfn] = 0;
        s->taken_unfolded++;
        s->last_pfn = (int64_t)pfn;
        took = 1;
    }
    pthread_mutex_unlock(&s->lock);
    if (!took) { s->already++; pthread_mutex_unlock(&s->wlock); return; }
    int64_t mfn = s->p2m[pfn];
    if (mfn < 0 || mfn >= s->nframes) {       /* not ours to send: back to the push */
        pthread_mutex_lock(&s->lock);
        s->unsent[pfn] = 1;
        s->taken_unfolded--;
        pthread_mutex_unlock(&s->lock);
        s->bad++;
        pthread_mutex_unlock(&s->wlock);
        return;
    }
    struct hdr h = {MAGIC, KIND_PAGE, pfn};
    struct iovec iov[2] = {{&h, sizeof h},
                           {(void *)(s->frames + (size_t)mfn * s->page_size), (size_t)s->page_size}};
    size_t left = sizeof h + (size_t)s->page_size;
    while (left) {
        ssize_t k = writev(s->sock, iov, 2);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        left -= (size_t)k;
        for (int i = 0; i < 2 && k; i++) {
            size_t d = (size_t)k < iov[i].iov_len ? (size_t)k : iov[i].iov_len;
            iov[i].iov_base = (char *)iov[i].iov_base + d; iov[i].iov_len -= d; k -= (ssize_t)d;
        }
    }
    pthread_mutex_unlock(&s->wlock);
    __atomic_add_fetch(&s->served, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->bytes, (int64_t)(sizeof h + s->page_size), __ATOMIC_RELAXED);
    pthread_mutex_lock(&s->lock);
    s->bytes_unfolded += (int64_t)(sizeof h + s->page_size);
    pthread_mutex_unlock(&s->lock);
}

static void *fs_run(void *arg) {
    fsrv *s = arg;
    uint64_t buf[READ_BATCH];
    size_t have = 0;                 /* bytes of a partial pfn kept from the last read */
    struct pollfd p[2] = {{s->sock, POLLIN, 0}, {s->stopfd, POLLIN, 0}};
    for (;;) {
        if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; break; }
        if (p[1].revents) break;
        ssize_t k = recv(s->sock, (char *)buf + have, sizeof buf - have, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;           /* the destination closed it (or the link broke) */
        have += (size_t)k;
        size_t n = have / 8;
        for (size_t i = 0; i < n; i++) fs_serve_one(s, buf[i]);
        size_t rest = have - n * 8;
        if (rest) memmove(buf, (char *)buf + n * 8, rest);
        have = rest;
    }
    __atomic_store_n(&s->ended, 1, __ATOMIC_RELEASE);
    return NULL;
}

void *fs_new(int sock, const uint8_t *frames, int64_t nframes, const int64_t *p2m,
             uint8_t *unsent, const uint8_t *is_pt, int64_t npages, int page_size) {
    fsrv *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->sock = sock; s->frames = frames; s->nframes = nframes; s->p2m = p2m;
    s->unsent = unsent; s->is_pt = is_pt; s->npages = npages; s->page_size = page_size;
    s->last_pfn = -1;
    s->stopfd = eventfd(0, EFD_CLOEXEC);
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->wlock, NULL);
    return s;
}

int fs_start(fsrv *s) {
    if (pthread_create(&s->thread, NULL, fs_run, s)) return -1;
    s->started = 1;
    return 0;
}

void fs_lock(fsrv *s) { pthread_mutex_lock(&s->lock); }
void fs_unlock(fsrv *s) { pthread_mutex_unlock(&s->lock); }

/* Under fs_lock: pages taken since the last fold, their bytes, the last pfn (-1: none). */
void fs_fold(fsrv *s, int64_t *out) {
    out[0] = s->taken_unfolded; out[1] = s->bytes_unfolded; out[2] = s->last_pfn;
    s->taken_unfolded = s->bytes_unfolded = 0; s->last_pfn = -1;
}

/* requests, served, already sent, bytes, bad, ended */
void fs_counts(fsrv *s, int64_t *out) {
    out[0] = s->requests; out[1] = __atomic_load_n(&s->served, __ATOMIC_RELAXED);
    out[2] = s->already; out[3] = __atomic_load_n(&s->bytes, __ATOMIC_RELAXED);
    out[4] = s->bad; out[5] = __atomic_load_n(&s->ended, __ATOMIC_ACQUIRE);
}

/* No page goes from here after this (every page has gone by the push): END on the channel. */
int fs_finish(fsrv *s) {
    pthread_mutex_lock(&s->lock);
    s->closing = 1;
    pthread_mutex_unlock(&s->lock);
    struct hdr h = {MAGIC, KIND_END, 0};
    pthread_mutex_lock(&s->wlock);
    int r = write_all(s->sock, &h, sizeof h);
    pthread_mutex_unlock(&s->wlock);
    return r;
}

/* The thread stopped and the socket closed (the handle stays, for fs_lock, until fs_free). */
void fs_stop(fsrv *s) {
    pthread_mutex_lock(&s->lock);
    s->closing = 1;
    pthread_mutex_unlock(&s->lock);
    if (s->started) {
        uint64_t one = 1;
        shutdown(s->sock, SHUT_RDWR);
        if (write(s->stopfd, &one, 8) < 0) { /* the shutdown wakes it anyway */ }
        pthread_join(s->thread, NULL);
        s->started = 0;
    }
    if (s->sock >= 0) { close(s->sock); s->sock = -1; }
}

/* A recovered link: the same server (its mutex is the cursor's lock) on a new connection. */
int fs_reattach(fsrv *s, int sock) {
    fs_stop(s);
    close(s->stopfd);
    s->stopfd = eventfd(0, EFD_CLOEXEC);
    s->sock = sock;
    s->closing = 0;
    __atomic_store_n(&s->ended, 0, __ATOMIC_RELEASE);
    return fs_start(s);
}

void fs_free(fsrv *s) {
    fs_stop(s);
    close(s->stopfd);
    pthread_mutex_destroy(&s->lock);
    pthread_mutex_destroy(&s->wlock);
    free(s);
}

/* ---- the destination's fault thread ---------------------------------------------------- */
typedef struct {
    int uffd, sock, stopfd, fwdfd, pidfd, page_size;
    uint64_t base;
    int64_t npages, nframes;
    uint8_t *received, *claim, *applied, *frames;
    const uint8_t *is_pt, *cuts;
    uint64_t *hashes; const uint64_t *mult;
    const int64_t *p2m;
    double *asked_at, *waited_since; int64_t *waiters;
    pthread_mutex_t lock;
    pthread_t thread;
    int started, sock_ok, ended, gone, error, new_sock;
    int detach;                      /* 1: drop the channel, 2: take new_sock; 0 once done */
    /* counters (under lock) */
    int64_t faults, pages_requested, local_faults, continues, landed, dups, bytes_in;
    double blocked, lat_sum, native_lat_sum;
    int64_t lat_count, native_lat_count, counts[BUCKETS], native_counts[BUCKETS];
    int64_t *fwd; int64_t fwd_len, fwd_cap;   /* requests for the Python path */
} fdst;

static int observe(fdst *d, double seconds) {
    double ratio = (seconds > 0 ? seconds : 0) / 1e-6;
    int i = 0;
    while (i < BUCKETS - 1 && ratio > (double)(1ULL << i)) i++;
    d->counts[i]++;
    d->lat_sum += seconds;
    d->lat_count++;
    return i;
}

/* UFFDIO_CONTINUE over [pfn, pfn+count): pages mapped already are skipped. 0, or -1 when
 * the guest is gone, -2 on another error. */
static int continue_run(fdst *d, int64_t pfn, int64_t count) {
    uint64_t start = d->base + (uint64_t)pfn * d->page_size;
    uint64_t end = start + (uint64_t)count * d->page_size;
    while (start < end) {
        struct cont c = {start, end - start, 0, 0};
        if (ioctl(d->uffd, UFFDIO_CONTINUE_NR, &c) == 0) break;
        if (errno == EEXIST || errno == EAGAIN) {
            uint64_t done = c.mapped > 0 ? (uint64_t)c.mapped : 0;
            start += done + (errno == EEXIST ? (uint64_t)d->page_size : 0);
            continue;
        }
        if (errno == ESRCH || errno == ENOENT) { d->gone = 1; return -1; }
        d->error = errno;
        return -2;
    }
    __atomic_add_fetch(&d->continues, 1, __ATOMIC_RELAXED);
    return 0;
}

/* Timed and accounted as landed (under lock): QEMU's latency and blocktime. */
static void account_landed(fdst *d, int64_t pfn, double now, int native) {
    double asked = d->asked_at[pfn];
    if (asked > 0) {
        int i = observe(d, now - asked);
        if (native) {
            d->native_counts[i]++;
            d->native_lat_sum += now - asked;
            d->native_lat_count++;
        }
        d->asked_at[pfn] = 0;
        d->blocked += (double)d->waiters[pfn] * now - d->waited_since[pfn];
        d->waiters[pfn] = 0;
        d->waited_since[pfn] = 0;
    }
}

static void forward(fdst *d, int64_t pfn) {    /* under lock */
    if (d->fwd_len < d->fwd_cap) d->fwd[d->fwd_len++] = pfn;
    uint64_t one = 1;
    if (write(d->fwdfd, &one, 8) < 0) { /* the counter is full: Python is awake already */ }
}

static void on_fault(fdst *d, uint64_t address) {
    if (address < d->base) return;
    int64_t pfn = (int64_t)((address - d->base) / (uint64_t)d->page_size);
    if (pfn >= d->npages) return;
    double now = now_mono();
    int here, fresh = 0, native = 0;
    pthread_mutex_lock(&d->lock);
    d->faults++;
    here = __atomic_load_n(&d->received[pfn], __ATOMIC_ACQUIRE);
    if (here) {
        d->local_faults++;
    } else {
        d->waiters[pfn]++;
        d->waited_since[pfn] += now;
        if (d->asked_at[pfn] == 0) {
            fresh = 1;
            d->asked_at[pfn] = now;
            d->pages_requested++;
            native = d->sock_ok && !d->is_pt[pfn];
            if (!native) forward(d, pfn);
        }
    }
    pthread_mutex_unlock(&d->lock);
    if (here) {
        continue_run(d, pfn, 1);
    } else if (fresh && native) {
        uint64_t w = (uint64_t)pfn;
        if (write_all(d->sock, &w, 8)) {
            pthread_mutex_lock(&d->lock);
            d->sock_ok = 0;
            forward(d, pfn);
            pthread_mutex_unlock(&d->lock);
        }
    }
}

static uint64_t page_hash(const uint64_t *w, const uint64_t *k, int words) {
    uint64_t h = 0;
    for (int i = 0; i < words; i++) h += w[i] * k[i];
    return h;
}

/* One page from the channel: claimed, received into its frame, hashed, marked, mapped. */
static int on_page(fdst *d, uint8_t *scratch) {
    struct hdr h;
    if (read_all(d->sock, &h, sizeof h) || h.magic != MAGIC) return -1;
    if (h.kind == KIND_END) { d->ended = 1; return 1; }
    if (h.kind != KIND_PAGE || h.pfn >= (uint64_t)d->npages || d->is_pt[h.pfn]) return -1;
    int64_t pfn = (int64_t)h.pfn, mfn = d->p2m[pfn];
    if (mfn < 0 || mfn >= d->nframes) return -1;
    uint8_t expect = 0;
    int mine = __atomic_compare_exchange_n(&d->claim[pfn], &expect, 1, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    uint8_t *frame = d->frames + (size_t)mfn * d->page_size;
    if (read_all(d->sock, mine ? frame : scratch, (size_t)d->page_size)) {
        if (mine) __atomic_store_n(&d->claim[pfn], 0, __ATOMIC_RELEASE);   /* not landed */
        return -1;
    }
    pthread_mutex_lock(&d->lock);
    d->bytes_in += (int64_t)(sizeof h) + d->page_size;
    if (!mine) { d->dups++; pthread_mutex_unlock(&d->lock); return 0; }
    pthread_mutex_unlock(&d->lock);
    if (d->hashes) d->hashes[pfn] = page_hash((const uint64_t *)frame, d->mult, d->page_size / 8);
    d->applied[pfn]++;
    __atomic_store_n(&d->received[pfn], 1, __ATOMIC_RELEASE);
    double now = now_mono();
    pthread_mutex_lock(&d->lock);
    d->landed++;
    account_landed(d, pfn, now, 1);
    pthread_mutex_unlock(&d->lock);
    return continue_run(d, pfn, 1) == -2 ? -1 : 0;
}

/* The channel is gone: what it was asked for goes to the Python path (asked again there). */
static void channel_lost(fdst *d) {
    pthread_mutex_lock(&d->lock);
    if (d->sock_ok) {
        d->sock_ok = 0;
        for (int64_t p = 0; p < d->npages; p++)
            if (d->asked_at[p] > 0 && !d->received[p] && !d->is_pt[p]) forward(d, p);
    }
    pthread_mutex_unlock(&d->lock);
}

static void *fd_run(void *arg) {
    fdst *d = arg;
    struct uffd_msg_raw msgs[READ_BATCH];
    uint8_t *scratch = malloc((size_t)d->page_size);
    for (;;) {
        struct pollfd p[3] = {{d->uffd, POLLIN, 0}, {d->stopfd, POLLIN, 0},
                              {d->sock_ok && !d->ended ? d->sock : -1, POLLIN, 0}};
        if (poll(p, 3, -1) < 0) { if (errno == EINTR) continue; break; }
        if (p[1].revents) {
            int what = __atomic_load_n(&d->detach, __ATOMIC_ACQUIRE);
            if (!what) break;
            uint64_t v;
            if (read(d->stopfd, &v, 8) < 0) { /* drained */ }
            if (what == 1) {
                channel_lost(d);
                if (d->sock >= 0) close(d->sock);
                d->sock = -1;
            } else {
                d->sock = d->new_sock;
                d->ended = 0;
                pthread_mutex_lock(&d->lock);
                d->sock_ok = 1;
                pthread_mutex_unlock(&d->lock);
            }
            __atomic_store_n(&d->detach, 0, __ATOMIC_RELEASE);
            continue;
        }
        if (p[0].revents) {
            ssize_t k = read(d->uffd, msgs, sizeof msgs);
            if (k > 0)
                for (ssize_t i = 0; i < k / (ssize_t)sizeof msgs[0]; i++)
                    if ((msgs[i].head & 0xff) == UFFD_EVENT_PAGEFAULT) on_fault(d, msgs[i].address);
            if (d->gone || d->error) break;
        }
        if (p[2].revents) {
            int r = on_page(d, scratch);
            if (r < 0) channel_lost(d);
            if (d->gone || d->error) break;
        }
    }
    free(scratch);
    uint64_t one = 1;
    if (write(d->fwdfd, &one, 8) < 0) { /* Python looks at `gone` and `error` */ }
    return NULL;
}

void *fd_new(int uffd, uint64_t base, int page_size, int64_t npages, uint8_t *received,
             uint8_t *claim, const uint8_t *is_pt, const uint8_t *cuts,
             double *asked_at, int64_t *waiters, double *waited_since, int fwdfd) {
    fdst *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->uffd = uffd; d->base = base; d->page_size = page_size; d->npages = npages;
    d->received = received; d->claim = claim; d->is_pt = is_pt; d->cuts = cuts;
    d->asked_at = asked_at; d->waiters = waiters; d->waited_since = waited_since;
    d->fwdfd = fwdfd; d->sock = -1;
    d->fwd_cap = 2 * npages + 64;
    d->fwd = malloc(sizeof(int64_t) * (size_t)d->fwd_cap);
    d->stopfd = eventfd(0, EFD_CLOEXEC);
    pthread_mutex_init(&d->lock, NULL);
    return d;
}

/* The channel and where its pages land: frames (and their count), the P2M, the landing's
 * arrays (hashes NULL when not verifying) and the hash's multipliers. */
void fd_channel(fdst *d, int sock, uint8_t *frames, int64_t nframes, const int64_t *p2m,
                uint8_t *applied, uint64_t *hashes, const uint64_t *mult) {
    d->sock = sock; d->frames = frames; d->nframes = nframes; d->p2m = p2m;
    d->applied = applied; d->hashes = hashes; d->mult = mult;
    d->sock_ok = sock >= 0;
}

int fd_start(fdst *d) {
    if (pthread_create(&d->thread, NULL, fd_run, d)) return -1;
    d->started = 1;
    return 0;
}

/* Python claims pages its landing is about to write: out[i] = 1 where it got pfns[i]. */
void fd_claim(fdst *d, const int64_t *pfns, int64_t n, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) {
        uint8_t expect = 0;
        out[i] = __atomic_compare_exchange_n(&d->claim[pfns[i]], &expect, 1, 0,
                                             __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
}

void fd_unclaim(fdst *d, const int64_t *pfns, int64_t n) {
    for (int64_t i = 0; i < n; i++) __atomic_store_n(&d->claim[pfns[i]], 0, __ATOMIC_RELEASE);
}

/* The Python landing made pfns present (marked received): time them, map them, wake. */
int fd_landed(fdst *d, const int64_t *pfns, int64_t n) {
    double now = now_mono();
    pthread_mutex_lock(&d->lock);
    for (int64_t i = 0; i < n; i++) account_landed(d, pfns[i], now, 0);
    pthread_mutex_unlock(&d->lock);
    int64_t i = 0;
    while (i < n) {
        int64_t j = i + 1;
        while (j < n && pfns[j] == pfns[j - 1] + 1 && !(d->cuts && d->cuts[pfns[j]])) j++;
        int r = continue_run(d, pfns[i], j - i);
        if (r) return r;
        i = j;
    }
    return 0;
}

/* The host's own access: of pfns, those not asked for and not here are marked asked (out). */
int64_t fd_ask(fdst *d, const int64_t *pfns, int64_t n, int64_t *out) {
    double now = now_mono();
    int64_t k = 0;
    pthread_mutex_lock(&d->lock);
    for (int64_t i = 0; i < n; i++) {
        int64_t p = pfns[i];
        if (d->asked_at[p] == 0 && !__atomic_load_n(&d->received[p], __ATOMIC_ACQUIRE)) {
            d->asked_at[p] = now;
            d->pages_requested++;
            out[k++] = p;
        }
    }
    pthread_mutex_unlock(&d->lock);
    return k;
}

/* Requests for the Python path, up to max of them. */
int64_t fd_drain(fdst *d, int64_t *out, int64_t max) {
    pthread_mutex_lock(&d->lock);
    int64_t n = d->fwd_len < max ? d->fwd_len : max;
    memcpy(out, d->fwd, sizeof(int64_t) * (size_t)n);
    memmove(d->fwd, d->fwd + n, sizeof(int64_t) * (size_t)(d->fwd_len - n));
    d->fwd_len -= n;
    pthread_mutex_unlock(&d->lock);
    return n;
}

/* ints: faults, pages requested, local faults, continues, landed here, duplicates, bytes,
 * ended, gone, error, channel up, native latency count, then the BUCKETS counts of every
 * fault and those of the faults whose page came by the channel;
 * doubles: blocked, latency sum, native latency sum. */
void fd_stats(fdst *d, int64_t *ints, double *dbl) {
    pthread_mutex_lock(&d->lock);
    int64_t v[12] = {d->faults, d->pages_requested, d->local_faults,
                     __atomic_load_n(&d->continues, __ATOMIC_RELAXED), d->landed, d->dups,
                     d->bytes_in, d->ended, d->gone, d->error, d->sock_ok, d->native_lat_count};
    memcpy(ints, v, sizeof v);
    memcpy(ints + 12, d->counts, sizeof d->counts);
    memcpy(ints + 12 + BUCKETS, d->native_counts, sizeof d->native_counts);
    dbl[0] = d->blocked; dbl[1] = d->lat_sum; dbl[2] = d->native_lat_sum;
    pthread_mutex_unlock(&d->lock);
}

/* Tell the thread (1: drop the channel, 2: take new_sock) and wait until it has (bounded:
 * a thread that has ended already answers nothing). */
static void tell(fdst *d, int what) {
    uint64_t one = 1;
    __atomic_store_n(&d->detach, what, __ATOMIC_RELEASE);
    if (write(d->stopfd, &one, 8) < 0) { /* the counter is full: it is awake */ }
    for (int i = 0; i < 20000 && __atomic_load_n(&d->detach, __ATOMIC_ACQUIRE); i++)
        usleep(50);
}

/* The channel dropped (the link broke): its requests go to the Python path from now on. */
void fd_detach(fdst *d) {
    if (!d->started) { channel_lost(d); return; }
    if (d->sock >= 0) shutdown(d->sock, SHUT_RDWR);
    tell(d, 1);
}

/* A recovered link's new channel (after fd_detach). */
void fd_reattach(fdst *d, int sock) {
    if (!d->started) { close(sock); return; }
    d->new_sock = sock;
    tell(d, 2);
}

void fd_stop(fdst *d) {
    if (d->started) {
        uint64_t one = 1;
        if (d->sock >= 0) shutdown(d->sock, SHUT_RDWR);   /* no wait on a page half here */
        __atomic_store_n(&d->detach, 0, __ATOMIC_RELEASE);
        if (write(d->stopfd, &one, 8) < 0) { /* nothing to do */ }
        pthread_join(d->thread, NULL);
        d->started = 0;
    }
    if (d->sock >= 0) { close(d->sock); d->sock = -1; }
}

void fd_free(fdst *d) {
    fd_stop(d);
    close(d->stopfd);
    pthread_mutex_destroy(&d->lock);
    free(d->fwd);
    free(d);
}
