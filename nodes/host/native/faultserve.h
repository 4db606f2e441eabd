/* faultserve.h: the source's side of libmigbedfault.so (see faultpath.c, which includes it
 * once): a thread that reads pfns from the fault channel and sends each page still unsent
 * straight from its frozen frame, taking it from the push's cursor under `lock`, the mutex
 * the Python push takes as its cursor lock (fs_lock). */
#ifndef MIGBED_FAULTSERVE_H
#define MIGBED_FAULTSERVE_H
#include "faultwire.h"

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

#endif
