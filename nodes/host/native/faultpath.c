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
#include "faultwire.h"
#include "faultserve.h"

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
