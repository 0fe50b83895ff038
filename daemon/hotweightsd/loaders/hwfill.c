/* The bounce path's hot loop, outside the interpreter.
 *
 * hotweightsd plans a fill in Python (hotweightsd.loaders.plan: reads of file windows and the
 * copies out of each) and hands the plan here; hw_fill() runs it on its own threads, so no chunk
 * costs interpreter time or waits for the GIL (why that matters: docs/loader.md). Plain C, no Python API:
 * loaded with ctypes, so one build serves every Python version. The CUDA driver is opened with
 * dlopen at the first device fill, so the library loads (and host_mode runs) on machines without one.
 *
 * Each worker owns `depth` slots of the pinned ring, one stream and one event per slot: it takes
 * the next chunk, waits for the slot's last copies (its event), reads the chunk into the slot,
 * queues the chunk's copies on its stream and records the slot's event. host_mode (tests, CI)
 * replaces the copies with memcpy into host memory and skips every driver call.
 *
 * An O_DIRECT read goes to the disk in requests of direct_request bytes: a cold disk may serve a
 * chunk faster in several smaller requests than in one (docs/loader.md, "O_DIRECT request size").
 * With direct_grid set, the chunks read O_DIRECT are first re-cut on that finer grid (recut()): a cold
 * disk may serve small reads from many readers faster than large ones, and cutting here costs
 * microseconds where cutting the plan in Python costs a fill's first milliseconds, before any read.
 *
 * The layout of hw_job is mirrored by hotweightsd.loaders.native; hw_job_size() and hw_abi()
 * let the loader refuse a library built from another revision, and hw_max_threads()/hw_max_depth()
 * one whose limits differ from those LoaderSettings checks a setting against.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HW_ABI 7
#define HW_MAX_THREADS 1024 /* hw_fill keeps a thread id per worker on its stack */
#define HW_MAX_DEPTH 64     /* a worker keeps a flag per slot on its stack */
#define HW_DIRECT_ALIGN 4096
#define HW_DIRECT_RETRIES 8 /* re-reads of a block cut short in a row, without getting further, before giving up */

enum { HW_OK = 0, HW_ERR_CUDA = 1, HW_ERR_OS = 2, HW_ERR_TRUNCATED = 3, HW_ERR_CANCELLED = 4, HW_ERR_SETUP = 5, HW_ERR_INJECTED = 6 };
/* Stages a test may fail on purpose (hotweightsd/core/faults.py): before a chunk's read, before its copies. */
enum { HW_FAULT_NONE = 0, HW_FAULT_READ = 1, HW_FAULT_COPY = 2 };

typedef struct {
    int64_t offset;      /* file offset of the chunk's first byte */
    int64_t length;      /* bytes to read */
    int64_t first_piece; /* index of its first copy in the pieces array */
    int32_t file;        /* the file, as errors name it */
    int32_t npieces;
    int32_t source;      /* index into fds and direct: the fd that reads it */
    int32_t pad;
} hw_chunk;

typedef struct {
    int64_t src;    /* offset inside the chunk */
    uint64_t dst;   /* device address (host address in host_mode) */
    int64_t length;
} hw_piece;

