/*
 * noodle._shm: the lock-free core of a pool segment.
 *
 * Only what Python cannot do lives here: compare-and-swap on words of a
 * shared mapping, the ready ring, the FIFO waiter queue and futex calls.
 * Every function returns a status code; noodle/segment.py turns codes into
 * exceptions (the faster-fifo split). The byte layout is documented in
 * noodle/layout.py; offsets arrive from Python, already validated, and are
 * checked again against the mapping's length here before any access.
 *
 * Robustness rule: a process may be SIGKILLed between any two instructions
 * (clients are not trusted to finish), so no operation leaves a state that
 * only its own continuation could repair. Concretely:
 *
 *  - Ring cells are one 64-bit word (seq:40 | value:24). A producer claims
 *    and fills a cell with one CAS; a consumer takes and empties it with one
 *    CAS. Advancing head/tail afterwards is a separate CAS that any other
 *    process helps with when it finds the cell already done. (Vyukov's
 *    queue stores seq after the CAS on head/tail; a kill in between wedges
 *    that cell for good.)
 *  - A consumer killed between popping an id and leasing the slot leaves a
 *    slot `ready` but absent from the ring; the supervisor's audit re-pushes
 *    it. Duplicate ids in the ring are harmless: leasing CASes the state
 *    word from `ready`, so a stale entry just fails and is skipped.
 *  - A waiter killed while queued leaves a ticket whose (pid, start time)
 *    is dead; the supervisor's sweep passes the turn on. It also passes it
 *    on from a live head waiter that does not run (stopped): that waiter
 *    finds its turn gone when it runs and queues again.
 *  - Nothing here walks a damaged ring or spins on one: an index is helped
 *    forward only past the one cell state a peer legally leaves behind, and
 *    anything else returns ST_CORRUPT for the integrity check to rebuild.
 *  - A wait gives the GIL up; Core.close() from another thread therefore
 *    only marks the object closing and wakes the waiters, and the mapping
 *    is released by the last call to leave. A signal returns to Python to
 *    run its handlers (the ticket is kept unless a handler raises).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- status codes (mirrored in noodle/layout.py) ------------------------ */
enum {
    ST_OK = 0,
    ST_EMPTY = 1,      /* nothing ready and no wait asked / timed out */
    ST_SHUTDOWN = 2,   /* the pool is shutting down */
    ST_STALE = 3,      /* state word did not match (stale lease / message) */
    ST_NOT_OWNER = 4,  /* release by a pid that does not hold the lease */
    ST_RANGE = 5,      /* slot id out of range */
    ST_FULL = 6,       /* ring full */
    ST_TOO_BIG = 7,    /* descriptor larger than its area */
    ST_CLOSED = 8,     /* this process closed its pool handle */
    ST_CORRUPT = 9,    /* ring head/tail/cells in no legal state: left for the integrity check */
    ST_HEARTBEAT = 10, /* the supervisor's heartbeat is stale: the caller checks it is alive */
    ST_INTR = 11,      /* internal: a signal interrupted the wait */
};

/* ---- state word: gen:38 | pid:22 | state:4 ------------------------------ */
#define W_STATE(w) ((uint32_t)((w) & 0xFu))
#define W_PID(w) ((uint32_t)(((w) >> 4) & 0x3FFFFFu))
#define W_GEN(w) ((uint64_t)((w) >> 26))
#define W_MAKE(state, gen, pid) \
    ((((uint64_t)(gen)) << 26) | (((uint64_t)(pid) & 0x3FFFFFu) << 4) | ((uint64_t)(state) & 0xFu))

enum { S_CLEAN = 1, S_PREPARE, S_SPAWN, S_READY, S_LEASED, S_TERMINATE, S_ABANDONED };

/* ---- ring cell: seq:40 | value:24 --------------------------------------- */
#define SEQ_BITS 40
#define SEQ_MASK ((1ULL << SEQ_BITS) - 1)
#define C_SEQ(c) ((c) >> 24)
#define C_VAL(c) ((uint32_t)((c) & 0xFFFFFFu))
#define C_MAKE(seq, val) ((((uint64_t)(seq) & SEQ_MASK) << 24) | ((uint64_t)(val) & 0xFFFFFFu))
/* signed distance between a 40-bit cell seq and a 64-bit position */
static inline int64_t seq_diff(uint64_t seq, uint64_t pos) {
    int64_t d = (int64_t)((seq - pos) & SEQ_MASK);
    if (d & (1LL << (SEQ_BITS - 1))) d -= (1LL << SEQ_BITS);
    return d;
}

/* ---- header words (offsets fixed by layout.py) --------------------------- */
#define H_HEARTBEAT 256
#define H_FLAGS 264
#define H_TAIL 320
#define H_HEAD 384
#define H_TICKETS 448
#define H_TURN 452
#define H_OVERFLOW 456
#define H_OVERFLOW_SEQ 460 /* bumped whenever a wait cell frees up: overflow waiters sleep on it */
#define FLAG_SHUTDOWN 1u

/* ---- slot record ---------------------------------------------------------- */
#define R_STATE 0
#define R_OWNER_START 8
#define R_OWNER_GEN 16
#define R_FAILURES 20
#define R_ENTERED 24
#define R_DESC_LEN 48

/* counter and histogram indices used from C (mirrored in layout.py) */
enum {
    K_ACQUIRES = 0, K_ACQUIRE_WAITS, K_WAIT_TIMEOUTS, K_RELEASES, K_STALE_RELEASES,
    K_FORGED_RELEASES, K_PUBLISHES, K_RING_FULL, K_STALE_RING, K_CORRUPT_RING, K_WAKEUPS,
    K_SHUTDOWN_REFUSALS,
    K_UNHEALTHY_ON_GET = 23, /* in the Python-updated block: C counts descriptors it refuses */
};
enum { HIST_ACQUIRE = 0, HIST_WAIT = 1 };
#define HIST_BUCKETS 64

/* ---- per-process identity, cached so the fast path makes no syscall ---- */
static uint32_t g_pid;
static uint64_t g_start;

static uint64_t read_start_time(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* comm may hold spaces and parentheses: fields resume after the last ')' */
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    p += 2; /* now at field 3 (state) */
    for (int field = 3; field < 22 && *p; p++)
        if (*p == ' ') field++;
    return strtoull(p, NULL, 10);
}

static void identity(void) {
    if (g_pid == 0) {
        g_pid = (uint32_t)getpid();
        g_start = read_start_time((pid_t)g_pid);
    }
}
static void forget_identity(void) { g_pid = 0; g_start = 0; }

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static long futex_wait(uint32_t *addr, uint32_t val, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tsp = &ts;
    }
    /* shared (not FUTEX_PRIVATE): waiters and wakers are different processes */
    return syscall(SYS_futex, addr, FUTEX_WAIT, val, tsp, NULL, 0);
}
static long futex_wake(uint32_t *addr, int n) { return syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0); }

/* ---- the Core object ------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    uint8_t *base;
    uint64_t size;
    uint32_t pool_size, ring_cap, slot_size, desc_cap, wait_cells;
    uint64_t cells_off, ring_off, slots_off, counters_off, n_counters, hist_off, n_hist;
    /* calls of this object waiting without the GIL; close() defers the unmap
       until the last one leaves (only touched with the GIL held) */
    int inflight;
    int closing; /* read without the GIL by waiting calls: atomic */
} Core;

#define U64(c, off) ((uint64_t *)((c)->base + (off)))
#define U32(c, off) ((uint32_t *)((c)->base + (off)))

static inline uint64_t *ring_cell(Core *c, uint64_t pos) { return U64(c, c->ring_off + 8 * (pos & (c->ring_cap - 1))); }
static inline uint8_t *slot_rec(Core *c, uint32_t slot) { return c->base + c->slots_off + (uint64_t)slot * c->slot_size; }
static inline uint64_t *slot_word(Core *c, uint32_t slot) { return (uint64_t *)slot_rec(c, slot); }
static inline uint64_t *wait_owner(Core *c, uint32_t t) { return U64(c, c->cells_off + 16 * (uint64_t)(t % c->wait_cells)); }
static inline uint32_t *wait_wake(Core *c, uint32_t t) { return U32(c, c->cells_off + 16 * (uint64_t)(t % c->wait_cells) + 8); }
static inline uint32_t *wait_start(Core *c, uint32_t t) { return U32(c, c->cells_off + 16 * (uint64_t)(t % c->wait_cells) + 12); }

