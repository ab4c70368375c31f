/*
 * noodle-agent: the in-guest agent of the microvm kind.
 *
 * The guest is a busybox initramfs without Python, so this is a small
 * static C program speaking the frames of noodle/agent.py over a
 * virtio-serial port:
 *
 *     u32 big-endian payload length | UTF-8 JSON object
 *
 * Ops: ping (echoes "nonce" so the host can resynchronise after a
 * reconnect or a snapshot restore), exec (argv -> returncode, stdout,
 * stderr; optional timeout and stdin), init (fresh entropy, hostname,
 * slot id, wall clock: every guest restored from one snapshot starts
 * with the same RNG state and clock, so the host sends each its own).
 *
 * A virtio-serial port has no accept(): the host side (a QEMU socket
 * chardev) connects and disconnects under us. A read of 0 means "host not
 * connected"; then the parser state is dropped so that a half frame of a
 * previous client never prefixes the next client's frame.
 *
 * Usage: noodle-agent PORT_NAME_OR_DEVICE_PATH
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

#define MAX_FRAME (64u * 1024u * 1024u)
#define MAX_OUTPUT (32u * 1024u * 1024u)

/* -- growable byte buffer ------------------------------------------------ */

typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

static void buf_reserve(buf_t *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) { perror("noodle-agent: realloc"); exit(70); }
    b->data = p;
    b->cap = cap;
}