typedef struct {
    /* the plan */
    const int32_t *fds;    /* every fd of the fill: a file read both ways has two */
    const uint8_t *direct; /* per fd: opened O_DIRECT, so read the 4 KiB-aligned superset */
    const hw_chunk *chunks;
    const hw_piece *pieces;
    int64_t nchunks;
    int64_t npieces;
    int32_t nsources; /* entries of fds and direct */
    /* the ring: worker w's slot s is host_base + (w * depth + s) * slot_size */
    int32_t threads;
    int32_t depth;
    int32_t host_mode;
    int64_t slot_size;
    uint64_t host_base;
    uint64_t context;         /* CUcontext made current in every worker */
    const uint64_t *streams;  /* [threads] CUstream */
    const uint64_t *events;   /* [threads * depth] CUevent */
    const int32_t *cpus;      /* workers run on these (NUMA), when ncpus > 0 */
    int32_t ncpus;
    /* set by the caller to stop the fill early */
    volatile int32_t cancel;
    /* progress, read by the caller while the fill runs */
    int64_t next;
    int64_t done_bytes;
    int64_t reads;
    int64_t copies;
    /* the first error */
    int32_t err_kind;
    int32_t err_code;  /* CUresult or errno */
    int64_t err_chunk;
    int64_t err_file;
    int64_t err_offset;
    char err_op[48];
    /* tests only: the chunk whose stage fault_stage fails (fault_stage 0: none) */
    int64_t fault_chunk;
    int32_t fault_stage;
    /* the most bytes one pread of an O_DIRECT read asks for (0: the chunk's span at once) */
    int64_t direct_request;
    /* O_DIRECT chunks are read on a grid of this many bytes (0: as planned); a multiple of 4 KiB */
    int64_t direct_grid;
    /* where a fill's time went, set by hw_fill: the worker times are summed over workers */
    int64_t wall_ns;   /* hw_fill's call, re-cut, thread starts and joins included */
    int64_t setup_ns;  /* from the call to the last worker's start (the re-cut among it) */
    int64_t read_ns;   /* in pread */
    int64_t wait_ns;   /* waiting for a slot's earlier copies (its event) before reading into it */
    int64_t queue_ns;  /* queueing copies and recording events (memcpy in host_mode) */
    int64_t drain_ns;  /* the final wait for the worker's stream */
    int64_t spread_ns; /* from the first worker's end to the last's: the fill's tail */
} hw_job;

/* The chunks the workers take: the job's, or those recut() made of them. Errors and faults name a
 * chunk by its index in the job's plan (parent), so the caller finds the chunk it planned. */
typedef struct {
    const hw_chunk *chunks;
    const hw_piece *pieces;
    const int64_t *parent; /* per chunk, its index in the job's plan; NULL: the same */
    int64_t nchunks;
} hw_plan;

typedef int (*cu_ctx_set_t)(void *);
typedef int (*cu_copy_t)(uint64_t, const void *, size_t, void *);
typedef int (*cu_event_record_t)(void *, void *);
typedef int (*cu_sync_t)(void *);

static struct {
    cu_ctx_set_t ctx_set;
    cu_copy_t copy;
    cu_event_record_t event_record;
    cu_sync_t event_sync;
    cu_sync_t stream_sync;
    const char *missing;
} api;
static pthread_once_t api_once = PTHREAD_ONCE_INIT;

static void load_api(void) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
        api.missing = "libcuda.so.1";
        return;
    }
    /* The unsuffixed cuMemcpyHtoDAsync is the old 32-bit ABI; _v2 is what cuda.h maps the name to. */
    api.ctx_set = (cu_ctx_set_t)dlsym(lib, "cuCtxSetCurrent");
    api.copy = (cu_copy_t)dlsym(lib, "cuMemcpyHtoDAsync_v2");
    api.event_record = (cu_event_record_t)dlsym(lib, "cuEventRecord");
    api.event_sync = (cu_sync_t)dlsym(lib, "cuEventSynchronize");
    api.stream_sync = (cu_sync_t)dlsym(lib, "cuStreamSynchronize");
    if (!api.ctx_set) api.missing = "cuCtxSetCurrent";
    else if (!api.copy) api.missing = "cuMemcpyHtoDAsync_v2";
    else if (!api.event_record) api.missing = "cuEventRecord";
    else if (!api.event_sync) api.missing = "cuEventSynchronize";
    else if (!api.stream_sync) api.missing = "cuStreamSynchronize";
}

int hw_abi(void) { return HW_ABI; }
size_t hw_job_size(void) { return sizeof(hw_job); }
int hw_max_threads(void) { return HW_MAX_THREADS; }
int hw_max_depth(void) { return HW_MAX_DEPTH; }