static inline void count(Core *c, int k, uint64_t n) {
    if ((uint64_t)k < c->n_counters) __atomic_fetch_add(U64(c, c->counters_off + 8 * (uint64_t)k), n, __ATOMIC_RELAXED);
}
static inline void observe(Core *c, int h, uint64_t ns) {
    if ((uint64_t)h >= c->n_hist) return;
    int b = ns ? 64 - __builtin_clzll(ns) : 0;
    if (b >= HIST_BUCKETS - 1) b = HIST_BUCKETS - 2;  /* the last word is the maximum, not a bucket */
    uint64_t *hist = U64(c, c->hist_off + 8 * (uint64_t)h * HIST_BUCKETS);
    __atomic_fetch_add(&hist[b], 1, __ATOMIC_RELAXED);
    uint64_t top = __atomic_load_n(&hist[HIST_BUCKETS - 1], __ATOMIC_RELAXED);
    while (ns > top && !__atomic_compare_exchange_n(&hist[HIST_BUCKETS - 1], &top, ns, 1, __ATOMIC_RELAXED,
                                                    __ATOMIC_RELAXED)) {
    }
}
static inline int shutting_down(Core *c) {
    return (__atomic_load_n(U32(c, H_FLAGS), __ATOMIC_SEQ_CST) & FLAG_SHUTDOWN) != 0;
}

/* ---- ring ----------------------------------------------------------------- */
/* Helping is bounded by the cell it finds: an index is moved on only past a
   cell in the one state a live or dead peer legally leaves behind at that
   index. Anything else (a scribbled head, tail or cell) is reported as
   ST_CORRUPT at once, never walked one step at a time, and left for the
   supervisor's integrity check to rebuild. */
