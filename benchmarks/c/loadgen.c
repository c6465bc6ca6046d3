/*
 * loadgen.c - epoll-based closed-loop load generator for the "lancelot"
 * question/answer protocol (client sends "...?", server answers "....").
 *
 * Modes:
 *   persistent (default): each of C connections asks question after question
 *                         on the same connection, waiting for each answer.
 *   cpr (-r):             connect-per-request: open, ask one question, read
 *                         the answer, close, repeat.
 *
 * Every answer is verified byte-for-byte.  Latency is measured per request,
 * from write(question) to the last byte of the answer (persistent), or from
 * socket()/connect() to the last byte of the answer (cpr).  Exact percentiles
 * are computed from all recorded samples.
 *
 * Output: exactly one line on stdout, key=value pairs separated by spaces.
 *
 * Part of lancelotd's benchmarks (benchmarks/README.md): bench.py, report.py,
 * hostile.py, ab.py and lifecycle.py build it with `cc` into their build
 * directory, and the load tests (tests/loadgen.py) into pytest's; by hand:
 *   cc -O2 -Wall -pthread -o /tmp/loadgen benchmarks/c/loadgen.c
 * Only ever point it at 127.0.0.1 (or a network namespace of your own).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const char *QUESTIONS[3] = {
    "What is your name?",
    "What is your quest?",
    "What is your favorite color?",
};
static const char *ANSWERS[3] = {
    "My name is Sir Lancelot of Camelot.",
    "To seek the Holy Grail.",
    "Blue.",
};
static size_t QLEN[3], ALEN[3];

enum { ST_IDLE = 0, ST_CONNECTING, ST_READING, ST_BACKOFF };
enum { E_WRONG = 0, E_RESET, E_REFUSED, E_TIMEOUT, E_OTHER, E_NCAT };
static const char *ECAT_NAME[E_NCAT] = {"wrong", "reset", "refused", "timeout", "other"};

struct conn {
    int fd;
    int state;
    int qidx;          /* question in flight (0..2) */
    unsigned next_q;   /* cycles through the questions */
    size_t got;        /* answer bytes received so far */
    int64_t t_start;   /* ns: start of the current request */
    int64_t deadline;  /* ns: timeout of the current phase / end of backoff */
    uint64_t nok;      /* successful requests of this slot in the measured window */
    char buf[64];
};

struct thread_ctx {
    int id;
    int nconns;
    int first_conn;
    struct conn *conns;
    int epfd;
    /* results */
    uint64_t requests;
    uint64_t errors[E_NCAT];
    uint64_t connects;        /* successful TCP connects */
    unsigned src_rr;          /* round-robin over source addresses */
    uint32_t *lat;            /* latency samples in us */
    size_t nlat, caplat;
    int64_t max_lat_ns;
    char first_err[128];
    pthread_t th;
};

/* configuration */
static struct sockaddr_in g_addr;
static int g_conns = 1, g_threads = 1, g_cpr = 0;
static int g_nsrc = -1;   /* loopback source addresses to spread connects over (-S) */
static double g_duration = 5.0, g_warmup = 0.0;
static int64_t g_timeout_ns = 2000LL * 1000000LL;   /* per request (incl. connect) */
static int64_t g_backoff_ns = 10LL * 1000000LL;     /* after refused / other errors */
static int64_t g_t0, g_tmeasure, g_tend;           /* ns, CLOCK_MONOTONIC */

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *msg) {
    perror(msg);
    exit(2);
}

static void record_error(struct thread_ctx *t, int cat, int err, int64_t now) {
    if (now < g_tmeasure) return; /* warm-up: not counted */
    t->errors[cat]++;
    if (!t->first_err[0])
    {
        snprintf(t->first_err, sizeof t->first_err, "%s:%s", ECAT_NAME[cat],
                 err ? strerror(err) : (cat == E_RESET ? "eof" : "-"));
        for (char *p = t->first_err; *p; p++)
            if (*p == ' ') *p = '_'; /* keep the output line space-separated */
    }
}

static void record_ok(struct thread_ctx *t, struct conn *c, int64_t lat_ns, int64_t now) {
    if (now < g_tmeasure) return;
    t->requests++;
    c->nok++;
    if (lat_ns > t->max_lat_ns) t->max_lat_ns = lat_ns;
    if (t->nlat == t->caplat) {
        t->caplat = t->caplat ? t->caplat * 2 : (1u << 16);
        t->lat = realloc(t->lat, t->caplat * sizeof *t->lat);
        if (!t->lat) die("realloc");
    }
    int64_t us = lat_ns / 1000;
    t->lat[t->nlat++] = (uint32_t)(us > UINT32_MAX ? UINT32_MAX : us);
}

