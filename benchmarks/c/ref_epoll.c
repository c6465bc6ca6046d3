/*
 * ref_epoll.c - reference "lancelot" server in C: non-blocking sockets and a
 * level-triggered epoll loop.  Single process by default; with NPROC > 1 the
 * process forks NPROC workers after bind()/listen(), and every worker runs
 * its own epoll loop on the shared listening socket (EPOLLEXCLUSIVE, so one
 * new connection wakes one worker).
 *
 * usage: ref_epoll [port [nproc [host]]]     (defaults: 1060 1 127.0.0.1)
 *
 * Protocol: questions end with '?', answers end with '.', no other framing.
 * Several questions in one read are answered in order.  An unknown question
 * (or more than 256 bytes without a '?') closes the connection.
 *
 * Part of lancelotd's benchmarks (benchmarks/README.md): the yardstick that
 * marks the practical limit of the machine (1 process), and the control in
 * lancelotd's shape (2 processes).  bench.py and report.py build it with `cc`;
 * by hand: cc -O2 -Wall -o /tmp/ref_epoll benchmarks/c/ref_epoll.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define INBUF 256
#define OUTBUF 1024

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

struct conn {
    unsigned short inlen, outlen, outoff;
    unsigned char want_out;
    char in[INBUF];
    char out[OUTBUF];
};

static struct conn **conns; /* indexed by fd */
static int maxfd;
static int epfd;
static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

static void close_conn(int fd) {
    close(fd); /* also removes fd from the epoll set */
    free(conns[fd]);
    conns[fd] = NULL;
}

static int match(const char *q, size_t len) {
    for (int i = 0; i < 3; i++)
        if (len == QLEN[i] && memcmp(q, QUESTIONS[i], len) == 0) return i;
    return -1;
}

/* try to flush pending output; returns -1 if the connection must be closed */
static int flush_out(int fd, struct conn *c) {
    while (c->outoff < c->outlen) {
        ssize_t n = send(fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            return -1;
        }
        c->outoff += (unsigned short)n;
    }
    if (c->outoff == c->outlen) c->outoff = c->outlen = 0;
    int need = c->outlen > 0;
    if (need != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (need ? EPOLLOUT : 0), .data.fd = fd};
        epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
        c->want_out = (unsigned char)need;
    }
    return 0;
}

static void on_readable(int fd) {
    struct conn *c = conns[fd];
    for (;;) {
        ssize_t n = recv(fd, c->in + c->inlen, INBUF - c->inlen, 0);
        if (n == 0) { close_conn(fd); return; }
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            close_conn(fd);
            return;
        }
        c->inlen += (unsigned short)n;
        /* answer every complete question in the buffer */
        size_t start = 0;
        for (size_t i = 0; i < c->inlen; i++) {
            if (c->in[i] != '?') continue;
            int q = match(c->in + start, i + 1 - start);
            if (q < 0 || c->outlen + ALEN[q] > OUTBUF) { close_conn(fd); return; }
            memcpy(c->out + c->outlen, ANSWERS[q], ALEN[q]);
            c->outlen += (unsigned short)ALEN[q];
            start = i + 1;
        }
        if (start) {
            memmove(c->in, c->in + start, c->inlen - start);
            c->inlen -= (unsigned short)start;
        }
        if (c->inlen == INBUF) { close_conn(fd); return; } /* no '?' in 256 bytes */
        if (c->outlen && flush_out(fd, c) < 0) { close_conn(fd); return; }
        if ((size_t)n < INBUF) break; /* short read: socket most likely drained */
    }
}

static void on_accept(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return; /* EAGAIN (another worker got it), EMFILE, ... */
        }
        if (fd >= maxfd) { close(fd); continue; }
        conns[fd] = calloc(1, sizeof(struct conn));
        if (!conns[fd]) { close(fd); continue; }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) { close_conn(fd); continue; }
    }
}

static void serve(int lfd, int exclusive) {
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) { perror("epoll_create1"); exit(1); }
    struct epoll_event ev = {.events = EPOLLIN | (exclusive ? EPOLLEXCLUSIVE : 0), .data.fd = lfd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) { perror("epoll_ctl listen"); exit(1); }
    struct epoll_event evs[256];
    while (!stop) {
        int n = epoll_wait(epfd, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            exit(1);
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) { on_accept(lfd); continue; }
            struct conn *c = conns[fd];
            if (!c) continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                on_readable(fd);
                if (!conns[fd]) continue;
            }
            if ((evs[i].events & EPOLLOUT) && flush_out(fd, c) < 0) close_conn(fd);
        }
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 1060;
    int nproc = argc > 2 ? atoi(argv[2]) : 1;
    const char *host = argc > 3 ? argv[3] : "127.0.0.1";
    if (port <= 0 || port > 65535 || nproc < 1) {
        fprintf(stderr, "usage: %s [port [nproc [host]]]\n", argv[0]);
        return 2;
    }
    for (int i = 0; i < 3; i++) {
        QLEN[i] = strlen(QUESTIONS[i]);
        ALEN[i] = strlen(ANSWERS[i]);
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
    maxfd = rl.rlim_cur > 1048576 ? 1048576 : (int)rl.rlim_cur;
    conns = calloc((size_t)maxfd, sizeof *conns);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) { fprintf(stderr, "bad host\n"); return 2; }
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    if (listen(lfd, 4096) < 0) { perror("listen"); return 1; }

    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);

    if (nproc == 1) {
        printf("READY ref_epoll port=%d pid=%d nproc=1\n", port, (int)getpid());
        fflush(stdout);
        serve(lfd, 0);
        return 0;
    }
    pid_t *kids = calloc((size_t)nproc, sizeof *kids);
    sigprocmask(SIG_BLOCK, &block, &old); /* no lost SIGTERM before sigsuspend */
    for (int i = 0; i < nproc; i++) {
        pid_t p = fork();
        if (p < 0) { perror("fork"); break; }
        if (p == 0) {
            sigprocmask(SIG_SETMASK, &old, NULL);
            serve(lfd, 1);
            _exit(0);
        }
        kids[i] = p;
    }
    printf("READY ref_epoll port=%d pid=%d nproc=%d\n", port, (int)getpid(), nproc);
    fflush(stdout);
    /* parent: wait until told to stop, then stop the workers it forked */
    while (!stop) sigsuspend(&old);
    for (int i = 0; i < nproc; i++)
        if (kids[i] > 0) kill(kids[i], SIGTERM);
    for (int i = 0; i < nproc; i++)
        if (kids[i] > 0) waitpid(kids[i], NULL, 0);
    return 0;
}