/* Records the first error only; every later one is a consequence of the stop it causes. */
static void fail(hw_job *job, int kind, int code, const char *op, int64_t chunk, int64_t file, int64_t offset) {
    int32_t none = HW_OK;
    if (__atomic_compare_exchange_n(&job->err_kind, &none, kind, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        job->err_code = code;
        job->err_chunk = chunk;
        job->err_file = file;
        job->err_offset = offset;
        strncpy(job->err_op, op, sizeof(job->err_op) - 1);
        job->err_op[sizeof(job->err_op) - 1] = 0;
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Adds the time since *t to *sum and moves *t on. */
static void spend(int64_t *sum, int64_t *t) {
    int64_t n = now_ns();
    *sum += n - *t;
    *t = n;
}

static int stopped(hw_job *job) {
    if (__atomic_load_n(&job->err_kind, __ATOMIC_ACQUIRE) != HW_OK) return 1;
    if (job->cancel) {
        fail(job, HW_ERR_CANCELLED, 0, "cancel", -1, -1, -1);
        return 1;
    }
    return 0;
}

/* The file range a read of chunk c covers: the chunk itself, or its 4 KiB-aligned superset for O_DIRECT. */
static void read_span(const hw_job *job, const hw_chunk *c, int64_t *start, int64_t *len) {
    *start = c->offset;
    *len = c->length;
    if (job->direct[c->source]) {
        *start = c->offset / HW_DIRECT_ALIGN * HW_DIRECT_ALIGN;
        *len = (c->offset + c->length + HW_DIRECT_ALIGN - 1) / HW_DIRECT_ALIGN * HW_DIRECT_ALIGN - *start;
    }
}

/* The size of the file open as fd; 0 where it cannot be known, which reads as "ends here". */
static int64_t file_size(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? (int64_t)st.st_size : 0;
}

/* Reads chunk c (chunk i of the job's plan, or cut from it) into buf in requests of at most request
 * bytes (0: no limit); *skip is where its first byte landed. 0 on success. */
static int read_chunk(hw_job *job, const hw_chunk *c, int64_t i, char *buf, int64_t request, int64_t *skip) {
    int fd = job->fds[c->source];
    int direct = job->direct[c->source];
    int64_t start, len;
    read_span(job, c, &start, &len);
    *skip = c->offset - start;
    int64_t need = *skip + c->length, got = 0, furthest = 0;
    int cuts = 0;
    while (got < len) {
        int64_t want = len - got;
        if (request > 0 && want > request) want = request;
        ssize_t n = pread(fd, buf + got, (size_t)want, start + got);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(job, HW_ERR_OS, errno, direct ? "pread(O_DIRECT)" : "pread", i, c->file, start + got);
            return -1;
        }
        if (n == 0) break;
        got += n;
        if (direct && n % HW_DIRECT_ALIGN) {
            /* Ending inside a block is the file's end, unless the file goes on: then the read was cut
             * short (a network or FUSE filesystem may, and may cut the next read of the block again) and,
             * O_DIRECT reading whole blocks only, the block is read again from its start. The bytes past
             * a shorter retry are still in the buffer from the read before, so the furthest counts. */
            if (got >= need || start + got >= file_size(fd)) break;
            if (got > furthest) {
                furthest = got;
                cuts = 0;
            } else if (++cuts >= HW_DIRECT_RETRIES) {
                if (got < furthest) got = furthest;
                /* the file goes on: an I/O failure, not a truncated checkpoint */
                fail(job, HW_ERR_OS, EIO, "pread(O_DIRECT) cut short", i, c->file, start + got);
                return -1;
            }
            got -= got % HW_DIRECT_ALIGN;
        }
    }
    if (got < furthest) got = furthest;
    if (got < need) {
        fail(job, HW_ERR_TRUNCATED, 0, "read", i, c->file, start + got);
        return -1;
    }
    return 0;
}

typedef struct {
    hw_job *job;
    const hw_plan *plan;
    int index;
    int64_t started; /* now_ns() when it began, and when it ended */
    int64_t ended;
    /* its own times, summed into the job's once it has ended: no shared counter per chunk */
    int64_t read_ns, wait_ns, queue_ns, drain_ns;
} hw_worker;

static void *worker(void *arg) {
    hw_worker *w = arg;
    hw_job *job = w->job;
    const hw_plan *plan = w->plan;
    int depth = job->depth, host = job->host_mode;
    void *stream = host ? NULL : (void *)(uintptr_t)job->streams[w->index];
    const uint64_t *events = host ? NULL : &job->events[(int64_t)w->index * depth];
    char *slots = (char *)(uintptr_t)job->host_base + (int64_t)w->index * depth * job->slot_size;
    int pending[HW_MAX_DEPTH] = {0};
    int rc;
    int64_t t;
    w->started = now_ns();

    if (job->ncpus > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int k = 0; k < job->ncpus; k++)
            if (job->cpus[k] >= 0 && job->cpus[k] < CPU_SETSIZE) CPU_SET(job->cpus[k], &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set); /* best effort, like the Python workers */
    }
    if (!host && (rc = api.ctx_set((void *)(uintptr_t)job->context)) != 0) {
        fail(job, HW_ERR_CUDA, rc, "cuCtxSetCurrent", -1, -1, -1);
        w->ended = now_ns();
        return NULL;
    }
    for (int64_t k = 0; !stopped(job); k++) {
        int64_t n = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (n >= plan->nchunks) break;
        int64_t i = plan->parent ? plan->parent[n] : n; /* as errors and faults name it */
        int s = (int)(k % depth);
        char *buf = slots + s * job->slot_size;
        if (pending[s]) {
            pending[s] = 0;
            t = now_ns();
            rc = api.event_sync((void *)(uintptr_t)events[s]);
            spend(&w->wait_ns, &t);
            if (rc != 0) {
                fail(job, HW_ERR_CUDA, rc, "cuEventSynchronize", i, -1, -1);
                break;
            }
        }
        int64_t skip;
        const hw_chunk *c = &plan->chunks[n];
        if (job->fault_stage == HW_FAULT_READ && i == job->fault_chunk) {
            fail(job, HW_ERR_INJECTED, HW_FAULT_READ, "load.read", i, c->file, c->offset);
            break;
        }
        t = now_ns();
        rc = read_chunk(job, c, i, buf, job->direct[c->source] ? job->direct_request : 0, &skip);
        spend(&w->read_ns, &t);
        if (rc != 0) break;
        int64_t bytes = 0;
        for (int32_t p = 0; p < c->npieces; p++) {
            const hw_piece *pc = &plan->pieces[c->first_piece + p];
            if (job->fault_stage == HW_FAULT_COPY && i == job->fault_chunk) {
                /* as a failed copy: the chunk's earlier copies (none) stay queued, the event is recorded */
                fail(job, HW_ERR_INJECTED, HW_FAULT_COPY, "load.copy", i, c->file, c->offset);
                break;
            }
            const char *src = buf + skip + pc->src;
            if (host) {
                memcpy((void *)(uintptr_t)pc->dst, src, (size_t)pc->length);
            } else if ((rc = api.copy(pc->dst, src, (size_t)pc->length, stream)) != 0) {
                fail(job, HW_ERR_CUDA, rc, "cuMemcpyHtoDAsync", i, c->file, c->offset + pc->src);
                break;
            }
            bytes += pc->length;
        }
        if (!host) {
            /* Recorded even after a failed copy: the slot must not be reused before its queued copies ran. */
            if ((rc = api.event_record((void *)(uintptr_t)events[s], stream)) != 0)
                fail(job, HW_ERR_CUDA, rc, "cuEventRecord", i, -1, -1);
            else
                pending[s] = 1;
        }
        spend(&w->queue_ns, &t);
        __atomic_add_fetch(&job->reads, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&job->copies, c->npieces, __ATOMIC_RELAXED);
        __atomic_add_fetch(&job->done_bytes, bytes, __ATOMIC_RELAXED);
    }
    /* Whatever happened, no copy of this worker may still be in flight when the fill returns. */
    t = now_ns();
    if (!host && (rc = api.stream_sync(stream)) != 0) fail(job, HW_ERR_CUDA, rc, "cuStreamSynchronize", -1, -1, -1);
    spend(&w->drain_ns, &t);
    w->ended = t;
    return NULL;
}

static int setup_error(hw_job *job, const char *what) {
    fail(job, HW_ERR_SETUP, 0, what, -1, -1, -1);
    return job->err_kind;
}

/* Checks the plan against the ring before any read: a wrong plan must fail before any DMA. Every bound
 * is compared by subtraction, never by a sum that could pass INT64_MAX and wrap into range. */
static int validate(hw_job *job) {
    if (job->threads < 1 || job->threads > HW_MAX_THREADS || job->depth < 1 || job->depth > HW_MAX_DEPTH) return setup_error(job, "threads/depth");
    if (!job->host_base || job->slot_size <= 0 || job->slot_size % HW_DIRECT_ALIGN) return setup_error(job, "ring");
    if (!job->host_mode && (!job->streams || !job->events || !job->context)) return setup_error(job, "streams/events");
    if (job->nsources < 1 || !job->fds || !job->direct) return setup_error(job, "sources");
    if (job->nchunks < 0 || job->npieces < 0 || (job->nchunks && !job->chunks) || (job->npieces && !job->pieces))
        return setup_error(job, "plan");
    if (job->ncpus > 0 && !job->cpus) return setup_error(job, "cpus");
    if (job->direct_request < 0 || job->direct_request % HW_DIRECT_ALIGN) return setup_error(job, "direct request");
    if (job->direct_grid < 0 || job->direct_grid % HW_DIRECT_ALIGN) return setup_error(job, "direct grid");
    for (int64_t i = 0; i < job->nchunks; i++) {
        const hw_chunk *c = &job->chunks[i];
        if (c->file < 0 || c->source < 0 || c->source >= job->nsources || c->offset < 0 || c->length <= 0)
            return setup_error(job, "chunk");
        if (c->length > job->slot_size) return setup_error(job, "chunk larger than a slot");
        /* read_span rounds the chunk's end up to a whole block */
        if (c->offset > INT64_MAX - HW_DIRECT_ALIGN - c->length) return setup_error(job, "chunk past the largest offset");
        int64_t start, span;
        read_span(job, c, &start, &span);
        if (span > job->slot_size) return setup_error(job, "chunk larger than a slot");
        if (c->npieces < 0 || c->first_piece < 0 || c->first_piece > job->npieces || c->npieces > job->npieces - c->first_piece)
            return setup_error(job, "pieces");
        for (int32_t p = 0; p < c->npieces; p++) {
            const hw_piece *pc = &job->pieces[c->first_piece + p];
            if (pc->src < 0 || pc->length < 0 || pc->src > c->length || pc->length > c->length - pc->src)
                return setup_error(job, "piece");
        }
    }
    return HW_OK;
}

/* Whether chunk c is re-cut on the job's grid: read O_DIRECT and reaching over more than one window. */
static int recut_one(const hw_job *job, const hw_chunk *c) {
    int64_t g = job->direct_grid;
    return g > 0 && job->direct[c->source] && c->offset / g != (c->offset + c->length - 1) / g;
}

/* One window [lo, hi) of chunk c: the chunk it becomes (trimmed to its copies, so a hole read through
 * at either end of the window is not read) and its pieces; returns the pieces, 0 for a window with no
 * copy in it (not read). With out NULL it only counts. */
static int32_t cut_window(const hw_job *job, const hw_chunk *c, int64_t lo, int64_t hi, hw_chunk *out,
                          hw_piece *pieces) {
    int64_t start = lo > c->offset ? lo : c->offset, end = c->offset + c->length;
    int64_t stop = hi < end ? hi : end, first = INT64_MAX, last = 0;
    int32_t n = 0;
    for (int32_t p = 0; p < c->npieces; p++) {
        const hw_piece *pc = &job->pieces[c->first_piece + p];
        int64_t a = c->offset + pc->src, b = a + pc->length;
        if (a < start) a = start;
        if (b > stop) b = stop;
        if (a >= b) continue;
        if (out) pieces[n] = (hw_piece){.src = a, .dst = pc->dst + (uint64_t)(a - c->offset - pc->src), .length = b - a};
        if (a < first) first = a;
        if (b > last) last = b;
        n++;
    }
    if (out && n) {
        for (int32_t p = 0; p < n; p++) pieces[p].src -= first;
        *out = *c;
        out->offset = first;
        out->length = last - first;
        out->npieces = n;
    }
    return n;
}

/* The job's plan with each O_DIRECT chunk that reaches over more than one window of direct_grid bytes
 * re-cut into one chunk per window with copies in it, in place and in order: the same bytes to the same
 * places in smaller reads. The arrays are malloc'd (free_plan). Returns 1 with the plan untouched where no
 * chunk is cut (a warm fill), 0 with it re-cut, -1 out of memory. */
static int recut(const hw_job *job, hw_plan *plan) {
    int64_t g = job->direct_grid, nchunks = 0, npieces = 0, ncut = 0;
    for (int64_t i = 0; i < job->nchunks; i++) {
        const hw_chunk *c = &job->chunks[i];
        if (!recut_one(job, c)) {
            nchunks++;
            npieces += c->npieces;
            continue;
        }
        ncut++;
        for (int64_t lo = c->offset / g * g; lo < c->offset + c->length; lo += g) {
            int32_t n = cut_window(job, c, lo, lo + g, NULL, NULL);
            nchunks += n > 0;
            npieces += n;
        }
    }
    if (!ncut) return 1;
    hw_chunk *chunks = malloc(sizeof(hw_chunk) * (size_t)(nchunks ? nchunks : 1));
    hw_piece *pieces = malloc(sizeof(hw_piece) * (size_t)(npieces ? npieces : 1));
    int64_t *parent = malloc(sizeof(int64_t) * (size_t)(nchunks ? nchunks : 1));
    if (!chunks || !pieces || !parent) {
        free(chunks);
        free(pieces);
        free(parent);
        return -1;
    }
    int64_t nc = 0, np = 0;
    for (int64_t i = 0; i < job->nchunks; i++) {
        const hw_chunk *c = &job->chunks[i];
        if (!recut_one(job, c)) {
            chunks[nc] = *c;
            chunks[nc].first_piece = np;
            memcpy(&pieces[np], &job->pieces[c->first_piece], sizeof(hw_piece) * (size_t)c->npieces);
            np += c->npieces;
            parent[nc++] = i;
            continue;
        }
        for (int64_t lo = c->offset / g * g; lo < c->offset + c->length; lo += g) {
            int32_t n = cut_window(job, c, lo, lo + g, &chunks[nc], &pieces[np]);
            if (!n) continue;
            chunks[nc].first_piece = np;
            np += n;
            parent[nc++] = i;
        }
    }
    plan->chunks = chunks;
    plan->pieces = pieces;
    plan->parent = parent;
    plan->nchunks = nc;
    return 0;
}

static void free_plan(hw_plan *plan) {
    free((void *)plan->chunks);
    free((void *)plan->pieces);
    free((void *)plan->parent);
}

/* Runs the whole fill; returns 0 or the kind of the first error (details in the job). */
int hw_fill(hw_job *job) {
    int64_t t0 = now_ns();
    job->next = job->done_bytes = job->reads = job->copies = 0;
    job->wall_ns = job->setup_ns = job->read_ns = job->wait_ns = job->queue_ns = job->drain_ns = job->spread_ns = 0;
    job->err_kind = HW_OK;
    if (validate(job) != HW_OK) return job->err_kind;
    if (!job->host_mode) {
        pthread_once(&api_once, load_api);
        if (api.missing) return setup_error(job, api.missing);
    }
    hw_plan plan = {job->chunks, job->pieces, NULL, job->nchunks};
    int recut_rc = job->direct_grid > 0 ? recut(job, &plan) : 1;
    if (recut_rc < 0) return setup_error(job, "out of memory for the re-cut plan");
    int cut = recut_rc == 0; /* the plan's arrays are then ours to free */
    int n = job->threads;
    pthread_t tids[n];
    hw_worker ws[n];
    int started = 0;
    for (; started < n; started++) {
        ws[started].job = job;
        ws[started].plan = &plan;
        ws[started].index = started;
        ws[started].started = ws[started].ended = t0;
        ws[started].read_ns = ws[started].wait_ns = ws[started].queue_ns = ws[started].drain_ns = 0;
        int rc = pthread_create(&tids[started], NULL, worker, &ws[started]);
        if (rc != 0) {
            fail(job, HW_ERR_OS, rc, "pthread_create", -1, -1, -1);
            break;
        }
    }
    int64_t first_end = INT64_MAX, last_end = 0, last_start = t0;
    for (int k = 0; k < started; k++) {
        pthread_join(tids[k], NULL);
        if (ws[k].started > last_start) last_start = ws[k].started;
        if (ws[k].ended < first_end) first_end = ws[k].ended;
        if (ws[k].ended > last_end) last_end = ws[k].ended;
        job->read_ns += ws[k].read_ns;
        job->wait_ns += ws[k].wait_ns;
        job->queue_ns += ws[k].queue_ns;
        job->drain_ns += ws[k].drain_ns;
    }
    if (cut) free_plan(&plan);
    job->setup_ns = last_start - t0;
    job->spread_ns = started ? last_end - first_end : 0;
    job->wall_ns = now_ns() - t0;
    return job->err_kind;
}