static void conn_close(struct thread_ctx *t, struct conn *c) {
    (void)t;
    if (c->fd >= 0) close(c->fd); /* close() also removes it from epoll */
    c->fd = -1;
    c->state = ST_IDLE;
}

static void conn_fail(struct thread_ctx *t, struct conn *c, int cat, int err, int64_t now) {
    record_error(t, cat, err, now);
    conn_close(t, c);
    if (cat == E_REFUSED || cat == E_OTHER) {
        c->state = ST_BACKOFF;
        c->deadline = now + g_backoff_ns;
    }
}

static int classify_errno(int err) {
    switch (err) {
    case ECONNREFUSED: return E_REFUSED;
    case ECONNRESET: case EPIPE: case ECONNABORTED: return E_RESET;
    case ETIMEDOUT: return E_TIMEOUT;
    default: return E_OTHER;
    }
}

/* Send the next question; sets t_start unless keep_start (cpr: latency starts at connect). */
static void send_question(struct thread_ctx *t, struct conn *c, int64_t now, int keep_start) {
    int q = c->next_q++ % 3;
    c->qidx = q;
    c->got = 0;
    if (!keep_start) c->t_start = now;
    c->deadline = c->t_start + g_timeout_ns;
    /* 18..28 bytes always fit in an empty socket send buffer */
    ssize_t n = send(c->fd, QUESTIONS[q], QLEN[q], MSG_NOSIGNAL);
    if (n != (ssize_t)QLEN[q]) {
        conn_fail(t, c, n < 0 ? classify_errno(errno) : E_OTHER, n < 0 ? errno : 0, now);
        return;
    }
    c->state = ST_READING;
}

static void start_connect(struct thread_ctx *t, struct conn *c, int64_t now) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    c->t_start = now;
    c->deadline = now + g_timeout_ns;
    if (fd < 0) {
        conn_fail(t, c, E_OTHER, errno, now);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    if (g_nsrc > 1) {
        /* Spread connections over source addresses 127.0.0.1..127.0.0.N so that
           connect-per-request does not run out of ephemeral ports (each client
           close leaves a TIME_WAIT socket for 60 s).  The port is still chosen
           by connect() thanks to IP_BIND_ADDRESS_NO_PORT. */
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000001u + (t->src_rr++ % (unsigned)g_nsrc));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            conn_fail(t, c, E_OTHER, errno, now);
            return;
        }
    }
    int r = connect(fd, (struct sockaddr *)&g_addr, sizeof g_addr);
    struct epoll_event ev = {.data.ptr = c};
    if (r == 0) {
        /* connected immediately (can happen on loopback) */
        t->connects++;
        ev.events = EPOLLIN;
        if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
        send_question(t, c, now, g_cpr);
        return;
    }
    if (errno != EINPROGRESS) {
        conn_fail(t, c, classify_errno(errno), errno, now);
        return;
    }
    c->state = ST_CONNECTING;
    ev.events = EPOLLOUT;
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
}

static void on_connected(struct thread_ctx *t, struct conn *c, int64_t now) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
        conn_fail(t, c, classify_errno(err), err, now);
        return;
    }
    t->connects++;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(t->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    send_question(t, c, now, g_cpr);
}

static void on_readable(struct thread_ctx *t, struct conn *c, int64_t now) {
    size_t want = ALEN[c->qidx];
    /* read at most one byte more than expected, to detect extra data */
    ssize_t n = recv(c->fd, c->buf + c->got, want + 1 - c->got, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        conn_fail(t, c, classify_errno(errno), errno, now);
        return;
    }
    if (n == 0) { /* EOF before the full answer */
        conn_fail(t, c, E_RESET, 0, now);
        return;
    }
    c->got += (size_t)n;
    if (c->got < want) {
        /* partial answer: the prefix must already match */
        if (memcmp(c->buf, ANSWERS[c->qidx], c->got) != 0) conn_fail(t, c, E_WRONG, 0, now);
        return;
    }
    if (c->got != want || memcmp(c->buf, ANSWERS[c->qidx], want) != 0) {
        conn_fail(t, c, E_WRONG, 0, now);
        return;
    }
    record_ok(t, c, now - c->t_start, now);
    if (g_cpr) {
        conn_close(t, c);
        start_connect(t, c, now);
    } else {
        send_question(t, c, now, 0);
    }
}

