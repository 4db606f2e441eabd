/* A paced process vCPU's loop between its Python wake-ups (nodes/host/nativepacing.py).
 *
 * Why native: a paced vCPU writing 1000 pages/s wakes ~16 times a second, and each Python
 * wake-up after a 64 ms sleep costs ~300 us of CPU with the interpreter's caches cold (19 us
 * warm). Python now plans a second's batches at once (the workload's own page choice, at
 * the planned times), and this loop runs them: it waits for each batch's deadline on the
 * control page's command word (a futex the host wakes to pause), writes the batch's page
 * counters, keeps the control page's counters and the shared progress log as the Python
 * loop does (nodes/host/guestvcpu.py, nodes/host/sharedlog.py), and returns to Python only
 * when Python work is due: the plan is done, the command is no longer RUN, a throttle is
 * set, or it woke more than a tick late (Python re-plans, so no burst catches up).
 *
 * One vCPU per guest process (no other thread writes these words or the log), called with
 * the GIL released.
 */
#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* A plan holds at most MAX_BATCHES batches of at most MAX_BATCH_PAGES pages. */
#define MAX_BATCHES 64
#define MAX_BATCH_PAGES 256
enum { CMD_RUN = 0, CMD_EXIT = 2 };
enum { DONE = 0, COMMAND = 1, THROTTLE = 2, LATE = 3 };
/* The shared log's flag bits (nodes/host/sharedlog.py). */
enum { HAS_LATEST = 1, LATEST_STORED = 2, DROPPED = 4 };

struct paced_log {               /* the progress log in the control page */
    volatile uint64_t *seq, *stored, *flags;
    volatile double *latest_wall;
    volatile int64_t *latest_pages;
    double *walls;
    int64_t *pages;
    uint8_t *marks;
    int64_t entries;
    double interval;             /* RECORD_INTERVAL_SECONDS */
    uint8_t thinned;             /* THINNED's bit */
};

struct paced_vcpu {
    /* the vCPU: set once */
    volatile uint32_t *command;
    volatile uint64_t *cpu_percentage, *ring_pages;
    volatile uint64_t *pages_written, *progress_pages, *batches, *last_batch_ns, *vcpu_writes;
    volatile double *workload_seconds;
    uint8_t *frames;             /* its first data page */
    uint8_t *written;            /* one byte a page, or NULL */
    int64_t page_size;
    double tick, idle_log_seconds;
    uint8_t idle_mark;
    struct paced_log log;
    /* the plan: set per call */
    const int64_t *pages;        /* every batch's pages, back to back */
    const uint64_t *increments;
    const int64_t *offsets;      /* batch k is [offsets[k], offsets[k + 1]) */
    const double *deadlines;     /* monotonic seconds */
    const double *running;       /* the workload's phase clock after batch k */
    int64_t batches_planned;
    /* in and out */
    uint64_t owner_written, owner_progress, vcpu_written;
    /* out */
    int64_t done, reason;
    double last_batch;           /* monotonic seconds of the last batch written */
    double waits[MAX_BATCHES];   /* the wait before each planned batch */
};

