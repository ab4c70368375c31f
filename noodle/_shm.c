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
 *  - A waiter killed while queued leaves a ticket whose pid is dead; the
 *    supervisor's sweep passes the turn on.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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
} Core;

#define U64(c, off) ((uint64_t *)((c)->base + (off)))
#define U32(c, off) ((uint32_t *)((c)->base + (off)))

static inline uint64_t *ring_cell(Core *c, uint64_t pos) { return U64(c, c->ring_off + 8 * (pos & (c->ring_cap - 1))); }
static inline uint8_t *slot_rec(Core *c, uint32_t slot) { return c->base + c->slots_off + (uint64_t)slot * c->slot_size; }
static inline uint64_t *slot_word(Core *c, uint32_t slot) { return (uint64_t *)slot_rec(c, slot); }
static inline uint64_t *wait_owner(Core *c, uint32_t t) { return U64(c, c->cells_off + 16 * (uint64_t)(t % c->wait_cells)); }
static inline uint32_t *wait_wake(Core *c, uint32_t t) { return U32(c, c->cells_off + 16 * (uint64_t)(t % c->wait_cells) + 8); }

static inline void count(Core *c, int k, uint64_t n) {
    if ((uint64_t)k < c->n_counters) __atomic_fetch_add(U64(c, c->counters_off + 8 * (uint64_t)k), n, __ATOMIC_RELAXED);
}
static inline void observe(Core *c, int h, uint64_t ns) {
    if ((uint64_t)h >= c->n_hist) return;
    int b = ns ? 64 - __builtin_clzll(ns) : 0;
    if (b >= HIST_BUCKETS) b = HIST_BUCKETS - 1;
    __atomic_fetch_add(U64(c, c->hist_off + 8 * ((uint64_t)h * HIST_BUCKETS + (uint64_t)b)), 1, __ATOMIC_RELAXED);
}
static inline int shutting_down(Core *c) {
    return (__atomic_load_n(U32(c, H_FLAGS), __ATOMIC_SEQ_CST) & FLAG_SHUTDOWN) != 0;
}

/* ---- ring ----------------------------------------------------------------- */
static int ring_push(Core *c, uint32_t value) {
    uint64_t *tailp = U64(c, H_TAIL);
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
        } else if (d > 0) {
            /* someone filled pos (maybe then died): help tail past it */
            uint64_t expect = pos;
            __atomic_compare_exchange_n(tailp, &expect, pos + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
        } else if (__atomic_load_n(tailp, __ATOMIC_ACQUIRE) == pos) {
            return ST_FULL; /* the previous lap's item is still unconsumed */
        }
    }
}

static int ring_pop(Core *c, uint32_t *value) {
    uint64_t *headp = U64(c, H_HEAD);
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
        } else if (d > 0) {
            uint64_t expect = pos; /* consumed already: help head past it */
            __atomic_compare_exchange_n(headp, &expect, pos + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
        } else if (__atomic_load_n(headp, __ATOMIC_ACQUIRE) == pos) {
            return ST_EMPTY;
        }
    }
}

/* ---- waiter queue ---------------------------------------------------------- */
static void wake_cell(Core *c, uint32_t t) {
    __atomic_fetch_add(wait_wake(c, t), 1, __ATOMIC_SEQ_CST);
    futex_wake(wait_wake(c, t), INT_MAX);
}