static void *worker(void *arg) {
    struct thread_ctx *t = arg;
    t->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (t->epfd < 0) die("epoll_create1");
    int64_t now = now_ns();
    for (int i = 0; i < t->nconns; i++) {
        struct conn *c = &t->conns[i];
        c->fd = -1;
        c->next_q = (unsigned)(t->first_conn + i); /* spread questions across conns */
        start_connect(t, c, now);
    }
    struct epoll_event evs[512];
    int64_t next_scan = now + 5 * 1000000LL;
    for (;;) {
        now = now_ns();
        if (now >= g_tend) break;
        int64_t wait_ns = g_tend - now;
        if (wait_ns > 5 * 1000000LL) wait_ns = 5 * 1000000LL;
        int n = epoll_wait(t->epfd, evs, 512, (int)((wait_ns + 999999) / 1000000));
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        now = now_ns();
        if (now >= g_tend) break;
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->fd < 0) continue;
            /* a fresh timestamp per event (vDSO, ~25 ns) so that latencies do not
               absorb the time spent on earlier events of the same batch */
            int64_t tev = i ? now_ns() : now;
            if (c->state == ST_CONNECTING) {
                on_connected(t, c, tev);
            } else if (c->state == ST_READING) {
                if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(t, c, tev);
            }
        }
        now = now_ns();
        /* timeouts and back-off expiry, scanned every ~5 ms */
        if (now >= next_scan) {
            next_scan = now + 5 * 1000000LL;
            for (int i = 0; i < t->nconns; i++) {
                struct conn *c = &t->conns[i];
                if ((c->state == ST_CONNECTING || c->state == ST_READING) && now >= c->deadline) {
                    conn_fail(t, c, E_TIMEOUT, 0, now);
                    start_connect(t, c, now);
                } else if (c->state == ST_BACKOFF && now >= c->deadline) {
                    start_connect(t, c, now);
                } else if (c->state == ST_IDLE) {
                    start_connect(t, c, now);
                }
            }
        }
        /* connections that failed during event processing reconnect right away
           (except those in back-off) */
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->state == ST_IDLE) start_connect(t, c, now);
        }
    }
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of a sorted array */
static uint64_t pct(const uint32_t *v, size_t n, double p) {
    if (!n) return 0;
    size_t rank = (size_t)(p / 100.0 * (double)n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return v[rank - 1];
}

static void usage(const char *p) {
    fprintf(stderr,
            "usage: %s [-H host] [-p port] [-c conns] [-d seconds] [-t threads]\n"
            "          [-r] [-w warmup_seconds] [-T timeout_ms] [-l label]\n"
            "  -H host      server IPv4 address (default 127.0.0.1)\n"
            "  -p port      server port (default 1060)\n"
            "  -c conns     concurrent connections C (default 1)\n"
            "  -d seconds   measured duration (default 5)\n"
            "  -t threads   loadgen threads, each with its own epoll (default 1)\n"
            "  -r           connect-per-request mode (default: persistent)\n"
            "  -w seconds   warm-up before measuring (default 0)\n"
            "  -T ms        per-request timeout incl. connect (default 2000)\n"
            "  -l label     free-form label echoed in the output line\n"
            "  -S n         spread connects over n source addresses 127.0.0.1..n\n"
            "               (default: 16 in connect-per-request mode against a\n"
            "               127.x.x.x server, else 1 = let the kernel choose)\n",
            p);
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *label = "-";
    int port = 1060, opt;
    while ((opt = getopt(argc, argv, "H:p:c:d:t:rw:T:l:S:h")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': g_conns = atoi(optarg); break;
        case 'd': g_duration = atof(optarg); break;
        case 't': g_threads = atoi(optarg); break;
        case 'r': g_cpr = 1; break;
        case 'w': g_warmup = atof(optarg); break;
        case 'T': g_timeout_ns = (int64_t)(atof(optarg) * 1e6); break;
        case 'l': label = optarg; break;
        case 'S': g_nsrc = atoi(optarg); break;
        default: usage(argv[0]);
        }
    }
    if (g_conns < 1 || g_threads < 1 || g_duration <= 0 || port <= 0 || port > 65535 ||
        g_timeout_ns <= 0)
        usage(argv[0]);
    if (g_threads > g_conns) g_threads = g_conns;
    for (int i = 0; i < 3; i++) {
        QLEN[i] = strlen(QUESTIONS[i]);
        ALEN[i] = strlen(ANSWERS[i]);
    }
    memset(&g_addr, 0, sizeof g_addr);
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &g_addr.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address: %s\n", host);
        return 2;
    }
    if (g_nsrc < 0) g_nsrc = (g_cpr && (ntohl(g_addr.sin_addr.s_addr) >> 24) == 127) ? 16 : 1;
    if (g_nsrc > 254) g_nsrc = 254;
    /* make sure we can open C sockets (+ slack) */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)g_conns + 64) {
        rl.rlim_cur = rl.rlim_max < (rlim_t)g_conns + 64 ? rl.rlim_max : (rlim_t)g_conns + 64;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);

    struct thread_ctx *ts = calloc((size_t)g_threads, sizeof *ts);
    struct conn *conns = calloc((size_t)g_conns, sizeof *conns);
    if (!ts || !conns) die("calloc");
    g_t0 = now_ns();
    g_tmeasure = g_t0 + (int64_t)(g_warmup * 1e9);
    g_tend = g_tmeasure + (int64_t)(g_duration * 1e9);
    int per = g_conns / g_threads, extra = g_conns % g_threads, first = 0;
    for (int i = 0; i < g_threads; i++) {
        ts[i].id = i;
        ts[i].nconns = per + (i < extra);
        ts[i].first_conn = first;
        ts[i].conns = conns + first;
        first += ts[i].nconns;
        if (pthread_create(&ts[i].th, NULL, worker, &ts[i]) != 0) die("pthread_create");
    }
    for (int i = 0; i < g_threads; i++) pthread_join(ts[i].th, NULL);
    int64_t t_done = now_ns();

    /* merge */
    uint64_t req = 0, err[E_NCAT] = {0}, connects = 0;
    size_t nlat = 0;
    int64_t max_ns = 0;
    const char *first_err = "-";
    for (int i = 0; i < g_threads; i++) {
        req += ts[i].requests;
        connects += ts[i].connects;
        nlat += ts[i].nlat;
        for (int k = 0; k < E_NCAT; k++) err[k] += ts[i].errors[k];
        if (ts[i].max_lat_ns > max_ns) max_ns = ts[i].max_lat_ns;
        if (ts[i].first_err[0] && first_err[0] == '-') first_err = ts[i].first_err;
    }
    /* per-slot fairness: a slot is one of the C client connections (in cpr
       mode, the sequence of short connections it opens) */
    uint64_t slot_min = UINT64_MAX, slot_max = 0, starved = 0;
    for (int i = 0; i < g_conns; i++) {
        if (conns[i].nok < slot_min) slot_min = conns[i].nok;
        if (conns[i].nok > slot_max) slot_max = conns[i].nok;
        if (conns[i].nok == 0) starved++;
    }
    uint32_t *all = malloc((nlat ? nlat : 1) * sizeof *all);
    if (!all) die("malloc");
    size_t off = 0;
    for (int i = 0; i < g_threads; i++) {
        if (ts[i].nlat) memcpy(all + off, ts[i].lat, ts[i].nlat * sizeof *all);
        off += ts[i].nlat;
    }
    qsort(all, nlat, sizeof *all, cmp_u32);
    uint64_t p50 = pct(all, nlat, 50.0), p90 = pct(all, nlat, 90.0);
    uint64_t p99 = pct(all, nlat, 99.0), p999 = pct(all, nlat, 99.9);
    double mean = 0;
    for (size_t i = 0; i < nlat; i++) mean += all[i];
    if (nlat) mean /= (double)nlat;
    uint64_t errors = 0;
    for (int k = 0; k < E_NCAT; k++) errors += err[k];
    double measured = (double)(g_tend - g_tmeasure) / 1e9;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu_user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    double cpu_sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    double wall = (double)(t_done - g_t0) / 1e9;

    printf("label=%s mode=%s host=%s port=%d conns=%d threads=%d duration_s=%.3f warmup_s=%.3f "
           "nsrc=%d rps=%.1f requests=%llu errors=%llu err_wrong=%llu err_reset=%llu err_refused=%llu "
           "err_timeout=%llu err_other=%llu connects=%llu starved=%llu slot_min=%llu slot_max=%llu "
           "p50_us=%llu p90_us=%llu p99_us=%llu p999_us=%llu max_us=%llu mean_us=%.1f "
           "lg_cpu_user_s=%.3f lg_cpu_sys_s=%.3f lg_wall_s=%.3f first_error=%s\n",
           label, g_cpr ? "cpr" : "persistent", host, port, g_conns, g_threads, measured, g_warmup,
           g_nsrc, (double)req / measured, (unsigned long long)req, (unsigned long long)errors,
           (unsigned long long)err[E_WRONG], (unsigned long long)err[E_RESET],
           (unsigned long long)err[E_REFUSED], (unsigned long long)err[E_TIMEOUT],
           (unsigned long long)err[E_OTHER], (unsigned long long)connects,
           (unsigned long long)starved, (unsigned long long)slot_min, (unsigned long long)slot_max,
           (unsigned long long)p50, (unsigned long long)p90, (unsigned long long)p99,
           (unsigned long long)p999, (unsigned long long)(max_ns / 1000), mean, cpu_user, cpu_sys,
           wall, first_err);
    fflush(stdout);
    /* exit without closing sockets one by one: the kernel closes them */
    return 0;
}