static int ring_push(Core *c, uint32_t value) {
    uint64_t *tailp = U64(c, H_TAIL);
    const int64_t cap = (int64_t)c->ring_cap;
    for (;;) {
        uint64_t pos = __atomic_load_n(tailp, __ATOMIC_ACQUIRE);
        uint64_t *cell = ring_cell(c, pos);
        uint64_t w = __atomic_load_n(cell, __ATOMIC_ACQUIRE);
        int64_t d = seq_diff(C_SEQ(w), pos);
        if (d == 0) {
            /* the cell is free for this lap: claim and fill in one step */
            if (__atomic_compare_exchange_n(cell, &w, C_MAKE(pos + 1, value), 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
                uint64_t expect = pos;
                __atomic_compare_exchange_n(tailp, &expect, pos + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
                return ST_OK;
            }
        } else if (d == 1 || d == cap) {
            /* filled at pos (and maybe consumed since) by a pusher that has
               not moved tail yet, or died first: help tail past it */
            uint64_t expect = pos;
            __atomic_compare_exchange_n(tailp, &expect, pos + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
        } else if (__atomic_load_n(tailp, __ATOMIC_ACQUIRE) != pos) {
            continue; /* tail moved while we looked: read again */
        } else if (d == 1 - cap) {
            return ST_FULL; /* the previous lap's item is still unconsumed */
        } else {
            return ST_CORRUPT;
        }
    }
}

static int ring_pop(Core *c, uint32_t *value) {
    uint64_t *headp = U64(c, H_HEAD);
    const int64_t cap = (int64_t)c->ring_cap;
    for (;;) {
        uint64_t pos = __atomic_load_n(headp, __ATOMIC_ACQUIRE);
        uint64_t *cell = ring_cell(c, pos);
        uint64_t w = __atomic_load_n(cell, __ATOMIC_ACQUIRE);
        int64_t d = seq_diff(C_SEQ(w), pos + 1);
        if (d == 0) {
            /* full for this lap: take and free it for lap+1 in one step */
            if (__atomic_compare_exchange_n(cell, &w, C_MAKE(pos + c->ring_cap, 0), 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_RELAXED)) {
                uint64_t expect = pos;
                __atomic_compare_exchange_n(headp, &expect, pos + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
                *value = C_VAL(w);
                return ST_OK;
            }
        } else if (d == cap - 1) {
            uint64_t expect = pos; /* consumed at pos, head not moved yet: help head past it */
            __atomic_compare_exchange_n(headp, &expect, pos + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
        } else if (__atomic_load_n(headp, __ATOMIC_ACQUIRE) != pos) {
            continue;
        } else if (d == -1) {
            return ST_EMPTY; /* free for this lap: nothing pushed here yet */
        } else {
            return ST_CORRUPT;
        }
    }
}

/* ---- waiter queue ---------------------------------------------------------- */
static void wake_cell(Core *c, uint32_t t) {
    __atomic_fetch_add(wait_wake(c, t), 1, __ATOMIC_SEQ_CST);
    futex_wake(wait_wake(c, t), INT_MAX);
}

/* Overflow waiters (more than wait_cells queued) sleep on a sequence word
   that changes whenever a wait cell frees up, so a wake between their check
   and their sleep is never lost; one is woken per freed cell. */
static void wake_overflow(Core *c, int n) {
    if (!__atomic_load_n(U32(c, H_OVERFLOW), __ATOMIC_SEQ_CST) && n != INT_MAX) return;
    __atomic_fetch_add(U32(c, H_OVERFLOW_SEQ), 1, __ATOMIC_SEQ_CST);
    futex_wake(U32(c, H_OVERFLOW_SEQ), n);
}

/* Hand the turn from `from` to the next live ticket, skipping cancelled ones. */
static void pass_turn(Core *c, uint32_t from) {
    uint32_t *turnp = U32(c, H_TURN);
    uint32_t t = from;
    for (;;) {
        uint32_t expect = t;
        if (!__atomic_compare_exchange_n(turnp, &expect, t + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) break;
        t++;
        wake_overflow(c, 1);
        if (__atomic_load_n(U32(c, H_TICKETS), __ATOMIC_SEQ_CST) == t) break;
        uint64_t o = __atomic_load_n(wait_owner(c, t), __ATOMIC_SEQ_CST);
        if ((uint32_t)(o >> 32) == t && (uint32_t)o == 0) continue; /* cancelled */
        wake_cell(c, t); /* registered, or about to register and will see turn */
        break;
    }
}

static void cancel_ticket(Core *c, uint32_t t, uint32_t pid) {
    uint64_t o = ((uint64_t)t << 32) | pid;
    __atomic_compare_exchange_n(wait_owner(c, t), &o, (uint64_t)t << 32, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
    if (__atomic_load_n(U32(c, H_TURN), __ATOMIC_SEQ_CST) == t) pass_turn(c, t);
}

/* Pop ids until one leases; stale and out-of-range ids are dropped. */
static int pop_and_lease(Core *c, uint64_t now, uint32_t *slot_out, uint64_t *gen_out) {
    uint32_t v;
    int st;
    while ((st = ring_pop(c, &v)) == ST_OK) {
        if (v >= c->pool_size) {
            count(c, K_CORRUPT_RING, 1);
            continue;
        }
        uint64_t *sw = slot_word(c, v);
        uint64_t w = __atomic_load_n(sw, __ATOMIC_ACQUIRE);
        while (W_STATE(w) == S_READY) {
            uint64_t nw = W_MAKE(S_LEASED, W_GEN(w), g_pid);
            if (__atomic_compare_exchange_n(sw, &w, nw, 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
                uint8_t *rec = slot_rec(c, v);
                /* start before gen, gen with release: a reader that loads
                   gen first (acquire) and then start sees a consistent pair */
                __atomic_store_n((uint64_t *)(rec + R_OWNER_START), g_start, __ATOMIC_RELAXED);
                __atomic_store_n((uint32_t *)(rec + R_OWNER_GEN), (uint32_t)W_GEN(w), __ATOMIC_RELEASE);
                __atomic_store_n((uint64_t *)(rec + R_ENTERED), now, __ATOMIC_RELAXED);
                *slot_out = v;
                *gen_out = W_GEN(w);
                return ST_OK;
            }
        }
        count(c, K_STALE_RING, 1);
    }
    if (st == ST_CORRUPT) count(c, K_CORRUPT_RING, 1);
    return ST_EMPTY;
}

static inline int closing(Core *c) { return __atomic_load_n(&c->closing, __ATOMIC_SEQ_CST); }

/* One acquire's progress, kept across returns to Python on a signal. */
typedef struct {
    uint64_t t0, deadline;
    uint32_t my;
    int queued;
} Wait;

/* First try: no queue, no deadline arithmetic. */
static int acquire_now(Core *c, uint64_t stale_ns, uint32_t *slot, uint64_t *gen) {
    if (shutting_down(c)) return ST_SHUTDOWN;
    uint64_t t0 = now_ns();
    if (stale_ns) {
        /* the supervisor beats every tick; silence means stopped or dead, and
           a dead pool's segment must not hand out instances */
        uint64_t hb = __atomic_load_n(U64(c, H_HEARTBEAT), __ATOMIC_ACQUIRE);
        if (hb == 0 || (t0 > hb && t0 - hb > stale_ns)) return ST_HEARTBEAT;
    }
    uint32_t tn = __atomic_load_n(U32(c, H_TURN), __ATOMIC_SEQ_CST);
    /* fast path only when nobody queues: a newcomer never overtakes a waiter */
    if (__atomic_load_n(U32(c, H_TICKETS), __ATOMIC_SEQ_CST) != tn) return ST_EMPTY;
    if (pop_and_lease(c, t0, slot, gen) != ST_OK) return ST_EMPTY;
    observe(c, HIST_ACQUIRE, now_ns() - t0);
    return ST_OK;
}

static long sleep_on(uint32_t *addr, uint32_t val, uint64_t deadline, uint64_t cap_ns) {
    uint64_t now = now_ns();
    int64_t left = deadline == UINT64_MAX ? -1 : (int64_t)(deadline - now);
    if (cap_ns && (left < 0 || (uint64_t)left > cap_ns)) left = (int64_t)cap_ns;
    return futex_wait(addr, val, left);
}

/* The queued part of an acquire. Runs without the GIL. Returns ST_INTR with
   the ticket still held when a signal interrupts the sleep: the caller runs
   Python's handlers and either resumes (same Wait) or cancels. */
static int acquire_wait(Core *c, Wait *ws, uint32_t *slot, uint64_t *gen) {
    uint32_t *ticketsp = U32(c, H_TICKETS), *turnp = U32(c, H_TURN);
    for (;;) {
        if (!ws->queued) {
            if (closing(c)) return ST_CLOSED;
            if (shutting_down(c)) return ST_SHUTDOWN;
            uint32_t seq = __atomic_load_n(U32(c, H_OVERFLOW_SEQ), __ATOMIC_SEQ_CST);
            uint32_t tn = __atomic_load_n(turnp, __ATOMIC_SEQ_CST);
            uint32_t tk = __atomic_load_n(ticketsp, __ATOMIC_SEQ_CST);
            if (now_ns() >= ws->deadline) {
                count(c, K_WAIT_TIMEOUTS, 1);
                return ST_EMPTY;
            }
            if ((uint32_t)(tk - tn) >= c->wait_cells) {
                /* every wait cell is taken: sleep until one frees up (a
                   bounded sleep too, in case the waker died in between) */
                __atomic_fetch_add(U32(c, H_OVERFLOW), 1, __ATOMIC_SEQ_CST);
                long r = sleep_on(U32(c, H_OVERFLOW_SEQ), seq, ws->deadline, 100000000ULL);
                int e = errno;
                __atomic_fetch_sub(U32(c, H_OVERFLOW), 1, __ATOMIC_SEQ_CST);
                if (r != 0 && e == EINTR) return ST_INTR;
                continue;
            }
            if (!__atomic_compare_exchange_n(ticketsp, &tk, tk + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) continue;
            ws->my = tk;
            ws->queued = 1;
            /* start time first: the owner word is what makes the cell ours */
            __atomic_store_n(wait_start(c, tk), (uint32_t)g_start, __ATOMIC_SEQ_CST);
            __atomic_store_n(wait_owner(c, tk), ((uint64_t)tk << 32) | g_pid, __ATOMIC_SEQ_CST);
        }
        uint32_t my = ws->my;
        uint32_t w = __atomic_load_n(wait_wake(c, my), __ATOMIC_SEQ_CST);
        if (closing(c)) { cancel_ticket(c, my, g_pid); ws->queued = 0; return ST_CLOSED; }
        if (shutting_down(c)) { cancel_ticket(c, my, g_pid); ws->queued = 0; return ST_SHUTDOWN; }
        uint32_t tn = __atomic_load_n(turnp, __ATOMIC_SEQ_CST);
        if (tn == my) {
            if (pop_and_lease(c, now_ns(), slot, gen) == ST_OK) {
                ws->queued = 0;
                pass_turn(c, my);
                observe(c, HIST_WAIT, now_ns() - ws->t0);
                return ST_OK;
            }
        } else if ((int32_t)(tn - my) > 0) {
            ws->queued = 0; /* the sweep passed our turn on (dead or stopped): queue again */
            continue;
        }
        if (now_ns() >= ws->deadline) {
            cancel_ticket(c, my, g_pid);
            ws->queued = 0;
            count(c, K_WAIT_TIMEOUTS, 1);
            return ST_EMPTY;
        }
        long r = sleep_on(wait_wake(c, my), w, ws->deadline, 0);
        if (r != 0 && errno == EINTR) return ST_INTR;
    }
}

/* ---- Python methods ------------------------------------------------------- */
static int check_slot(Core *c, long long slot) {
    if (slot < 0 || (unsigned long long)slot >= c->pool_size) {
        PyErr_Format(PyExc_IndexError, "slot %lld out of range 0..%u", slot, c->pool_size - 1);
        return -1;
    }
    return 0;
}

static int core_init(Core *self, PyObject *args, PyObject *kw) {
    PyObject *buf;
    unsigned long long cells_off, ring_off, slots_off, counters_off, n_counters, hist_off, n_hist;
    unsigned int pool_size, ring_cap, slot_size, desc_cap, wait_cells;
    (void)kw;
    if (!PyArg_ParseTuple(args, "OIIIIIKKKKKKK", &buf, &pool_size, &ring_cap, &slot_size, &desc_cap, &wait_cells,
                          &cells_off, &ring_off, &slots_off, &counters_off, &n_counters, &hist_off, &n_hist))
        return -1;
    if (self->has_view) {
        PyErr_SetString(PyExc_RuntimeError, "Core already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE) < 0) return -1;
    self->has_view = 1;
    self->base = self->view.buf;
    self->size = (uint64_t)self->view.len;
    /* re-check every region against the mapping: a bad header must not
       turn into an out-of-bounds access */
    int ok = pool_size >= 1 && pool_size <= (1u << 24) && ring_cap >= pool_size && (ring_cap & (ring_cap - 1)) == 0 &&
             wait_cells >= 1 && (wait_cells & (wait_cells - 1)) == 0 && slot_size >= 64 && slot_size % 8 == 0 && desc_cap <= slot_size - 64 &&
             ((uintptr_t)self->base % 64) == 0 && self->size >= 512 && cells_off % 8 == 0 && ring_off % 8 == 0 &&
             slots_off % 8 == 0 && counters_off % 8 == 0 && hist_off % 8 == 0 && cells_off >= 512 &&
             cells_off + 16ULL * wait_cells <= self->size && ring_off + 8ULL * ring_cap <= self->size &&
             slots_off + (uint64_t)slot_size * pool_size <= self->size &&
             counters_off + 8ULL * n_counters <= self->size &&
             hist_off + 8ULL * HIST_BUCKETS * n_hist <= self->size;
    if (!ok) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
        PyErr_SetString(PyExc_ValueError, "segment layout does not fit the mapping");
        return -1;
    }
    self->pool_size = pool_size;
    self->ring_cap = ring_cap;
    self->slot_size = slot_size;
    self->desc_cap = desc_cap;
    self->wait_cells = wait_cells;
    self->cells_off = cells_off;
    self->ring_off = ring_off;
    self->slots_off = slots_off;
    self->counters_off = counters_off;
    self->n_counters = n_counters;
    self->hist_off = hist_off;
    self->n_hist = n_hist;
    return 0;
}

static void core_dealloc(Core *self) {
    if (self->has_view) PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define CHECK_OPEN(self)                                                  \
    if (!(self)->has_view || (self)->closing) {                           \
        PyErr_SetString(PyExc_ValueError, "segment core is closed");      \
        return NULL;                                                      \
    }

static void drop_view(Core *self) {
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
        self->base = NULL;
    }
}

/* close() -> True when the mapping was let go now, False when calls of this
   object still wait without the GIL: they are woken, return ST_CLOSED, and
   the last one to leave lets the mapping go. */
static PyObject *core_close(Core *self, PyObject *unused) {
    (void)unused;
    if (!self->has_view) Py_RETURN_TRUE;
    if (self->closing) Py_RETURN_FALSE;
    __atomic_store_n(&self->closing, 1, __ATOMIC_SEQ_CST);
    if (self->inflight == 0) {
        drop_view(self);
        Py_RETURN_TRUE;
    }
    /* our waiters sleep on a wait cell or the overflow word: bump them all
       (other processes' waiters wake, find nothing changed, and sleep again) */
    for (uint32_t i = 0; i < self->wait_cells; i++) wake_cell(self, i);
    wake_overflow(self, INT_MAX);
    Py_RETURN_FALSE;
}

static void leave(Core *self) {
    if (--self->inflight == 0 && self->closing) drop_view(self);
}

/* leased -> terminate by the holder itself, without a terminate task: the
   supervisor's table scan finds the slot */
static void give_back(Core *self, uint32_t slot, uint64_t gen) {
    uint64_t w = W_MAKE(S_LEASED, gen, g_pid);
    if (__atomic_compare_exchange_n(slot_word(self, slot), &w, W_MAKE(S_TERMINATE, gen, 0), 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_RELAXED)) {
        __atomic_store_n((uint64_t *)(slot_rec(self, slot) + R_ENTERED), now_ns(), __ATOMIC_RELAXED);
        count(self, K_RELEASES, 1);
    }
}

/* The whole acquire, with the GIL held on entry and exit. The caller has
   done inflight++ and calls leave() when done with the mapping. Returns a
   status, or -1 with an exception set (a signal handler raised; the ticket
   is cancelled). */
static int do_acquire(Core *self, long long timeout, uint64_t stale_ns, uint32_t *slot, uint64_t *gen) {
    identity();
    int st = acquire_now(self, stale_ns, slot, gen);
    if (st == ST_EMPTY && timeout != 0) {
        Wait ws = {now_ns(), UINT64_MAX, 0, 0};
        if (timeout > 0) ws.deadline = ws.t0 + (uint64_t)timeout;
        count(self, K_ACQUIRE_WAITS, 1);
        for (;;) {
            Py_BEGIN_ALLOW_THREADS
            st = acquire_wait(self, &ws, slot, gen);
            Py_END_ALLOW_THREADS
            if (st != ST_INTR) break;
            /* EINTR: run Python's signal handlers now (KeyboardInterrupt,
               a SIGTERM handler); if none raises, wait on with the same
               ticket and deadline */
            if (PyErr_CheckSignals() < 0) {
                if (ws.queued) cancel_ticket(self, ws.my, g_pid);
                return -1;
            }
        }
        if (st == ST_OK && closing(self)) {
            give_back(self, *slot, *gen); /* closed while we were served: hand it straight back */
            st = ST_CLOSED;
        }
    }
    if (st == ST_OK) count(self, K_ACQUIRES, 1);
    else if (st == ST_SHUTDOWN) count(self, K_SHUTDOWN_REFUSALS, 1);
    return st;
}

/* rebuild_ring(): every cell free, head = tail at a position past both old
   ones, so neither index ever goes backwards (a peer's delayed CAS on an
   old index value then fails instead of landing in the new ring). */
static PyObject *core_rebuild_ring(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    uint64_t head = __atomic_load_n(U64(self, H_HEAD), __ATOMIC_ACQUIRE);
    uint64_t tail = __atomic_load_n(U64(self, H_TAIL), __ATOMIC_ACQUIRE);
    uint64_t base = (head > tail ? head : tail) + 2ULL * self->ring_cap;
    base &= ~(uint64_t)(self->ring_cap - 1);
    for (uint64_t pos = base; pos < base + self->ring_cap; pos++)
        __atomic_store_n(ring_cell(self, pos), C_MAKE(pos, 0), __ATOMIC_RELAXED);
    __atomic_store_n(U64(self, H_HEAD), base, __ATOMIC_SEQ_CST);
    __atomic_store_n(U64(self, H_TAIL), base, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *core_init_ring(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    for (uint64_t i = 0; i < self->ring_cap; i++) __atomic_store_n(ring_cell(self, i), C_MAKE(i, 0), __ATOMIC_RELAXED);
    __atomic_store_n(U64(self, H_HEAD), 0, __ATOMIC_RELAXED);
    __atomic_store_n(U64(self, H_TAIL), 0, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* acquire(timeout_ns) -> (status, slot, gen); timeout <0 waits forever, 0 never */
static PyObject *core_acquire(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(self);
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "acquire(timeout_ns)");
        return NULL;
    }
    long long timeout = PyLong_AsLongLong(args[0]);
    if (timeout == -1 && PyErr_Occurred()) return NULL;
    uint32_t slot = 0;
    uint64_t gen = 0;
    self->inflight++;
    int st = do_acquire(self, timeout, 0, &slot, &gen);
    leave(self);
    if (st < 0) return NULL;
    /* built by hand: Py_BuildValue's format parsing is a measurable share of
       a sub-microsecond call */
    PyObject *t = PyTuple_New(3);
    if (!t) return NULL;
    PyObject *a = PyLong_FromLong(st), *b = PyLong_FromUnsignedLong(slot), *c = PyLong_FromUnsignedLongLong(gen);
    if (!a || !b || !c) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(c);
        Py_DECREF(t);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, b);
    PyTuple_SET_ITEM(t, 2, c);
    return t;
}

/* A descriptor is handed out only if its length fits its area and it starts
   like a msgpack map (full decoding is left to first use). */
static int descriptor_plausible(const uint8_t *d, uint32_t n, uint32_t cap) {
    if (n == 0) return 1;
    if (n > cap) return 0;
    return (d[0] >= 0x80 && d[0] <= 0x8f) || d[0] == 0xde || d[0] == 0xdf;
}

/* ---- LeaseBase: the fields of noodle.client.Lease, filled in C -------------
   Building the lease object here, not in a Python __init__, is most of what
   makes Pool.get() cost little more than the acquire itself. */
typedef struct {
    PyObject_HEAD
    PyObject *pool, *raw, *desc, *instance;
    long long slot;
    unsigned long long generation;
    long owner_pid;
    char released;
} LeaseBase;

static void lease_dealloc(LeaseBase *self) {
    Py_CLEAR(self->pool);
    Py_CLEAR(self->raw);
    Py_CLEAR(self->desc);
    Py_CLEAR(self->instance);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A lease dropped unreleased by its holder is released by Lease._dropped()
   (a ResourceWarning and a release). Checked here, not in a Python
   __del__, so the common case (released) costs no Python call. */
static void lease_finalize(PyObject *self) {
    LeaseBase *l = (LeaseBase *)self;
    if (l->released || l->pool == NULL) return;
    identity();
    if ((uint32_t)l->owner_pid != g_pid) return; /* only the holder itself may release */
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *r = PyObject_CallMethod(self, "_dropped", NULL);
    if (!r) PyErr_WriteUnraisable(self);
    Py_XDECREF(r);
    PyErr_Restore(et, ev, tb);
}

static PyMemberDef lease_members[] = {
    {"slot", T_LONGLONG, offsetof(LeaseBase, slot), 0, "slot id"},
    {"generation", T_ULONGLONG, offsetof(LeaseBase, generation), 0, "the slot's generation when leased"},
    {"_pool", T_OBJECT, offsetof(LeaseBase, pool), 0, NULL},
    {"_raw", T_OBJECT, offsetof(LeaseBase, raw), 0, NULL},
    {"_desc", T_OBJECT, offsetof(LeaseBase, desc), 0, NULL},
    {"_instance", T_OBJECT, offsetof(LeaseBase, instance), 0, NULL},
    {"_owner_pid", T_LONG, offsetof(LeaseBase, owner_pid), 0, NULL},
    {"_released", T_BOOL, offsetof(LeaseBase, released), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject LeaseBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "noodle._shm.LeaseBase",
    .tp_basicsize = sizeof(LeaseBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)lease_dealloc,
    .tp_finalize = lease_finalize,
    .tp_members = lease_members,
    .tp_doc = "Storage of a lease (subclassed by noodle.client.Lease).",
};

static int lease_class_ok(PyObject *cls) {
    return PyType_Check(cls) && PyType_IsSubtype((PyTypeObject *)cls, &LeaseBaseType) &&
           ((PyTypeObject *)cls)->tp_basicsize == LeaseBaseType.tp_basicsize;
}

/* ---- plain_lease(cls): the lease class without the cost of a class statement
   A class statement makes a GC-tracked type whose instances are torn down
   by the generic subtype_dealloc (finalizer protocol, slots, dict, weakref
   walk): with the allocation, a tenth of a get() when the previous lease is
   dropped. plain_lease() makes the same class as a LeaseBase subtype
   without GC (a lease refers to its pool and handle; nothing refers back to
   a lease), gives it cls's attributes (methods, properties, docstring) and
   the deallocator below. */
static void lease_plain_dealloc(PyObject *self) {
    LeaseBase *l = (LeaseBase *)self;
    PyTypeObject *tp = Py_TYPE(self);
    /* the finalizer (Lease._dropped) only for a lease dropped unreleased */
    if (!l->released && l->pool != NULL && PyObject_CallFinalizerFromDealloc(self) < 0) return; /* resurrected */
    Py_CLEAR(l->pool);
    Py_CLEAR(l->raw);
    Py_CLEAR(l->desc);
    Py_CLEAR(l->instance);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *mod_plain_lease(PyObject *m, PyObject *arg) {
    (void)m;
    if (!PyType_Check(arg) || ((PyTypeObject *)arg)->tp_base != &LeaseBaseType ||
        ((PyTypeObject *)arg)->tp_basicsize != LeaseBaseType.tp_basicsize ||
        ((PyTypeObject *)arg)->tp_dictoffset != 0 || ((PyTypeObject *)arg)->tp_weaklistoffset != 0 ||
        (((PyTypeObject *)arg)->tp_flags & Py_TPFLAGS_MANAGED_DICT)) {
        PyErr_SetString(PyExc_TypeError, "plain_lease(cls): cls subclasses LeaseBase directly with __slots__ = ()");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)arg;
    PyObject *dict = cls->tp_dict, *module = PyDict_GetItemString(dict, "__module__"), *qual = NULL, *name = NULL;
    PyObject *bases = NULL, *type = NULL;
    if (!module || !PyUnicode_Check(module)) {
        PyErr_SetString(PyExc_TypeError, "plain_lease(cls): cls has no __module__");
        return NULL;
    }
    qual = PyObject_GetAttrString(arg, "__qualname__");
    if (!qual) return NULL;
    name = PyUnicode_FromFormat("%U.%U", module, qual);
    if (!name) goto done;
    const char *utf8 = PyUnicode_AsUTF8(name); /* copied by the type (3.11+: _ht_tpname) */
    if (!utf8) goto done;
    PyType_Slot slots[] = {
        {Py_tp_dealloc, (void *)lease_plain_dealloc},
        {Py_tp_finalize, (void *)lease_finalize},
        {0, NULL},
    };
    PyType_Spec spec = {utf8, (int)sizeof(LeaseBase), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, slots};
    bases = PyTuple_Pack(1, (PyObject *)&LeaseBaseType);
    if (!bases) goto done;
    type = PyType_FromSpecWithBases(&spec, bases);
    if (!type) goto done;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        if (PyUnicode_Check(key) && (PyUnicode_CompareWithASCIIString(key, "__dict__") == 0 ||
                                     PyUnicode_CompareWithASCIIString(key, "__weakref__") == 0))
            continue;
        if (PyObject_SetAttr(type, key, value) < 0) {
            Py_CLEAR(type);
            goto done;
        }
    }
    if (PyObject_SetAttrString(type, "__qualname__", qual) < 0) Py_CLEAR(type);
done:
    Py_XDECREF(qual);
    Py_XDECREF(name);
    Py_XDECREF(bases);
    return type;
}

/* Acquire and build the lease object in one go. Returns a new lease, or NULL
   with *status set: a status code, or -1 with an exception set. The caller
   has checked the core is open and cls with lease_class_ok(). */
static PyObject *lease_from(Core *self, PyTypeObject *cls, PyObject *pool, long long timeout, uint64_t stale,
                            int *status) {
    uint32_t slot = 0;
    uint64_t gen = 0;
    self->inflight++;
    for (;;) {
        int st = do_acquire(self, timeout, stale, &slot, &gen);
        if (st != ST_OK) {
            leave(self);
            *status = st;
            return NULL;
        }
        uint8_t *rec = slot_rec(self, slot);
        uint32_t n = __atomic_load_n((uint32_t *)(rec + R_DESC_LEN), __ATOMIC_ACQUIRE);
        if (!descriptor_plausible(rec + 64, n, self->desc_cap)) {
            give_back(self, slot, gen);
            count(self, K_UNHEALTHY_ON_GET, 1);
            continue;
        }
        PyObject *raw = PyBytes_FromStringAndSize((const char *)rec + 64, (Py_ssize_t)n);
        leave(self);
        *status = -1;
        if (!raw) return NULL;
        LeaseBase *l = (LeaseBase *)cls->tp_alloc(cls, 0);
        if (!l) {
            Py_DECREF(raw);
            return NULL;
        }
        Py_INCREF(pool);
        l->pool = pool;
        l->raw = raw;
        l->slot = slot;
        l->generation = gen;
        l->owner_pid = (long)g_pid;
        return (PyObject *)l;
    }
}

/* lease(cls, pool, timeout_ns, stale_ns) -> cls instance or a status int:
   get() building the lease object directly (cls: a LeaseBase subclass
   adding no fields). */
static PyObject *core_lease(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(self);
    if (nargs != 4 || !lease_class_ok(args[0])) {
        PyErr_SetString(PyExc_TypeError, "lease(cls, pool, timeout_ns, stale_ns): cls extends LeaseBase, no fields");
        return NULL;
    }
    long long timeout = PyLong_AsLongLong(args[2]);
    if (timeout == -1 && PyErr_Occurred()) return NULL;
    unsigned long long stale = PyLong_AsUnsignedLongLong(args[3]);
    if (stale == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    int st;
    PyObject *l = lease_from(self, (PyTypeObject *)args[0], args[1], timeout, stale, &st);
    if (l || st < 0) return l;
    return PyLong_FromLong(st);
}

/* release(slot, gen) -> status; only the holder pid may release */
static PyObject *core_release(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_OPEN(self);
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "release(slot, gen)");
        return NULL;
    }
    long long slot = PyLong_AsLongLong(args[0]);
    unsigned long long gen = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (slot < 0 || (unsigned long long)slot >= self->pool_size) return PyLong_FromLong(ST_RANGE);
    identity();
    uint64_t *sw = slot_word(self, (uint32_t)slot);
    uint64_t w = __atomic_load_n(sw, __ATOMIC_ACQUIRE);
    for (;;) {
        if (W_STATE(w) != S_LEASED || W_GEN(w) != gen) {
            count(self, K_STALE_RELEASES, 1);
            return PyLong_FromLong(ST_STALE);
        }
        if (W_PID(w) != (g_pid & 0x3FFFFFu)) {
            count(self, K_FORGED_RELEASES, 1);
            return PyLong_FromLong(ST_NOT_OWNER);
        }
        if (__atomic_compare_exchange_n(sw, &w, W_MAKE(S_TERMINATE, gen, 0), 0, __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
            __atomic_store_n((uint64_t *)(slot_rec(self, (uint32_t)slot) + R_ENTERED), now_ns(), __ATOMIC_RELAXED);
            count(self, K_RELEASES, 1);
            return PyLong_FromLong(ST_OK);
        }
    }
}

/* publish(slot, expected_word, descriptor) -> status: spawn -> ready, push */
static PyObject *core_publish(Core *self, PyObject *args) {
    CHECK_OPEN(self);
    long long slot;
    unsigned long long expected;
    Py_buffer desc;
    if (!PyArg_ParseTuple(args, "LKy*", &slot, &expected, &desc)) return NULL;
    if (slot < 0 || (unsigned long long)slot >= self->pool_size) {
        PyBuffer_Release(&desc);
        return PyLong_FromLong(ST_RANGE);
    }
    if ((uint64_t)desc.len > self->desc_cap) {
        PyBuffer_Release(&desc);
        return PyLong_FromLong(ST_TOO_BIG);
    }
    uint8_t *rec = slot_rec(self, (uint32_t)slot);
    uint64_t *sw = slot_word(self, (uint32_t)slot);
    if (__atomic_load_n(sw, __ATOMIC_ACQUIRE) != expected || W_STATE(expected) != S_SPAWN) {
        PyBuffer_Release(&desc);
        return PyLong_FromLong(ST_STALE);
    }
    /* descriptor first: a client that leases it must find it complete */
    memcpy(rec + 64, desc.buf, (size_t)desc.len);
    __atomic_store_n((uint32_t *)(rec + R_DESC_LEN), (uint32_t)desc.len, __ATOMIC_RELEASE);
    PyBuffer_Release(&desc);
    uint64_t w = expected;
    if (!__atomic_compare_exchange_n(sw, &w, W_MAKE(S_READY, W_GEN(expected) + 1, 0), 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        return PyLong_FromLong(ST_STALE);
    __atomic_store_n((uint64_t *)(rec + R_ENTERED), now_ns(), __ATOMIC_RELAXED);
    int st = ring_push(self, (uint32_t)slot);
    if (st != ST_OK) {
        count(self, K_RING_FULL, 1); /* the slot stays ready; the audit re-pushes it */
        return PyLong_FromLong(st);
    }
    count(self, K_PUBLISHES, 1);
    /* wake the head waiter only when somebody queues */
    uint32_t tn = __atomic_load_n(U32(self, H_TURN), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(U32(self, H_TICKETS), __ATOMIC_SEQ_CST) != tn) {
        count(self, K_WAKEUPS, 1);
        wake_cell(self, tn);
    }
    return PyLong_FromLong(ST_OK);
}

/* push(slot) -> status: re-queue a ready slot found missing from the ring */
static PyObject *core_push(Core *self, PyObject *arg) {
    CHECK_OPEN(self);
    long long slot = PyLong_AsLongLong(arg);
    if (slot == -1 && PyErr_Occurred()) return NULL;
    if (check_slot(self, slot) < 0) return NULL;
    int st = ring_push(self, (uint32_t)slot);
    if (st == ST_OK) {
        uint32_t tn = __atomic_load_n(U32(self, H_TURN), __ATOMIC_SEQ_CST);
        if (__atomic_load_n(U32(self, H_TICKETS), __ATOMIC_SEQ_CST) != tn) wake_cell(self, tn);
    }
    return PyLong_FromLong(st);
}

/* pop() -> slot id or -1: raw ring access for tests and benchmarks */
static PyObject *core_pop(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    uint32_t v;
    if (ring_pop(self, &v) != ST_OK) return PyLong_FromLong(-1);
    return PyLong_FromUnsignedLong(v);
}

static PyObject *core_load(Core *self, PyObject *arg) {
    CHECK_OPEN(self);
    long long slot = PyLong_AsLongLong(arg);
    if (slot == -1 && PyErr_Occurred()) return NULL;
    if (check_slot(self, slot) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n(slot_word(self, (uint32_t)slot), __ATOMIC_ACQUIRE));
}

/* cas(slot, expected, new) -> bool; stamps the entered time on success */
static PyObject *core_cas(Core *self, PyObject *args) {
    CHECK_OPEN(self);
    long long slot;
    unsigned long long expected, desired;
    if (!PyArg_ParseTuple(args, "LKK", &slot, &expected, &desired)) return NULL;
    if (check_slot(self, slot) < 0) return NULL;
    uint64_t e = expected;
    int ok = __atomic_compare_exchange_n(slot_word(self, (uint32_t)slot), &e, (uint64_t)desired, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_RELAXED);
    if (ok) __atomic_store_n((uint64_t *)(slot_rec(self, (uint32_t)slot) + R_ENTERED), now_ns(), __ATOMIC_RELAXED);
    return PyBool_FromLong(ok);
}

/* states() -> list of every slot's state word, one pass, no locks */
static PyObject *core_states(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    PyObject *out = PyList_New(self->pool_size);
    if (!out) return NULL;
    for (uint32_t i = 0; i < self->pool_size; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(__atomic_load_n(slot_word(self, i), __ATOMIC_ACQUIRE));
        if (!v) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

/* ring_ids() -> list of ids currently queued (a racy snapshot, for audits) */
static PyObject *core_ring_ids(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    uint64_t head = __atomic_load_n(U64(self, H_HEAD), __ATOMIC_ACQUIRE);
    for (uint64_t pos = head; pos < head + self->ring_cap; pos++) {
        uint64_t w = __atomic_load_n(ring_cell(self, pos), __ATOMIC_ACQUIRE);
        if (seq_diff(C_SEQ(w), pos + 1) != 0) continue;
        PyObject *v = PyLong_FromUnsignedLong(C_VAL(w));
        if (!v || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

/* queue_info() -> (head, tail, tickets, turn). Turn is read before
   tickets: turn never passes tickets, so the pair read in this order never
   shows turn ahead of tickets (which would look like a corrupt queue). */
static PyObject *core_queue_info(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    unsigned long long head = __atomic_load_n(U64(self, H_HEAD), __ATOMIC_SEQ_CST);
    unsigned long long tail = __atomic_load_n(U64(self, H_TAIL), __ATOMIC_SEQ_CST);
    uint32_t turn = __atomic_load_n(U32(self, H_TURN), __ATOMIC_SEQ_CST);
    uint32_t tickets = __atomic_load_n(U32(self, H_TICKETS), __ATOMIC_SEQ_CST);
    return Py_BuildValue("(KKII)", head, tail, tickets, turn);
}

/* head_waiter() -> None or (ticket, pid, registered, start32): who holds the
   turn, for the sweep; start32 is the low 32 bits of the waiter's start time
   (0 when not registered or when the owner word changed while we read). */
static PyObject *core_head_waiter(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    uint32_t tn = __atomic_load_n(U32(self, H_TURN), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(U32(self, H_TICKETS), __ATOMIC_SEQ_CST) == tn) Py_RETURN_NONE;
    uint64_t o = __atomic_load_n(wait_owner(self, tn), __ATOMIC_SEQ_CST);
    uint32_t start = __atomic_load_n(wait_start(self, tn), __ATOMIC_SEQ_CST);
    int registered = (uint32_t)(o >> 32) == tn && __atomic_load_n(wait_owner(self, tn), __ATOMIC_SEQ_CST) == o;
    return Py_BuildValue("(IIOI)", tn, registered ? (uint32_t)o : 0u, registered ? Py_True : Py_False,
                         registered ? start : 0u);
}

/* skip_waiter(ticket) -> bool: pass the turn on from a dead head waiter */
static PyObject *core_skip_waiter(Core *self, PyObject *arg) {
    CHECK_OPEN(self);
    unsigned long t = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred()) return NULL;
    uint32_t tn = __atomic_load_n(U32(self, H_TURN), __ATOMIC_SEQ_CST);
    if (tn != (uint32_t)t) Py_RETURN_FALSE;
    pass_turn(self, tn);
    Py_RETURN_TRUE;
}

/* ring_anomalies() -> (head, tail, bad): cells in no state the ring can
   legally be in. Inside [head, tail) every cell is full for its position,
   except the cell at head, which a consumer may have emptied before moving
   head (it may have died there: legal, the next pop completes it). From
   tail on every cell is free for its position, except the cell at tail,
   which a producer may have filled before moving tail. A span outside
   [-1, capacity] counts every cell. Concurrent operations show as a few
   transient mismatches; the caller acts only on a result that repeats. */
static PyObject *core_ring_anomalies(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    uint64_t head = __atomic_load_n(U64(self, H_HEAD), __ATOMIC_ACQUIRE);
    uint64_t tail = __atomic_load_n(U64(self, H_TAIL), __ATOMIC_ACQUIRE);
    uint64_t bad = 0, cap = self->ring_cap;
    int64_t span = (int64_t)(tail - head);
    if (span < -1 || span > (int64_t)cap) {
        bad = cap;
    } else {
        for (uint64_t k = 0; k < cap; k++) {
            uint64_t pos = head + k;
            uint64_t w = __atomic_load_n(ring_cell(self, pos), __ATOMIC_ACQUIRE);
            int full = seq_diff(C_SEQ(w), pos + 1) == 0 && C_VAL(w) < self->pool_size;
            int free_ = seq_diff(C_SEQ(w), pos) == 0;
            int ok;
            if ((int64_t)k < span)
                ok = full || (k == 0 && seq_diff(C_SEQ(w), pos + cap) == 0);
            else
                ok = free_ || (pos == tail && full);
            if (!ok) bad++;
        }
    }
    return Py_BuildValue("(KKK)", (unsigned long long)head, (unsigned long long)tail, (unsigned long long)bad);
}

/* reset_waiters(): after corruption of the ticket words, serve nobody's
   stale ticket: turn = tickets, every waiter woken (it re-queues). */
static PyObject *core_reset_waiters(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    uint32_t tk = __atomic_load_n(U32(self, H_TICKETS), __ATOMIC_SEQ_CST);
    __atomic_store_n(U32(self, H_TURN), tk, __ATOMIC_SEQ_CST);
    __atomic_store_n(U32(self, H_OVERFLOW), 0, __ATOMIC_SEQ_CST);
    for (uint32_t i = 0; i < self->wait_cells; i++) wake_cell(self, i);
    wake_overflow(self, INT_MAX);
    Py_RETURN_NONE;
}

/* shutdown(): set the flag and wake every waiter */
static PyObject *core_shutdown(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    __atomic_fetch_or(U32(self, H_FLAGS), FLAG_SHUTDOWN, __ATOMIC_SEQ_CST);
    uint32_t tn = __atomic_load_n(U32(self, H_TURN), __ATOMIC_SEQ_CST);
    uint32_t tk = __atomic_load_n(U32(self, H_TICKETS), __ATOMIC_SEQ_CST);
    for (uint32_t t = tn; t != tk && (uint32_t)(t - tn) < self->wait_cells; t++) wake_cell(self, t);
    wake_overflow(self, INT_MAX);
    Py_RETURN_NONE;
}

static PyObject *core_count(Core *self, PyObject *args) {
    CHECK_OPEN(self);
    int k;
    unsigned long long n = 1;
    if (!PyArg_ParseTuple(args, "i|K", &k, &n)) return NULL;
    if (k < 0 || (uint64_t)k >= self->n_counters) {
        PyErr_Format(PyExc_IndexError, "counter %d out of range", k);
        return NULL;
    }
    count(self, k, n);
    Py_RETURN_NONE;
}

static PyObject *core_observe(Core *self, PyObject *args) {
    CHECK_OPEN(self);
    int h;
    unsigned long long ns;
    if (!PyArg_ParseTuple(args, "iK", &h, &ns)) return NULL;
    if (h < 0 || (uint64_t)h >= self->n_hist) {
        PyErr_Format(PyExc_IndexError, "histogram %d out of range", h);
        return NULL;
    }
    observe(self, h, ns);
    Py_RETURN_NONE;
}

/* atomic 64-bit load/store/add at a byte offset (heartbeat, flags, fields) */
static PyObject *core_load64(Core *self, PyObject *arg) {
    CHECK_OPEN(self);
    unsigned long long off = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (off % 8 || self->size < 8 || off > self->size - 8) {
        PyErr_SetString(PyExc_IndexError, "offset out of range");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(__atomic_load_n(U64(self, off), __ATOMIC_ACQUIRE));
}

static PyObject *core_store64(Core *self, PyObject *args) {
    CHECK_OPEN(self);
    unsigned long long off, v;
    if (!PyArg_ParseTuple(args, "KK", &off, &v)) return NULL;
    if (off % 8 || self->size < 8 || off > self->size - 8) {
        PyErr_SetString(PyExc_IndexError, "offset out of range");
        return NULL;
    }
    __atomic_store_n(U64(self, off), (uint64_t)v, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"close", (PyCFunction)core_close, METH_NOARGS, "Release the mapping (idempotent)."},
    {"init_ring", (PyCFunction)core_init_ring, METH_NOARGS, "Set every cell free for lap 0 (creator only)."},
    {"acquire", (PyCFunction)(void (*)(void))core_acquire, METH_FASTCALL, "acquire(timeout_ns) -> (status, slot, gen)"},
    {"lease", (PyCFunction)(void (*)(void))core_lease, METH_FASTCALL,
     "lease(cls, pool, timeout_ns, stale_ns) -> cls instance or status"},
    {"rebuild_ring", (PyCFunction)core_rebuild_ring, METH_NOARGS, "Empty the ring at positions past head and tail."},
    {"release", (PyCFunction)(void (*)(void))core_release, METH_FASTCALL, "release(slot, gen) -> status"},
    {"publish", (PyCFunction)core_publish, METH_VARARGS, "publish(slot, expected_word, descriptor) -> status"},
    {"push", (PyCFunction)core_push, METH_O, "push(slot) -> status"},
    {"pop", (PyCFunction)core_pop, METH_NOARGS, "pop() -> slot or -1 (raw ring)"},
    {"load", (PyCFunction)core_load, METH_O, "load(slot) -> state word"},
    {"cas", (PyCFunction)core_cas, METH_VARARGS, "cas(slot, expected, new) -> bool"},
    {"states", (PyCFunction)core_states, METH_NOARGS, "states() -> [word, ...]"},
    {"ring_ids", (PyCFunction)core_ring_ids, METH_NOARGS, "ring_ids() -> [slot, ...]"},
    {"queue_info", (PyCFunction)core_queue_info, METH_NOARGS, "(head, tail, tickets, turn)"},
    {"head_waiter", (PyCFunction)core_head_waiter, METH_NOARGS, "None or (ticket, pid, registered)"},
    {"skip_waiter", (PyCFunction)core_skip_waiter, METH_O, "skip_waiter(ticket) -> bool"},
    {"shutdown", (PyCFunction)core_shutdown, METH_NOARGS, "Set the shutdown flag, wake all waiters."},
    {"ring_anomalies", (PyCFunction)core_ring_anomalies, METH_NOARGS, "(head, tail, inconsistent cells)"},
    {"reset_waiters", (PyCFunction)core_reset_waiters, METH_NOARGS, "turn = tickets; wake every waiter"},
    {"count", (PyCFunction)core_count, METH_VARARGS, "count(counter, n=1)"},
    {"observe", (PyCFunction)core_observe, METH_VARARGS, "observe(histogram, ns)"},
    {"load64", (PyCFunction)core_load64, METH_O, "load64(offset) -> int"},
    {"store64", (PyCFunction)core_store64, METH_VARARGS, "store64(offset, value)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "noodle._shm.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_doc = "Lock-free operations on one mapped pool segment.",
};

/* ---- PoolBase: Pool.get()'s ready case, without a Python frame ------------
   noodle.client.Pool subclasses this. get() takes a ready slot and builds the
   lease here; every other case (handle closed, health check on get, nothing
   ready, stale heartbeat, shutdown, an error) goes to the Python method
   ``_get_slow(status, *args, **kwargs)`` with get()'s own arguments, so the
   defaults, the waiting and every exception are decided in one place. */
#define UNTRIED (-1) /* not a status: the first try was skipped (mirrored in client.py) */

typedef struct {
    PyObject_HEAD
    Core *core;          /* NULL until _bind() */
    PyTypeObject *lease; /* a LeaseBase subclass adding no fields */
    unsigned long long stale_ns;
    char closed;
    char default_health;
} PoolBase;

static PyObject *str_get_slow, *str_timeout, *str_health;

static int pool_traverse(PoolBase *self, visitproc visit, void *arg) {
    Py_VISIT(self->core);
    Py_VISIT(self->lease);
    return 0;
}

static int pool_clear(PoolBase *self) {
    Py_CLEAR(self->core);
    Py_CLEAR(self->lease);
    return 0;
}

static void pool_dealloc(PoolBase *self) {
    PyObject_GC_UnTrack(self);
    pool_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _bind(core, lease_cls, stale_ns): what get() uses, checked once here */
static PyObject *pool_bind(PoolBase *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !Py_IS_TYPE(args[0], &CoreType) || !lease_class_ok(args[1])) {
        PyErr_SetString(PyExc_TypeError, "_bind(core, lease_cls, stale_ns): a Core, a LeaseBase subclass without fields");
        return NULL;
    }
    unsigned long long stale = PyLong_AsUnsignedLongLong(args[2]);
    if (stale == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(self->core, (Core *)args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(self->lease, (PyTypeObject *)args[1]);
    self->stale_ns = stale;
    Py_RETURN_NONE;
}

static int kw_is(PyObject *key, PyObject *name) {
    return key == name || PyUnicode_Compare(key, name) == 0;
}

static PyObject *pool_get(PoolBase *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "get() takes at most 2 positional arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *timeout = nargs > 0 ? args[0] : NULL, *health = nargs > 1 ? args[1] : NULL;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i), **into;
        if (kw_is(key, str_timeout)) into = &timeout;
        else if (kw_is(key, str_health)) into = &health;
        else {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_TypeError, "get() got an unexpected keyword argument '%S'", key);
            return NULL;
        }
        if (*into) {
            PyErr_Format(PyExc_TypeError, "get() got multiple values for argument '%S'", key);
            return NULL;
        }
        *into = args[nargs + i];
    }
    int check;
    if (health == NULL || health == Py_None) check = self->default_health;
    else if ((check = PyObject_IsTrue(health)) < 0) return NULL;
    int st = UNTRIED;
    Core *c = self->core;
    /* first try: no queue, no deadline; the heartbeat is checked with the
       clock read the acquire makes anyway */
    if (!check && !self->closed && c && c->has_view && !c->closing) {
        PyObject *l = lease_from(c, self->lease, (PyObject *)self, 0, self->stale_ns, &st);
        if (l || st < 0) return l;
    }
    PyObject *stack[1 + 1 + 2 + 2];
    stack[0] = (PyObject *)self;
    stack[1] = PyLong_FromLong(st);
    if (!stack[1]) return NULL;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++) stack[2 + i] = args[i];
    PyObject *r = PyObject_VectorcallMethod(str_get_slow, stack, (size_t)(2 + nargs), kwnames);
    Py_DECREF(stack[1]);
    return r;
}

static PyMethodDef pool_methods[] = {
    {"get", (PyCFunction)(void (*)(void))pool_get, METH_FASTCALL | METH_KEYWORDS,
     "get(timeout=<the pool's get_timeout>, health=None) -> Lease\n\n"
     "Lease a ready instance. Waits up to ``timeout`` seconds (the pool's\n"
     "``get_timeout`` by default, None for ever), in arrival order.\n\n"
     "Raises PoolStarved on timeout, PoolShuttingDown once the pool stops\n"
     "and PoolClosed if this handle is closed meanwhile (from another\n"
     "thread). With ``health`` (default: the pool's ``health_on_get``) the\n"
     "kind's health check runs first; an unhealthy instance is released for\n"
     "termination and the next one is tried. A signal handler that raises\n"
     "(KeyboardInterrupt) interrupts the wait; the place in line is given up."},
    {"_bind", (PyCFunction)(void (*)(void))pool_bind, METH_FASTCALL, "_bind(core, lease_cls, stale_ns)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef pool_members[] = {
    {"_core", T_OBJECT, offsetof(PoolBase, core), READONLY, NULL},
    {"_closed", T_BOOL, offsetof(PoolBase, closed), 0, NULL},
    {"_default_health", T_BOOL, offsetof(PoolBase, default_health), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject PoolBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "noodle._shm.PoolBase",
    .tp_basicsize = sizeof(PoolBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_traverse = (traverseproc)pool_traverse,
    .tp_clear = (inquiry)pool_clear,
    .tp_methods = pool_methods,
    .tp_members = pool_members,
    .tp_doc = "The C part of noodle.client.Pool: get()'s ready case.",
};

/* ---- module-level futex helpers (tests, benchmarks) ---------------------- */
static PyObject *mod_futex_wait(PyObject *m, PyObject *args) {
    (void)m;
    Py_buffer b;
    unsigned long long off;
    unsigned int val;
    long long timeout;
    if (!PyArg_ParseTuple(args, "w*KIL", &b, &off, &val, &timeout)) return NULL;
    if (off % 4 || b.len < 4 || off > (unsigned long long)b.len - 4) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_IndexError, "offset out of range");
        return NULL;
    }
    long r;
    int err;
    Py_BEGIN_ALLOW_THREADS
    r = futex_wait((uint32_t *)((uint8_t *)b.buf + off), val, timeout);
    err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromLong(r == 0 ? 0 : err);
}

static PyObject *mod_futex_wake(PyObject *m, PyObject *args) {
    (void)m;
    Py_buffer b;
    unsigned long long off;
    int n;
    if (!PyArg_ParseTuple(args, "w*Ki", &b, &off, &n)) return NULL;
    if (off % 4 || b.len < 4 || off > (unsigned long long)b.len - 4) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_IndexError, "offset out of range");
        return NULL;
    }
    long r = futex_wake((uint32_t *)((uint8_t *)b.buf + off), n);
    PyBuffer_Release(&b);
    return PyLong_FromLong(r);
}

static PyObject *mod_add32(PyObject *m, PyObject *args) {
    (void)m;
    Py_buffer b;
    unsigned long long off;
    unsigned int v;
    if (!PyArg_ParseTuple(args, "w*KI", &b, &off, &v)) return NULL;
    if (off % 4 || b.len < 4 || off > (unsigned long long)b.len - 4) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_IndexError, "offset out of range");
        return NULL;
    }
    uint32_t r = __atomic_add_fetch((uint32_t *)((uint8_t *)b.buf + off), v, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(r);
}

static PyObject *mod_start_time(PyObject *m, PyObject *arg) {
    (void)m;
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(read_start_time((pid_t)pid));
}

static PyMethodDef mod_methods[] = {
    {"futex_wait", mod_futex_wait, METH_VARARGS, "futex_wait(buf, off, expected, timeout_ns) -> 0 or errno"},
    {"futex_wake", mod_futex_wake, METH_VARARGS, "futex_wake(buf, off, n) -> woken"},
    {"add32", mod_add32, METH_VARARGS, "add32(buf, off, v) -> new value"},
    {"start_time", mod_start_time, METH_O, "start_time(pid) -> clock ticks since boot, 0 if gone"},
    {"plain_lease", mod_plain_lease, METH_O, "plain_lease(cls) -> cls rebuilt as a LeaseBase subtype without GC"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef shm_module = {
    PyModuleDef_HEAD_INIT, "noodle._shm", "Lock-free shared-memory core of pool-noodle.", -1, mod_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__shm(void) {
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&LeaseBaseType) < 0 || PyType_Ready(&PoolBaseType) < 0)
        return NULL;
    str_get_slow = PyUnicode_InternFromString("_get_slow");
    str_timeout = PyUnicode_InternFromString("timeout");
    str_health = PyUnicode_InternFromString("health");
    if (!str_get_slow || !str_timeout || !str_health) return NULL;
    PyObject *m = PyModule_Create(&shm_module);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LeaseBaseType);
    if (PyModule_AddObject(m, "LeaseBase", (PyObject *)&LeaseBaseType) < 0) {
        Py_DECREF(&LeaseBaseType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&PoolBaseType);
    if (PyModule_AddObject(m, "PoolBase", (PyObject *)&PoolBaseType) < 0) {
        Py_DECREF(&PoolBaseType);
        Py_DECREF(m);
        return NULL;
    }
    /* the cached pid/start time belong to the parent after a fork */
    pthread_atfork(NULL, NULL, forget_identity);
    return m;
}