static double clock_seconds(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- the shared progress log: sharedlog.py's record and record_sleep ------------------------ */
static uint64_t put(struct paced_log *log, double wall, int64_t pages, uint8_t mark,
                    uint64_t flags)
{
    uint64_t stored = *log->stored;
    int64_t i = (int64_t)(stored % (uint64_t)log->entries);
    log->walls[i] = wall;
    log->pages[i] = pages;
    log->marks[i] = mark | ((flags & DROPPED) ? log->thinned : 0);
    *log->stored = stored + 1;
    return flags & ~(uint64_t)DROPPED;
}

static void seq_begin(struct paced_log *log)
{
    *log->seq += 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static void seq_end(struct paced_log *log)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *log->seq += 1;
}

void migbed_log_record(struct paced_log *log, double wall, int64_t pages)
{
    seq_begin(log);
    uint64_t flags = *log->flags;
    int stored = 1;
    if (!(flags & HAS_LATEST)) {
        flags = put(log, wall, pages, 0, flags);
    } else {
        double latest_wall = *log->latest_wall;
        double gap = wall - latest_wall;
        int latest_stored = (flags & LATEST_STORED) != 0;
        if (gap > log->interval && !latest_stored) {
            flags = put(log, latest_wall, *log->latest_pages, 0, flags);
            latest_stored = 1;
        }
        double last = log->walls[(int64_t)((*log->stored - 1) % (uint64_t)log->entries)];
        stored = gap > log->interval || wall - last >= log->interval;
        if (!latest_stored)
            flags |= DROPPED;
        if (stored)
            flags = put(log, wall, pages, 0, flags);
    }
    *log->latest_wall = wall;
    *log->latest_pages = pages;
    flags |= HAS_LATEST | LATEST_STORED;
    *log->flags = stored ? flags : flags & ~(uint64_t)LATEST_STORED;
    seq_end(log);
}

void migbed_log_record_sleep(struct paced_log *log, double start, double end, int64_t pages,
                             uint8_t mark)
{
    seq_begin(log);
    uint64_t flags = *log->flags;
    if ((flags & HAS_LATEST) && !(flags & LATEST_STORED))
        flags = put(log, *log->latest_wall, *log->latest_pages, 0, flags);
    flags = put(log, start, pages, 0, flags);
    flags = put(log, end, pages, mark, flags);
    *log->latest_wall = end;
    *log->latest_pages = pages;
    *log->flags = flags | HAS_LATEST | LATEST_STORED;
    seq_end(log);
}

/* -- the loop -------------------------------------------------------------------------------- */
/* Wait while the command is RUN, until `deadline` (monotonic seconds). The host's FUTEX_WAKE
 * on the word ends it at once: a pause lands at this batch boundary. */
static void wait_until(volatile uint32_t *command, double deadline)
{
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    while (*command == CMD_RUN && clock_seconds(CLOCK_MONOTONIC) < deadline)
        syscall(SYS_futex, command, FUTEX_WAIT_BITSET, CMD_RUN, &ts, NULL,
                FUTEX_BITSET_MATCH_ANY);
}

/* The idle wait before batch k, logged as guestvcpu's `_idle` logs it; 0 to write the batch,
 * else the reason to return to Python. */
static int idle(struct paced_vcpu *v, int64_t k)
{
    double start_wall = clock_seconds(CLOCK_REALTIME);
    double start = clock_seconds(CLOCK_MONOTONIC);
    double seconds = v->deadlines[k] - start;
    wait_until(v->command, v->deadlines[k]);
    uint32_t command = *v->command;
    if (seconds >= v->idle_log_seconds && command != CMD_EXIT) {
        double end_wall = clock_seconds(CLOCK_REALTIME);
        if (end_wall > start_wall + seconds)
            end_wall = start_wall + seconds;
        migbed_log_record_sleep(&v->log, start_wall, end_wall, (int64_t)v->owner_progress,
                                v->idle_mark);
    }
    if (command != CMD_RUN)
        return COMMAND;
    if (*v->cpu_percentage || *v->ring_pages)
        return THROTTLE;
    if (clock_seconds(CLOCK_MONOTONIC) > v->deadlines[k] + v->tick)
        return LATE;
    return 0;
}

/* Batch k: each page's counter (word 0) bumped by its increment, then the counters
 * guestvcpu's `batch_done` keeps. */
static void batch(struct paced_vcpu *v, int64_t k)
{
    uint64_t written = 0;
    for (int64_t j = v->offsets[k]; j < v->offsets[k + 1]; j++) {
        int64_t page = v->pages[j];
        *(volatile uint64_t *)(v->frames + page * v->page_size) += v->increments[j];
        written += v->increments[j];
        if (v->written)
            v->written[page] = 1;
    }
    v->owner_written += written;
    v->owner_progress += written;
    v->vcpu_written += written;
    *v->vcpu_writes = v->vcpu_written;
    *v->pages_written = v->owner_written;
    *v->progress_pages = v->owner_progress;
    *v->batches += 1;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    *v->last_batch_ns = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    *v->workload_seconds = v->running[k];
    double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    v->last_batch = now;
    double next = k + 1 < v->batches_planned ? v->deadlines[k + 1] : v->deadlines[k] + v->tick;
    if (next - now < v->idle_log_seconds)       /* no logged idle follows: a record of its own */
        migbed_log_record(&v->log, clock_seconds(CLOCK_REALTIME), (int64_t)v->owner_progress);
}

/* The loop's memory: one vCPU a process (a guest's one vCPU), static, so a guest forked from
 * the zygote allocates nothing for it (each allocation would write to the zygote's heap
 * pages, which then become the guest's own): only the pages it writes are its own. */
static int64_t plan_pages[MAX_BATCHES * MAX_BATCH_PAGES];
static uint64_t plan_increments[MAX_BATCHES * MAX_BATCH_PAGES];
static int64_t plan_offsets[MAX_BATCHES + 1];
static double plan_deadlines[MAX_BATCHES], plan_running[MAX_BATCHES];
/* Python's own: the workload saved after each planned batch (the first: before any):
 * (budget, phase clock, clock), then (pages written, position), then its generator's 40
 * bytes. */
static double plan_scratch[(MAX_BATCHES + 1) * (3 + 2 + 5)];
static struct paced_vcpu the_vcpu = {
    .pages = plan_pages, .increments = plan_increments, .offsets = plan_offsets,
    .deadlines = plan_deadlines, .running = plan_running,
};

/* What Python reads after a run, in one array: batches done, the guest's page writes, its
 * progress, the last batch's monotonic seconds, the wait before the next batch. */
static double run_out[5];

struct paced_vcpu *migbed_paced_vcpu(void) { return &the_vcpu; }
double *migbed_paced_out(void) { return run_out; }

/* The vCPU's words, all at once: `at` holds the addresses of the command word, the
 * throttle's two words, the counters' six, the log's five words and its three arrays. */
void migbed_paced_setup(const int64_t *at, int64_t log_entries, double interval,
                        uint8_t thinned, uint8_t idle_mark, uint8_t *frames, uint8_t *written,
                        int64_t page_size, double tick, double idle_log_seconds,
                        int64_t batches)
{
    struct paced_vcpu *v = &the_vcpu;
    v->command = (volatile uint32_t *)at[0];
    v->cpu_percentage = (volatile uint64_t *)at[1];
    v->ring_pages = (volatile uint64_t *)at[2];
    v->pages_written = (volatile uint64_t *)at[3];
    v->progress_pages = (volatile uint64_t *)at[4];
    v->batches = (volatile uint64_t *)at[5];
    v->last_batch_ns = (volatile uint64_t *)at[6];
    v->vcpu_writes = (volatile uint64_t *)at[7];
    v->workload_seconds = (volatile double *)at[8];
    v->log.seq = (volatile uint64_t *)at[9];
    v->log.stored = (volatile uint64_t *)at[10];
    v->log.flags = (volatile uint64_t *)at[11];
    v->log.latest_wall = (volatile double *)at[12];
    v->log.latest_pages = (volatile int64_t *)at[13];
    v->log.walls = (double *)at[14];
    v->log.pages = (int64_t *)at[15];
    v->log.marks = (uint8_t *)at[16];
    v->log.entries = log_entries;
    v->log.interval = interval;
    v->log.thinned = thinned;
    v->idle_mark = idle_mark;
    v->frames = frames;
    v->written = written;
    v->page_size = page_size;
    v->tick = tick;
    v->idle_log_seconds = idle_log_seconds;
    v->batches_planned = batches;
}

/* The plan's deadlines from the workload's clock: the first `wait` after it, each wait
 * doubled up to the tick (as the Python loop waits after a resume); steady, clock + k ticks. */
void migbed_paced_deadlines(double clock, double wait)
{
    struct paced_vcpu *v = &the_vcpu;
    double t = clock;
    for (int64_t k = 0; k < v->batches_planned; k++) {
        v->waits[k] = wait;
        if (wait >= v->tick) {
            plan_deadlines[k] = clock + v->tick * (double)(k + 1);
        } else {
            t += wait;
            plan_deadlines[k] = t;
            clock = t - v->tick * (double)(k + 1);  /* the steady part goes on from t */
        }
        wait = wait * 2 < v->tick ? wait * 2 : v->tick;
    }
}
double *migbed_paced_scratch(void) { return plan_scratch; }
int64_t migbed_paced_limits(int64_t *max_batch_pages)
{
    *max_batch_pages = MAX_BATCH_PAGES;
    return MAX_BATCHES;
}

/* Run the plan: for each batch, its idle wait, then the batch. Returns the batches done;
 * `run_out` says the rest. */
int64_t migbed_paced_run(int64_t owner_written, int64_t owner_progress, int64_t vcpu_written)
{
    struct paced_vcpu *v = &the_vcpu;
    v->owner_written = owner_written;
    v->owner_progress = owner_progress;
    v->vcpu_written = vcpu_written;
    v->reason = DONE;
    v->last_batch = -1.0;
    for (v->done = 0; v->done < v->batches_planned; v->done++) {
        int reason = idle(v, v->done);
        if (reason) {
            v->reason = reason;
            break;
        }
        batch(v, v->done);
    }
    run_out[0] = (double)v->done;
    run_out[1] = (double)v->owner_written;
    run_out[2] = (double)v->owner_progress;
    run_out[3] = v->last_batch;
    run_out[4] = v->done < v->batches_planned ? v->waits[v->done] : v->tick;
    return v->done;
}

/* -- the workload's generator, saved and restored per planned batch ------------------------ */
/* numpy's PCG64 state, reached from its `bitgen_t` (the bit generator's capsule), whose
 * first word points to it: a pointer to the 32 bytes of its state and increment, then its
 * buffered half-draw (has_uint32, uinteger). 40 bytes, with no Python object made:
 * nativepacing.py checks the round trip once before trusting it. */
struct pcg64_state {
    uint8_t *pcg;
    int has_uint32;
    uint32_t uinteger;
};

void migbed_pcg64_save(struct pcg64_state *const *bitgen, uint8_t *out)
{
    const struct pcg64_state *s = *bitgen;
    for (int i = 0; i < 32; i++)
        out[i] = s->pcg[i];
    *(int32_t *)(out + 32) = s->has_uint32;
    *(uint32_t *)(out + 36) = s->uinteger;
}

void migbed_pcg64_load(struct pcg64_state *const *bitgen, const uint8_t *in)
{
    struct pcg64_state *s = *bitgen;
    for (int i = 0; i < 32; i++)
        s->pcg[i] = in[i];
    s->has_uint32 = *(const int32_t *)(in + 32);
    s->uinteger = *(const uint32_t *)(in + 36);
}