/* Hand the turn from `from` to the next live ticket, skipping cancelled ones. */
static void pass_turn(Core *c, uint32_t from) {
    uint32_t *turnp = U32(c, H_TURN);
    uint32_t t = from;
    for (;;) {
        uint32_t expect = t;
        if (!__atomic_compare_exchange_n(turnp, &expect, t + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) break;
        t++;
        if (__atomic_load_n(U32(c, H_OVERFLOW), __ATOMIC_SEQ_CST)) futex_wake(turnp, INT_MAX);
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
static int pop_and_lease(Core *c, uint32_t *slot_out, uint64_t *gen_out) {
    uint32_t v;
    while (ring_pop(c, &v) == ST_OK) {
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
                uint64_t t = now_ns();
                __atomic_store_n((uint64_t *)(rec + R_OWNER_START), g_start, __ATOMIC_RELAXED);
                __atomic_store_n((uint32_t *)(rec + R_OWNER_GEN), (uint32_t)W_GEN(w), __ATOMIC_RELEASE);
                __atomic_store_n((uint64_t *)(rec + R_ENTERED), t, __ATOMIC_RELAXED);
                *slot_out = v;
                *gen_out = W_GEN(w);
                return ST_OK;
            }
        }
        count(c, K_STALE_RING, 1);
    }
    return ST_EMPTY;
}

/* The whole acquire. Called with the GIL released when it may block. */
static int acquire(Core *c, int64_t timeout_ns, uint32_t *slot, uint64_t *gen) {
    uint64_t t0 = now_ns();
    if (shutting_down(c)) return ST_SHUTDOWN;
    uint32_t *ticketsp = U32(c, H_TICKETS), *turnp = U32(c, H_TURN);
    /* fast path only when nobody queues: a newcomer never overtakes a waiter */
    if (__atomic_load_n(ticketsp, __ATOMIC_SEQ_CST) == __atomic_load_n(turnp, __ATOMIC_SEQ_CST) &&
        pop_and_lease(c, slot, gen) == ST_OK) {
        observe(c, HIST_ACQUIRE, now_ns() - t0);
        return ST_OK;
    }
    if (timeout_ns == 0) return ST_EMPTY;
    uint64_t deadline = timeout_ns < 0 ? UINT64_MAX : t0 + (uint64_t)timeout_ns;
    count(c, K_ACQUIRE_WAITS, 1);
requeue:;
    uint32_t my;
    for (;;) {
        if (shutting_down(c)) return ST_SHUTDOWN;
        uint32_t tk = __atomic_load_n(ticketsp, __ATOMIC_SEQ_CST), tn = __atomic_load_n(turnp, __ATOMIC_SEQ_CST);
        uint64_t now = now_ns();
        if (now >= deadline) { count(c, K_WAIT_TIMEOUTS, 1); return ST_EMPTY; }
        if ((uint32_t)(tk - tn) >= c->wait_cells) {
            /* every wait cell is taken: sleep until the turn moves */
            __atomic_fetch_add(U32(c, H_OVERFLOW), 1, __ATOMIC_SEQ_CST);
            futex_wait(turnp, tn, deadline == UINT64_MAX ? -1 : (int64_t)(deadline - now));
            __atomic_fetch_sub(U32(c, H_OVERFLOW), 1, __ATOMIC_SEQ_CST);
            continue;
        }
        if (__atomic_compare_exchange_n(ticketsp, &tk, tk + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
            my = tk;
            break;
        }
    }
    __atomic_store_n(wait_owner(c, my), ((uint64_t)my << 32) | g_pid, __ATOMIC_SEQ_CST);
    for (;;) {
        uint32_t w = __atomic_load_n(wait_wake(c, my), __ATOMIC_SEQ_CST);
        if (shutting_down(c)) { cancel_ticket(c, my, g_pid); return ST_SHUTDOWN; }
        uint32_t tn = __atomic_load_n(turnp, __ATOMIC_SEQ_CST);
        if (tn == my) {
            if (pop_and_lease(c, slot, gen) == ST_OK) {
                pass_turn(c, my);
                observe(c, HIST_WAIT, now_ns() - t0);
                return ST_OK;
            }
        } else if ((int32_t)(tn - my) > 0) {
            goto requeue; /* the sweep took us for dead and skipped us */
        }
        uint64_t now = now_ns();
        if (now >= deadline) {
            cancel_ticket(c, my, g_pid);
            count(c, K_WAIT_TIMEOUTS, 1);
            return ST_EMPTY;
        }
        futex_wait(wait_wake(c, my), w, deadline == UINT64_MAX ? -1 : (int64_t)(deadline - now));
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
             wait_cells >= 1 && slot_size >= 64 && slot_size % 8 == 0 && desc_cap <= slot_size - 64 &&
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
    if (!(self)->has_view) {                                              \
        PyErr_SetString(PyExc_ValueError, "segment core is closed");      \
        return NULL;                                                      \
    }

static PyObject *core_close(Core *self, PyObject *unused) {
    (void)unused;
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
        self->base = NULL;
    }
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
    identity();
    uint32_t slot = 0;
    uint64_t gen = 0;
    int st;
    /* try without dropping the GIL first: the common case is a ready slot */
    st = acquire(self, 0, &slot, &gen);
    if (st == ST_EMPTY && timeout != 0) {
        Py_BEGIN_ALLOW_THREADS
        st = acquire(self, timeout, &slot, &gen);
        Py_END_ALLOW_THREADS
    }
    if (st == ST_OK) count(self, K_ACQUIRES, 1);
    else if (st == ST_SHUTDOWN) count(self, K_SHUTDOWN_REFUSALS, 1);
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

/* queue_info() -> (head, tail, tickets, turn) */
static PyObject *core_queue_info(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    return Py_BuildValue("(KKII)", (unsigned long long)__atomic_load_n(U64(self, H_HEAD), __ATOMIC_ACQUIRE),
                         (unsigned long long)__atomic_load_n(U64(self, H_TAIL), __ATOMIC_ACQUIRE),
                         __atomic_load_n(U32(self, H_TICKETS), __ATOMIC_ACQUIRE),
                         __atomic_load_n(U32(self, H_TURN), __ATOMIC_ACQUIRE));
}

/* head_waiter() -> (ticket, pid, registered): who holds the turn, for the sweep */
static PyObject *core_head_waiter(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    uint32_t tn = __atomic_load_n(U32(self, H_TURN), __ATOMIC_SEQ_CST);
    if (__atomic_load_n(U32(self, H_TICKETS), __ATOMIC_SEQ_CST) == tn) Py_RETURN_NONE;
    uint64_t o = __atomic_load_n(wait_owner(self, tn), __ATOMIC_SEQ_CST);
    int registered = (uint32_t)(o >> 32) == tn;
    return Py_BuildValue("(IIO)", tn, registered ? (uint32_t)o : 0u, registered ? Py_True : Py_False);
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

/* ring_anomalies() -> (head, tail, bad): cells whose seq fits neither "full"
   (inside [head, tail)) nor "free" for their position. Concurrent operations
   show as a few transient mismatches; the caller acts only on a count that
   persists while head and tail stand still. */
static PyObject *core_ring_anomalies(Core *self, PyObject *unused) {
    (void)unused;
    CHECK_OPEN(self);
    uint64_t head = __atomic_load_n(U64(self, H_HEAD), __ATOMIC_ACQUIRE);
    uint64_t tail = __atomic_load_n(U64(self, H_TAIL), __ATOMIC_ACQUIRE);
    uint64_t bad = 0;
    int64_t span = (int64_t)(tail - head);
    if (span < -(int64_t)self->ring_cap || span > (int64_t)self->ring_cap) {
        bad = self->ring_cap;
    } else {
        for (uint64_t k = 0; k < self->ring_cap; k++) {
            uint64_t pos = head + k;
            uint64_t w = __atomic_load_n(ring_cell(self, pos), __ATOMIC_ACQUIRE);
            int64_t full = seq_diff(C_SEQ(w), pos + 1), free_ = seq_diff(C_SEQ(w), pos);
            if (full != 0 && free_ != 0) bad++;
            else if (full == 0 && C_VAL(w) >= self->pool_size) bad++;
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
    futex_wake(U32(self, H_TURN), INT_MAX);
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
    futex_wake(U32(self, H_TURN), INT_MAX);
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
    if (off % 8 || off + 8 > self->size) {
        PyErr_SetString(PyExc_IndexError, "offset out of range");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(__atomic_load_n(U64(self, off), __ATOMIC_ACQUIRE));
}

static PyObject *core_store64(Core *self, PyObject *args) {
    CHECK_OPEN(self);
    unsigned long long off, v;
    if (!PyArg_ParseTuple(args, "KK", &off, &v)) return NULL;
    if (off % 8 || off + 8 > self->size) {
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

/* ---- module-level futex helpers (tests, benchmarks) ---------------------- */
static PyObject *mod_futex_wait(PyObject *m, PyObject *args) {
    (void)m;
    Py_buffer b;
    unsigned long long off;
    unsigned int val;
    long long timeout;
    if (!PyArg_ParseTuple(args, "w*KIL", &b, &off, &val, &timeout)) return NULL;
    if (off % 4 || off + 4 > (unsigned long long)b.len) {
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
    if (off % 4 || off + 4 > (unsigned long long)b.len) {
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
    if (off % 4 || off + 4 > (unsigned long long)b.len) {
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef shm_module = {
    PyModuleDef_HEAD_INIT, "noodle._shm", "Lock-free shared-memory core of pool-noodle.", -1, mod_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__shm(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&shm_module);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    /* the cached pid/start time belong to the parent after a fork */
    pthread_atfork(NULL, NULL, forget_identity);
    return m;
}
