/* A stand-in libcuda.so.1 with the five driver calls the native engine (hwfill.c) makes, so that its
 * device path runs where there is no GPU. Device pointers are host addresses. A copy is queued on its
 * stream and run later, in order, by the stream's own thread, after a short delay: as on a GPU, the
 * source must stay as it was until the copy has run, so an engine that reuses a slot before waiting on
 * its event, or returns with copies in flight, leaves wrong bytes or pending copies the test can see.
 *
 * Beside the driver's names, fake_* calls make the handles and fail the n-th call of a kind. */

#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CONTEXT ((void *)(uintptr_t)0x5eed)
#define ERR_INVALID_VALUE 1
#define ERR_INVALID_CONTEXT 201
#define ERR_INVALID_HANDLE 400
#define STREAM_MAGIC 0x57
#define EVENT_MAGIC 0xe7

typedef struct op {
    uint64_t dst;
    const void *src;
    size_t n;
    struct op *next;
} op;

typedef struct {
    int magic;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    op *head, *tail;
    int64_t queued, done; /* copies queued on it, and run */
    pthread_t thread;
} stream;

typedef struct {
    int magic;
    stream *s;
    int64_t seq; /* done at record time: complete once the stream has run this many */
} event;

static __thread int has_context;
static long delay_ns = 100000;
static long calls[4], fail_at[4], fail_code[4]; /* per kind: copy, event sync, stream sync, event record */
static long pending;                             /* copies queued on any stream and not yet run */
static pthread_mutex_t count_mu = PTHREAD_MUTEX_INITIALIZER;
/* fake_hold: no stream starts a copy while held (every stream made is kept to be woken on release) */
static int held;
static stream *streams[1024];
static int nstreams;

enum { COPY, EVENT_SYNC, STREAM_SYNC, EVENT_RECORD };

/* The code the n-th call of a kind fails with (0: it goes on). */
static int injected(int kind) {
    pthread_mutex_lock(&count_mu);
    long n = ++calls[kind];
    int code = fail_at[kind] && n == fail_at[kind] ? (int)fail_code[kind] : 0;
    pthread_mutex_unlock(&count_mu);
    return code;
}

static void *run_stream(void *arg) {
    stream *s = arg;
    struct timespec pause = {0, delay_ns};
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->head || __atomic_load_n(&held, __ATOMIC_ACQUIRE)) pthread_cond_wait(&s->cv, &s->mu);
        op *o = s->head;
        pthread_mutex_unlock(&s->mu);
        nanosleep(&pause, NULL);
        memcpy((void *)(uintptr_t)o->dst, o->src, o->n);
        pthread_mutex_lock(&count_mu); /* before the stream says it ran: a synchronize sees it gone */
        pending--;
        pthread_mutex_unlock(&count_mu);
        pthread_mutex_lock(&s->mu);
        s->head = o->next;
        if (!s->head) s->tail = NULL;
        s->done++;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        free(o);
    }
    return NULL;
}

static void wait_done(stream *s, int64_t seq) {
    pthread_mutex_lock(&s->mu);
    while (s->done < seq) pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

int cuCtxSetCurrent(void *ctx) {
    if (ctx != CONTEXT) return ERR_INVALID_CONTEXT;
    has_context = 1;
    return 0;
}

int cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t n, void *handle) {
    stream *s = handle;
    if (!has_context) return ERR_INVALID_CONTEXT;
    if (!s || s->magic != STREAM_MAGIC) return ERR_INVALID_HANDLE;
    if (!dst || !src) return ERR_INVALID_VALUE;
    int code = injected(COPY);
    if (code) return code;
    op *o = calloc(1, sizeof(op));
    if (!o) return 2;
    o->dst = dst;
    o->src = src;
    o->n = n;
    pthread_mutex_lock(&count_mu);
    pending++;
    pthread_mutex_unlock(&count_mu);
    pthread_mutex_lock(&s->mu);
    if (s->tail) s->tail->next = o;
    else s->head = o;
    s->tail = o;
    s->queued++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int cuEventRecord(void *ev_handle, void *handle) {
    event *e = ev_handle;
    stream *s = handle;
    if (!has_context) return ERR_INVALID_CONTEXT;
    if (!e || e->magic != EVENT_MAGIC || !s || s->magic != STREAM_MAGIC) return ERR_INVALID_HANDLE;
    int code = injected(EVENT_RECORD);
    if (code) return code;
    pthread_mutex_lock(&s->mu);
    e->s = s;
    e->seq = s->queued;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int cuEventSynchronize(void *ev_handle) {
    event *e = ev_handle;
    if (!e || e->magic != EVENT_MAGIC) return ERR_INVALID_HANDLE;
    int code = injected(EVENT_SYNC);
    if (code) return code;
    if (e->s) wait_done(e->s, e->seq);
    return 0;
}

int cuStreamSynchronize(void *handle) {
    stream *s = handle;
    if (!s || s->magic != STREAM_MAGIC) return ERR_INVALID_HANDLE;
    int code = injected(STREAM_SYNC);
    /* a failed synchronize still leaves nothing in flight, as the engine's drain assumes of the driver:
     * where a real one does not (a sticky error), the context's copies are lost with it anyway */
    pthread_mutex_lock(&s->mu);
    int64_t all = s->queued;
    pthread_mutex_unlock(&s->mu);
    wait_done(s, all);
    return code;
}

void *fake_context(void) { return CONTEXT; }

void *fake_stream(void) {
    if (nstreams >= (int)(sizeof(streams) / sizeof(streams[0]))) return NULL;
    stream *s = calloc(1, sizeof(stream));
    if (!s) return NULL;
    s->magic = STREAM_MAGIC;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (pthread_create(&s->thread, NULL, run_stream, s) != 0) {
        free(s);
        return NULL;
    }
    pthread_detach(s->thread);
    pthread_mutex_lock(&count_mu);
    streams[nstreams++] = s;
    pthread_mutex_unlock(&count_mu);
    return s;
}

/* on: queued copies wait (an event recorded after them does not complete); off: they run again. */
void fake_hold(int on) {
    __atomic_store_n(&held, on, __ATOMIC_RELEASE);
    pthread_mutex_lock(&count_mu);
    int n = nstreams;
    pthread_mutex_unlock(&count_mu);
    for (int i = 0; i < n; i++) {
        pthread_mutex_lock(&streams[i]->mu);
        pthread_cond_broadcast(&streams[i]->cv);
        pthread_mutex_unlock(&streams[i]->mu);
    }
}

void *fake_event(void) {
    event *e = calloc(1, sizeof(event));
    if (e) e->magic = EVENT_MAGIC;
    return e;
}

/* From now on, the n-th call of kind (0 copy, 1 event synchronize, 2 stream synchronize, 3 event record)
 * returns code. */
void fake_fail(int kind, long n, long code) {
    pthread_mutex_lock(&count_mu);
    calls[kind] = 0;
    fail_at[kind] = n;
    fail_code[kind] = code;
    pthread_mutex_unlock(&count_mu);
}

long fake_calls(int kind) {
    pthread_mutex_lock(&count_mu);
    long n = calls[kind];
    pthread_mutex_unlock(&count_mu);
    return n;
}

long fake_pending(void) {
    pthread_mutex_lock(&count_mu);
    long n = pending;
    pthread_mutex_unlock(&count_mu);
    return n;
}