static void buf_add(buf_t *b, const void *p, size_t n) {
    buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void buf_str(buf_t *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_fmt(buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_fmt(buf_t *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Append a JSON string. Invalid UTF-8 becomes U+FFFD, like Python's
 * decode(errors="replace") in the host agent. */
static void json_str(buf_t *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    buf_add(b, "\"", 1);
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x80) {
            if (c == '"' || c == '\\') {
                char e[2] = {'\\', (char)c};
                buf_add(b, e, 2);
            } else if (c == '\n') buf_add(b, "\\n", 2);
            else if (c == '\r') buf_add(b, "\\r", 2);
            else if (c == '\t') buf_add(b, "\\t", 2);
            else if (c < 0x20 || c == 0x7f) {
                char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
                buf_add(b, e, 6);
            } else buf_add(b, &s[i], 1);
            i++;
            continue;
        }
        size_t need = 0;
        uint32_t cp = 0;
        if ((c & 0xe0) == 0xc0) { need = 1; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { need = 2; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { need = 3; cp = c & 0x07; }
        int ok = need > 0 && i + need < n; /* the continuation bytes are all there */
        for (size_t k = 1; ok && k <= need; k++) {
            unsigned char cc = (unsigned char)s[i + k];
            if ((cc & 0xc0) != 0x80) ok = 0;
            else cp = (cp << 6) | (cc & 0x3f);
        }
        if (ok) {
            if ((need == 1 && cp < 0x80) || (need == 2 && cp < 0x800) || (need == 3 && cp < 0x10000) ||
                cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
                ok = 0;
        }
        if (ok) {
            buf_add(b, &s[i], need + 1);
            i += need + 1;
        } else {
            buf_add(b, "\xef\xbf\xbd", 3);
            i++;
        }
    }
    buf_add(b, "\"", 1);
}

/* -- minimal JSON reader for the request object ---------------------------- */

typedef struct {
    const char *p, *end;
    int err;
} rd_t;

static void ws(rd_t *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\n' || *r->p == '\r' || *r->p == '\t')) r->p++;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void put_utf8(buf_t *b, uint32_t cp) {
    char o[4];
    if (cp < 0x80) { o[0] = (char)cp; buf_add(b, o, 1); }
    else if (cp < 0x800) { o[0] = (char)(0xc0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3f)); buf_add(b, o, 2); }
    else if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[2] = (char)(0x80 | (cp & 0x3f));
        buf_add(b, o, 3);
    } else {
        o[0] = (char)(0xf0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f));
        buf_add(b, o, 4);
    }
}

static int rd_u4(rd_t *r, uint32_t *out) {
    if (r->end - r->p < 4) return -1;
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(r->p[k]);
        if (h < 0) return -1;
        v = (v << 4) | (uint32_t)h;
    }
    r->p += 4;
    *out = v;
    return 0;
}

/* Read a string into out (NUL-terminated, may contain NULs; length in out->len). */
static int rd_string(rd_t *r, buf_t *out) {
    ws(r);
    if (r->p >= r->end || *r->p != '"') return r->err = 1, -1;
    r->p++;
    while (r->p < r->end) {
        char c = *r->p++;
        if (c == '"') {
            if (out) buf_reserve(out, 0);
            return 0;
        }
        if (c != '\\') {
            if (out) buf_add(out, &c, 1);
            continue;
        }
        if (r->p >= r->end) break;
        char e = *r->p++;
        char lit = 0;
        switch (e) {
        case '"': lit = '"'; break;
        case '\\': lit = '\\'; break;
        case '/': lit = '/'; break;
        case 'b': lit = '\b'; break;
        case 'f': lit = '\f'; break;
        case 'n': lit = '\n'; break;
        case 'r': lit = '\r'; break;
        case 't': lit = '\t'; break;
        case 'u': {
            uint32_t cp;
            if (rd_u4(r, &cp)) return r->err = 1, -1;
            if (cp >= 0xd800 && cp <= 0xdbff && r->end - r->p >= 6 && r->p[0] == '\\' && r->p[1] == 'u') {
                rd_t save = *r;
                uint32_t lo;
                r->p += 2;
                if (rd_u4(r, &lo) == 0 && lo >= 0xdc00 && lo <= 0xdfff) cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                else *r = save;
            }
            if (cp >= 0xd800 && cp <= 0xdfff) cp = 0xfffd;
            if (out) put_utf8(out, cp);
            continue;
        }
        default: return r->err = 1, -1;
        }
        if (out) buf_add(out, &lit, 1);
    }
    return r->err = 1, -1;
}

static int rd_number(rd_t *r, double *out) {
    ws(r);
    char tmp[64];
    size_t n = 0;
    while (r->p < r->end && n < sizeof tmp - 1 && strchr("+-0123456789.eE", *r->p)) tmp[n++] = *r->p++;
    tmp[n] = 0;
    if (!n) return r->err = 1, -1;
    char *endp;
    *out = strtod(tmp, &endp);
    if (*endp) return r->err = 1, -1;
    return 0;
}

static int skip_value(rd_t *r, int depth);

static int skip_container(rd_t *r, char close, int is_obj, int depth) {
    r->p++;
    ws(r);
    if (r->p < r->end && *r->p == close) { r->p++; return 0; }
    for (;;) {
        if (is_obj) {
            if (rd_string(r, NULL)) return -1;
            ws(r);
            if (r->p >= r->end || *r->p != ':') return r->err = 1, -1;
            r->p++;
        }
        if (skip_value(r, depth + 1)) return -1;
        ws(r);
        if (r->p < r->end && *r->p == ',') { r->p++; continue; }
        if (r->p < r->end && *r->p == close) { r->p++; return 0; }
        return r->err = 1, -1;
    }
}

static int skip_value(rd_t *r, int depth) {
    ws(r);
    if (depth > 64 || r->p >= r->end) return r->err = 1, -1;
    char c = *r->p;
    if (c == '"') return rd_string(r, NULL);
    if (c == '{') return skip_container(r, '}', 1, depth);
    if (c == '[') return skip_container(r, ']', 0, depth);
    static const char *lits[] = {"true", "false", "null"};
    for (int k = 0; k < 3; k++) {
        size_t l = strlen(lits[k]);
        if ((size_t)(r->end - r->p) >= l && !memcmp(r->p, lits[k], l)) { r->p += l; return 0; }
    }
    double d;
    return rd_number(r, &d);
}

typedef struct {
    buf_t op, nonce, seed, hostname, pool, stdin_data;
    int has_nonce, has_seed, has_hostname, has_pool, has_stdin;
    char **argv;
    int argc;
    int argv_bad;
    double timeout, slot, time;
    int has_timeout, has_slot, has_time;
} req_t;

static void req_free(req_t *q) {
    free(q->op.data); free(q->nonce.data); free(q->seed.data); free(q->hostname.data);
    free(q->pool.data); free(q->stdin_data.data);
    for (int i = 0; i < q->argc; i++) free(q->argv[i]);
    free(q->argv);
    memset(q, 0, sizeof *q);
}

static int rd_opt_number(rd_t *r, double *out, int *has) {
    ws(r);
    if (r->p < r->end && *r->p == 'n') return skip_value(r, 0);
    if (rd_number(r, out)) return -1;
    *has = 1;
    return 0;
}

static int rd_argv(rd_t *r, req_t *q) {
    ws(r);
    if (r->p >= r->end || *r->p != '[') { q->argv_bad = 1; return skip_value(r, 0); }
    r->p++;
    ws(r);
    if (r->p < r->end && *r->p == ']') { r->p++; return 0; }
    for (;;) {
        ws(r);
        if (r->p < r->end && *r->p == '"') {
            buf_t s = {0};
            if (rd_string(r, &s)) { free(s.data); return -1; }
            if (strlen(s.data) != s.len) q->argv_bad = 1; /* an embedded NUL cannot be exec'd */
            q->argv = realloc(q->argv, sizeof(char *) * (size_t)(q->argc + 2));
            if (!q->argv) exit(70);
            q->argv[q->argc++] = s.data;
            q->argv[q->argc] = NULL;
        } else {
            q->argv_bad = 1;
            if (skip_value(r, 1)) return -1;
        }
        ws(r);
        if (r->p < r->end && *r->p == ',') { r->p++; continue; }
        if (r->p < r->end && *r->p == ']') { r->p++; return 0; }
        return r->err = 1, -1;
    }
}

static int parse_request(const char *s, size_t n, req_t *q) {
    rd_t r = {s, s + n, 0};
    ws(&r);
    if (r.p >= r.end || *r.p != '{') return -1;
    r.p++;
    ws(&r);
    if (r.p < r.end && *r.p == '}') return 0;
    for (;;) {
        buf_t key = {0};
        if (rd_string(&r, &key)) { free(key.data); return -1; }
        ws(&r);
        if (r.p >= r.end || *r.p != ':') { free(key.data); return -1; }
        r.p++;
        ws(&r);
        const char *k = key.data ? key.data : "";
        int rc;
        int is_str = r.p < r.end && *r.p == '"';
#define STRFIELD(name)                                                   \
        else if (!strcmp(k, #name) && is_str) {                          \
            rc = rd_string(&r, &q->name); q->has_##name = 1; }
        if (!strcmp(k, "op") && is_str) rc = rd_string(&r, &q->op);
        STRFIELD(nonce)
        STRFIELD(seed)
        STRFIELD(hostname)
        STRFIELD(pool)
        else if (!strcmp(k, "stdin") && is_str) { rc = rd_string(&r, &q->stdin_data); q->has_stdin = 1; }
        else if (!strcmp(k, "argv")) rc = rd_argv(&r, q);
        else if (!strcmp(k, "timeout")) rc = rd_opt_number(&r, &q->timeout, &q->has_timeout);
        else if (!strcmp(k, "slot")) rc = rd_opt_number(&r, &q->slot, &q->has_slot);
        else if (!strcmp(k, "time")) rc = rd_opt_number(&r, &q->time, &q->has_time);
        else rc = skip_value(&r, 0);
#undef STRFIELD
        free(key.data);
        if (rc) return -1;
        ws(&r);
        if (r.p < r.end && *r.p == ',') { r.p++; ws(&r); continue; }
        if (r.p < r.end && *r.p == '}') { r.p++; break; }
        return -1;
    }
    ws(&r);
    return r.p == r.end ? 0 : -1;
}

/* -- replies --------------------------------------------------------------- */

static void error_reply(buf_t *out, const char *type, const char *message) {
    buf_str(out, "{\"ok\": false, \"error\": {\"type\": ");
    json_str(out, type, strlen(type));
    buf_str(out, ", \"message\": ");
    json_str(out, message, strlen(message));
    buf_str(out, ", \"traceback\": \"\"}}");
}

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void reap_orphans(void) {
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static void op_exec(req_t *q, buf_t *out) {
    if (q->argv_bad || q->argc == 0) {
        error_reply(out, "ValueError", "argv must be a non-empty list of strings");
        return;
    }
    int po[2], pe[2], pi[2] = {-1, -1}, px[2];
    if (pipe2(po, O_CLOEXEC) || pipe2(pe, O_CLOEXEC) || pipe2(px, O_CLOEXEC) ||
        (q->has_stdin && pipe2(pi, O_CLOEXEC))) {
        error_reply(out, "OSError", strerror(errno));
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        error_reply(out, "OSError", strerror(errno));
        close(po[0]); close(po[1]); close(pe[0]); close(pe[1]); close(px[0]); close(px[1]);
        if (pi[0] >= 0) { close(pi[0]); close(pi[1]); }
        return;
    }
    if (pid == 0) {
        setsid();
        signal(SIGPIPE, SIG_DFL);
        int devnull = open("/dev/null", O_RDONLY);
        dup2(q->has_stdin ? pi[0] : devnull, 0);
        dup2(po[1], 1);
        dup2(pe[1], 2);
        execvp(q->argv[0], q->argv);
        int e = errno;
        if (write(px[1], &e, sizeof e) < 0) _exit(127);
        _exit(127);
    }
    close(po[1]); close(pe[1]); close(px[1]);
    if (pi[0] >= 0) close(pi[0]);
    int e = 0;
    ssize_t got;
    do got = read(px[0], &e, sizeof e); while (got < 0 && errno == EINTR);
    close(px[0]);
    if (got == (ssize_t)sizeof e) {
        waitpid(pid, NULL, 0);
        close(po[0]); close(pe[0]);
        if (pi[1] >= 0) close(pi[1]);
        char msg[600];
        snprintf(msg, sizeof msg, "[Errno %d] %s: '%.500s'", e, strerror(e), q->argv[0]);
        error_reply(out, e == ENOENT ? "FileNotFoundError" : e == EACCES ? "PermissionError" : "OSError", msg);
        return;
    }
    buf_t so = {0}, se = {0};
    size_t in_off = 0;
    int fds_open = 2;
    int in_fd = pi[1];
    if (in_fd >= 0) fcntl(in_fd, F_SETFL, O_NONBLOCK);
    double deadline = q->has_timeout ? now_mono() + q->timeout : 0;
    int timed_out = 0;
    int ofd = po[0], efd = pe[0];
    while (fds_open > 0 || in_fd >= 0) {
        struct pollfd p[3];
        int np = 0, io = -1, ie = -1, ii = -1;
        if (ofd >= 0) { io = np; p[np].fd = ofd; p[np].events = POLLIN; np++; }
        if (efd >= 0) { ie = np; p[np].fd = efd; p[np].events = POLLIN; np++; }
        if (in_fd >= 0) { ii = np; p[np].fd = in_fd; p[np].events = POLLOUT; np++; }
        int wait_ms = -1;
        if (q->has_timeout) {
            double left = deadline - now_mono();
            if (left <= 0) { timed_out = 1; break; }
            wait_ms = (int)(left * 1000) + 1;
        }
        int rc = poll(p, (nfds_t)np, wait_ms);
        if (rc < 0 && errno == EINTR) continue;
        if (rc < 0) break;
        char tmp[65536];
        int *fdp[2] = {&ofd, &efd};
        buf_t *dst[2] = {&so, &se};
        int idx[2] = {io, ie};
        for (int k = 0; k < 2; k++) {
            if (idx[k] < 0 || !(p[idx[k]].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = read(*fdp[k], tmp, sizeof tmp);
            if (n > 0) {
                if (dst[k]->len < MAX_OUTPUT) buf_add(dst[k], tmp, (size_t)n);
            } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
                close(*fdp[k]);
                *fdp[k] = -1;
                fds_open--;
            }
        }
        if (ii >= 0 && (p[ii].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t n = in_off < q->stdin_data.len ? write(in_fd, q->stdin_data.data + in_off, q->stdin_data.len - in_off) : 0;
            if (n > 0) in_off += (size_t)n;
            if (in_off >= q->stdin_data.len || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                close(in_fd);
                in_fd = -1;
            }
        }
    }
    if (ofd >= 0) close(ofd);
    if (efd >= 0) close(efd);
    if (in_fd >= 0) close(in_fd);
    int status = 0;
    if (timed_out) {
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL);
    }
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    reap_orphans();
    if (timed_out) {
        char msg[700];
        snprintf(msg, sizeof msg, "Command '%.500s' timed out after %g seconds", q->argv[0], q->timeout);
        error_reply(out, "TimeoutExpired", msg);
    } else {
        int rc = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? -WTERMSIG(status) : -1;
        buf_fmt(out, "{\"ok\": true, \"returncode\": %d, \"stdout\": ", rc);
        json_str(out, so.data ? so.data : "", so.len);
        buf_str(out, ", \"stderr\": ");
        json_str(out, se.data ? se.data : "", se.len);
        buf_str(out, "}");
    }
    free(so.data);
    free(se.data);
}

static int write_file(const char *path, const char *data, size_t n) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    ssize_t w = write(fd, data, n);
    close(fd);
    return w == (ssize_t)n ? 0 : -1;
}

/* Give a restored guest its own entropy and identity. */
static void op_init(req_t *q, buf_t *out) {
    char msg[256];
    if (q->has_seed) {
        size_t n = q->seed.len / 2;
        if (n == 0 || n > 4096 || q->seed.len % 2) {
            error_reply(out, "ValueError", "seed must be 2..8192 hex digits");
            return;
        }
        struct rand_pool_info *info = calloc(1, sizeof *info + n);
        if (!info) exit(70);
        unsigned char *bytes = (unsigned char *)info->buf;
        for (size_t i = 0; i < n; i++) {
            int hi = hexval(q->seed.data[2 * i]), lo = hexval(q->seed.data[2 * i + 1]);
            if (hi < 0 || lo < 0) {
                free(info);
                error_reply(out, "ValueError", "seed is not hex");
                return;
            }
            bytes[i] = (unsigned char)(hi << 4 | lo);
        }
        info->entropy_count = (int)(n * 8);
        info->buf_size = (int)n;
        int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
        /* Mixing the bytes in is not enough: the crng keeps its key until
         * its next scheduled reseed, so force one. */
        if (fd < 0 || ioctl(fd, RNDADDENTROPY, info) || ioctl(fd, RNDRESEEDCRNG)) {
            snprintf(msg, sizeof msg, "reseeding the guest RNG failed: %s", strerror(errno));
            if (fd >= 0) close(fd);
            free(info);
            error_reply(out, "OSError", msg);
            return;
        }
        close(fd);
        free(info);
    }
    if (q->has_time) {
        struct timeval tv;
        tv.tv_sec = (time_t)q->time;
        tv.tv_usec = (suseconds_t)((q->time - (double)tv.tv_sec) * 1e6);
        settimeofday(&tv, NULL);
    }
    mkdir("/run/noodle", 0755);
    if (q->has_hostname) {
        if (sethostname(q->hostname.data, q->hostname.len)) {
            snprintf(msg, sizeof msg, "sethostname: %s", strerror(errno));
            error_reply(out, "OSError", msg);
            return;
        }
        buf_t h = {0};
        buf_add(&h, q->hostname.data, q->hostname.len);
        buf_add(&h, "\n", 1);
        write_file("/etc/hostname", h.data, h.len);
        free(h.data);
    }
    if (q->has_slot) {
        char s[32];
        int n = snprintf(s, sizeof s, "%ld\n", (long)q->slot);
        write_file("/run/noodle/slot", s, (size_t)n);
    }
    if (q->has_pool) {
        buf_t p = {0};
        buf_add(&p, q->pool.data, q->pool.len);
        buf_add(&p, "\n", 1);
        write_file("/run/noodle/pool", p.data, p.len);
        free(p.data);
    }
    buf_str(out, "{\"ok\": true}");
}

static void handle(const char *body, size_t n, buf_t *out) {
    req_t q;
    memset(&q, 0, sizeof q);
    if (parse_request(body, n, &q) || !q.op.data) {
        error_reply(out, "ProtocolError", q.op.data || n == 0 ? "frame is not a JSON object" : "request has no op");
        req_free(&q);
        return;
    }
    const char *op = q.op.data;
    if (!strcmp(op, "ping")) {
        buf_fmt(out, "{\"ok\": true, \"pid\": %d, \"agent\": \"noodle-agent-c\"", (int)getpid());
        if (q.has_nonce) {
            buf_str(out, ", \"nonce\": ");
            json_str(out, q.nonce.data ? q.nonce.data : "", q.nonce.len);
        }
        buf_str(out, "}");
    } else if (!strcmp(op, "exec")) {
        op_exec(&q, out);
    } else if (!strcmp(op, "init")) {
        op_init(&q, out);
    } else {
        char msg[300];
        snprintf(msg, sizeof msg, "unknown op '%.200s' (the microvm guest has no Python: use exec)", op);
        error_reply(out, "ProtocolError", msg);
    }
    req_free(&q);
}

/* -- the port -------------------------------------------------------------- */

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Resolve a port name (as in -device virtserialport,name=...) to /dev/vportNpM. */
static int find_port(const char *name, char *path, size_t size) {
    if (name[0] == '/') {
        snprintf(path, size, "%s", name);
        return access(path, F_OK);
    }
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return -1;
    struct dirent *de;
    int found = -1;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p[512], got[256] = {0};
        snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", de->d_name);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, got, sizeof got - 1);
        close(fd);
        if (n <= 0) continue;
        while (n > 0 && (got[n - 1] == '\n' || got[n - 1] == 0)) got[--n] = 0;
        if (!strcmp(got, name)) {
            snprintf(path, size, "/dev/%s", de->d_name);
            found = 0;
            break;
        }
    }
    closedir(d);
    return found;
}

/* Write a whole reply; drop it if the host goes away meanwhile, so that a
 * stale reply never reaches the next client. */
static void send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w > 0) { p += w; n -= (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno != EAGAIN) return;
        struct pollfd pf = {fd, POLLOUT, 0};
        if (poll(&pf, 1, 1000) < 0 && errno != EINTR) return;
        if ((pf.revents & POLLHUP) && !(pf.revents & POLLOUT)) return;
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: noodle-agent PORT_NAME|/dev/PATH\n");
        return 64;
    }
    signal(SIGPIPE, SIG_IGN);
    /* Orphans of exec'd commands come back to us, not to the init shell. */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    char path[512];
    int tries = 0;
    while (find_port(argv[1], path, sizeof path)) {
        if (++tries == 1000) fprintf(stderr, "noodle-agent: still waiting for port %s\n", argv[1]);
        sleep_ms(5);
    }
    int fd = -1;
    while ((fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC)) < 0) sleep_ms(5);
    buf_t in = {0}, out = {0};
    size_t discard = 0;
    char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n == 0) {
            /* Host side not connected: forget any half frame. Nothing to
             * block on until it connects (poll reports POLLHUP), so nap. */
            in.len = 0;
            discard = 0;
            sleep_ms(2);
            continue;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) { perror("noodle-agent: read"); sleep_ms(50); continue; }
            struct pollfd pf = {fd, POLLIN, 0};
            poll(&pf, 1, -1);
            if ((pf.revents & POLLHUP) && !(pf.revents & POLLIN)) sleep_ms(2);
            continue;
        }
        size_t off = 0;
        if (discard) {
            size_t d = discard < (size_t)n ? discard : (size_t)n;
            discard -= d;
            off = d;
        }
        buf_add(&in, chunk + off, (size_t)n - off);
        for (;;) {
            if (in.len < 4) break;
            const unsigned char *h = (const unsigned char *)in.data;
            uint32_t size = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
            out.len = 0;
            buf_reserve(&out, 4);
            out.len = 4;
            if (size > MAX_FRAME) {
                char msg[128];
                snprintf(msg, sizeof msg, "frame of %u bytes exceeds %u", size, MAX_FRAME);
                error_reply(&out, "ProtocolError", msg);
                size_t have = in.len - 4;
                discard = size > have ? size - have : 0;
                in.len = 0;
            } else {
                if (in.len - 4 < size) break;
                handle(in.data + 4, size, &out);
                memmove(in.data, in.data + 4 + size, in.len - 4 - size);
                in.len -= 4 + size;
            }
            uint32_t blen = (uint32_t)(out.len - 4);
            unsigned char *o = (unsigned char *)out.data;
            o[0] = (unsigned char)(blen >> 24); o[1] = (unsigned char)(blen >> 16);
            o[2] = (unsigned char)(blen >> 8); o[3] = (unsigned char)blen;
            send_all(fd, out.data, out.len);
        }
    }
}
