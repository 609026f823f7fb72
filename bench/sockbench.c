/*
 * sockbench: request/response and streaming over one long-lived TCP
 * connection, for comparing same-node socket redirection with plain TCP.
 *
 *   sockbench server [-w WARMUP] [-b READBUF] [-P] ADDR PORT:MODE:SIZE:NAGLE...
 *       Listens on ADDR at each PORT; a connection to PORT is served in MODE
 *       ("rr" or "stream") with SIZE-byte messages, with Nagle on ("nagle")
 *       or off ("nodelay", TCP_NODELAY set on the accepted socket right
 *       after accept). One thread per connection. Prints
 *       "ready" once every port listens, then one JSON line per connection
 *       when the client has finished (its EOF):
 *         rr:     transactions served;
 *         stream: the receiver's measurement: bytes read from WARMUP seconds
 *                 after the first byte until the last byte, and that rate.
 *
 *   sockbench rr|stream [-d SECONDS] [-w WARMUP] [-s SIZE] [-N] [-P] [-c CONNS] ADDR:PORT
 *       rr:     write SIZE bytes, read SIZE bytes back, repeat; records each
 *               transaction's time. Prints transactions/s, p50, p99.
 *       stream: write SIZE-byte chunks for WARMUP + SECONDS; the rate that
 *               counts is the server's (the receiver's).
 *       -N sets TCP_NODELAY (before connect); the server must be told the
 *       same in its port spec. -c runs CONNS connections at once, one thread
 *       each. The client ends with shutdown(SHUT_WR) and waits for the
 *       server's EOF, so the server has read everything before it reports.
 *       Prints one JSON object, with each connection's local port so the
 *       server's lines can be matched to it.
 *
 *   sockbench pipe-rr [-d SECONDS] [-w WARMUP] [-s SIZE] [-C CPU,CPU]
 *       No network: two threads ping-pong SIZE bytes over pipes. Run under
 *       the client's CPU pinning, it is the ceiling that wake-ups alone put
 *       on a request/response rate.
 *
 * Sockets are non-blocking (O_NONBLOCK before connect(), the listener's
 * too, accept4 with SOCK_NONBLOCK), waited on with poll(), as event loops
 * do: meshbpf splices only non-blocking sockets, and judges an accepted one
 * by its listener (see README, "Blocking sockets are not spliced"). -P (server and client, experiments): reads spin instead of
 * polling, which takes wake-ups out of the measurement.
 *
 * "eagain" and "eagain_eof" count reads that found nothing after poll()
 * said the socket was readable (followed by data, or by the peer's EOF):
 * harmless here, counted to see how often splicing wakes a reader early.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 64
#define MAX_CONNS 64
#define MAX_SIZE (16u << 20)
#define IO_TIMEOUT_S 10

enum mode { RR, STREAM };

static double duration = 2.0, warmup = 0.2;
static size_t readbuf = 1 << 20;
static int spin;  /* -P: non-blocking reads in a busy loop, no sleeping */
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_addr(const char *host, int port, struct sockaddr_storage *sa, socklen_t *len)
{
	char buf[INET6_ADDRSTRLEN + 2];
	size_t n = strlen(host);

	memset(sa, 0, sizeof(*sa));
	if (n >= sizeof(buf))
		return -1;
	memcpy(buf, host, n + 1);
	if (buf[0] == '[' && n > 2 && buf[n - 1] == ']') {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)sa;

		buf[n - 1] = 0;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		*len = sizeof(*s6);
		return inet_pton(AF_INET6, buf + 1, &s6->sin6_addr) == 1 ? 0 : -1;
	}
	struct sockaddr_in *s4 = (struct sockaddr_in *)sa;

	s4->sin_family = AF_INET;
	s4->sin_port = htons(port);
	*len = sizeof(*s4);
	return inet_pton(AF_INET, buf, &s4->sin_addr) == 1 ? 0 : -1;
}

static int sock_port(int fd, int peer)
{
	struct sockaddr_storage sa;
	socklen_t len = sizeof(sa);

	if ((peer ? getpeername : getsockname)(fd, (struct sockaddr *)&sa, &len) < 0)
		return -1;
	return ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
					      : ((struct sockaddr_in *)&sa)->sin_port);
}

static void set_timeouts(int fd)
{
	struct timeval tmo = { IO_TIMEOUT_S, 0 };  /* a broken path fails, not hangs */

	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof(tmo));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof(tmo));
}

static void set_nodelay(int fd, int on)
{
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on)) < 0)
		die("TCP_NODELAY");
}

/* Spurious EAGAINs from blocking reads: those followed by data, and those
 * followed by the peer's EOF (a wakeup by the FIN or the state change). */
struct eagain {
	long data, eof;
};

/* Waits until fd is ready for `events`; 0 on time-out (IO_TIMEOUT_S). */
static int wait_fd(int fd, short events)
{
	struct pollfd p = { .fd = fd, .events = events };
	int r;

	while ((r = poll(&p, 1, IO_TIMEOUT_S * 1000)) < 0 && errno == EINTR)
		;
	return r > 0;
}

/* A read of a non-blocking socket that waits with poll() (or, with -P,
 * spins) until read() returns something. Returns what read() returns;
 * -1 with EAGAIN after IO_TIMEOUT_S without data. */
static ssize_t read_retry(int fd, void *buf, size_t len, struct eagain *ea)
{
	long n = 0;
	int polled = 0;

	for (;;) {
		ssize_t r = read(fd, buf, len);

		if (r >= 0) {
			if (r > 0)
				ea->data += n;
			else
				ea->eof += n;
			return r;
		}
		if (errno == EINTR || (spin && errno == EAGAIN))
			continue;
		if (errno != EAGAIN)
			return r;
		n += polled;  /* poll() said readable, yet nothing came */
		if (!wait_fd(fd, POLLIN))
			return -1;
		polled = 1;
	}
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t w = write(fd, buf, len);

		if (w < 0 && (errno == EINTR || (errno == EAGAIN && wait_fd(fd, POLLOUT))))
			continue;
		if (w <= 0)
			return -1;
		buf += w;
		len -= w;
	}
	return 0;
}

static int read_exact(int fd, char *buf, size_t len, struct eagain *eagain)
{
	while (len) {
		ssize_t r = read_retry(fd, buf, len, eagain);

		if (r <= 0)
			return r == 0 && len ? 1 : -1;  /* 1: EOF */
		buf += r;
		len -= r;
	}
	return 0;
}

static char *payload(size_t size, char fill)
{
	char *p = malloc(size ? size : 1);

	if (!p)
		die("malloc");
	memset(p, fill, size);
	return p;
}

/* ------------------------------------------------------------------ server */

struct listener {
	int fd, port;
	enum mode mode;
	size_t size;
	int nodelay;
};

struct conn {
	int fd;
	struct listener *l;
};

static void *serve_conn(void *arg)
{
	struct conn *c = arg;
	struct listener *l = c->l;
	int fd = c->fd, peer_port = sock_port(fd, 1);
	struct eagain eagain = { 0, 0 };
	long transactions = 0;
	const char *end = "eof";
	char *buf;

	free(c);
	set_timeouts(fd);
	if (l->nodelay)
		set_nodelay(fd, 1);
	if (l->mode == RR) {
		buf = payload(l->size, 'r');
		for (;;) {
			int rc = read_exact(fd, buf, l->size, &eagain);

			if (rc) {
				end = rc > 0 ? "eof" : "error";
				break;
			}
			if (write_all(fd, buf, l->size) < 0) {
				end = "error";
				break;
			}
			transactions++;
		}
		pthread_mutex_lock(&out_lock);
		printf("{\"port\": %d, \"peer_port\": %d, \"mode\": \"rr\", \"size\": %zu, "
		       "\"transactions\": %ld, \"eagain\": %ld, \"eagain_eof\": %ld, \"end\": \"%s\"}\n",
		       l->port, peer_port, l->size, transactions, eagain.data, eagain.eof, end);
	} else {
		double first = 0, from = 0, last = 0;
		uint64_t total = 0, measured = 0;

		buf = payload(readbuf, 0);
		for (;;) {
			ssize_t r = read_retry(fd, buf, readbuf, &eagain);
			double t = now_s();

			if (r <= 0) {
				end = r == 0 ? "eof" : "error";
				break;
			}
			if (!total) {
				first = t;
				from = first + warmup;
			}
			total += r;
			if (t >= from) {
				measured += r;
				last = t;
			}
		}
		double secs = last > from ? last - from : 0;

		pthread_mutex_lock(&out_lock);
		printf("{\"port\": %d, \"peer_port\": %d, \"mode\": \"stream\", \"size\": %zu, "
		       "\"bytes\": %llu, \"measured_bytes\": %llu, \"seconds\": %.4f, "
		       "\"MBps\": %.2f, \"eagain\": %ld, \"eagain_eof\": %ld, \"end\": \"%s\"}\n",
		       l->port, peer_port, l->size, (unsigned long long)total,
		       (unsigned long long)measured, secs, secs > 0 ? measured / secs / 1e6 : 0.0,
		       eagain.data, eagain.eof, end);
	}
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
	free(buf);
	close(fd);
	return NULL;
}

static int parse_spec(const char *text, struct listener *l)
{
	char mode[16], nagle[16];
	unsigned long size;

	if (sscanf(text, "%d:%15[^:]:%lu:%15s", &l->port, mode, &size, nagle) != 4)
		return -1;
	if (!strcmp(mode, "rr"))
		l->mode = RR;
	else if (!strcmp(mode, "stream"))
		l->mode = STREAM;
	else
		return -1;
	if (!strcmp(nagle, "nodelay"))
		l->nodelay = 1;
	else if (!strcmp(nagle, "nagle"))
		l->nodelay = 0;
	else
		return -1;
	if (size < 1 || size > MAX_SIZE || l->port < 1 || l->port > 65535)
		return -1;
	l->size = size;
	return 0;
}

static int server(int argc, char **argv)
{
	static struct listener ls[MAX_PORTS];
	struct pollfd pfd[MAX_PORTS];
	int n = 0, one = 1;

	if (argc < 2)
		return -1;
	for (int i = 1; i < argc && n < MAX_PORTS; i++, n++) {
		struct sockaddr_storage sa;
		socklen_t len;

		if (parse_spec(argv[i], &ls[n]) < 0) {
			fprintf(stderr, "bad port spec %s (want PORT:rr|stream:SIZE:nagle|nodelay)\n", argv[i]);
			return -1;
		}
		if (parse_addr(argv[0], ls[n].port, &sa, &len) < 0) {
			fprintf(stderr, "bad address %s\n", argv[0]);
			return -1;
		}
		/* non-blocking like the accepted sockets: meshbpf judges a
		 * socket by its listener until the socket sends */
		int fd = socket(sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);

		if (fd < 0)
			die("socket");
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&sa, len) < 0)
			die("bind");
		if (listen(fd, 128) < 0)
			die("listen");
		ls[n].fd = fd;
		pfd[n].fd = fd;
		pfd[n].events = POLLIN;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		if (poll(pfd, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		for (int i = 0; i < n; i++) {
			if (!(pfd[i].revents & POLLIN))
				continue;
			int fd = accept4(ls[i].fd, NULL, NULL, SOCK_NONBLOCK);

			if (fd < 0)
				continue;
			struct conn *c = malloc(sizeof(*c));
			pthread_t tid;

			c->fd = fd;
			c->l = &ls[i];
			if (pthread_create(&tid, NULL, serve_conn, c))
				die("pthread_create");
			pthread_detach(tid);
		}
	}
	return 0;
}

/* ------------------------------------------------------------------ client */

static struct sockaddr_storage target;
static socklen_t target_len;
static enum mode cmode;
static size_t size = 64;
static int nodelay;

struct worker {
	pthread_t tid;
	int local_port;
	uint32_t *lat_ns;      /* rr: one sample per measured transaction */
	size_t count, cap;     /* rr: measured transactions */
	uint64_t sent, recvd;  /* all bytes, warm-up included */
	uint64_t measured;     /* stream: bytes written after the warm-up */
	struct eagain eagain;
	const char *error;
	double start, end;     /* measured window */
};

static int open_conn(struct worker *w)
{
	int fd = socket(target.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
	int err = 0;
	socklen_t elen = sizeof(err);

	if (fd < 0)
		die("socket");
	set_timeouts(fd);
	if (nodelay)
		set_nodelay(fd, 1);
	if (connect(fd, (struct sockaddr *)&target, target_len) < 0 &&
	    (errno != EINPROGRESS || !wait_fd(fd, POLLOUT) ||
	     getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0 || err)) {
		w->error = "connect";
		close(fd);
		return -1;
	}
	w->local_port = sock_port(fd, 0);
	return fd;
}

static void finish(int fd, struct worker *w)
{
	char tail[64];

	/* The server reports once it reads our EOF; wait for its close so it
	 * has read everything before we exit. */
	shutdown(fd, SHUT_WR);
	for (;;) {
		ssize_t r = read_retry(fd, tail, sizeof(tail), &w->eagain);  /* EOF: eagain.eof */

		if (r <= 0) {
			if (r < 0 && !w->error)
				w->error = "read at close";
			break;
		}
	}
	close(fd);
}

static void *rr_thread(void *arg)
{
	struct worker *w = arg;
	char *req = payload(size, 'q'), *resp = payload(size, 0);
	int fd = open_conn(w);
	double t0 = now_s(), from = t0 + warmup, stop = from + duration;

	w->start = from;
	if (fd < 0)
		goto out;
	for (;;) {
		double a = now_s();

		if (a >= stop)
			break;
		if (write_all(fd, req, size) < 0) {
			w->error = "write";
			break;
		}
		w->sent += size;
		int rc = read_exact(fd, resp, size, &w->eagain);

		if (rc) {
			w->error = rc > 0 ? "early EOF" : "read";
			break;
		}
		w->recvd += size;
		if (a < from)
			continue;
		if (w->count == w->cap) {
			w->cap = w->cap ? w->cap * 2 : 1 << 16;
			w->lat_ns = realloc(w->lat_ns, w->cap * sizeof(*w->lat_ns));
			if (!w->lat_ns)
				die("realloc");
		}
		double ns = (now_s() - a) * 1e9;

		w->lat_ns[w->count++] = ns > 4e9 ? 4000000000u : (uint32_t)ns;
	}
	w->end = now_s();
	finish(fd, w);
out:
	free(req);
	free(resp);
	return NULL;
}

static void *stream_thread(void *arg)
{
	struct worker *w = arg;
	char *buf = payload(size, 's');
	int fd = open_conn(w);
	double t0 = now_s(), from = t0 + warmup, stop = from + duration;

	w->start = from;
	if (fd < 0)
		goto out;
	for (;;) {
		double a = now_s();

		if (a >= stop)
			break;
		if (write_all(fd, buf, size) < 0) {
			w->error = "write";
			break;
		}
		w->sent += size;
		if (a >= from)
			w->measured += size;
	}
	w->end = now_s();
	finish(fd, w);
out:
	free(buf);
	return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

static int client(int conns)
{
	struct worker *ws = calloc(conns, sizeof(*ws));
	size_t total = 0, k = 0;
	uint64_t sent = 0, recvd = 0, measured = 0;
	struct eagain eagain = { 0, 0 };
	const char *error = NULL;
	double secs = 0;

	for (int t = 0; t < conns; t++)
		if (pthread_create(&ws[t].tid, NULL, cmode == RR ? rr_thread : stream_thread, &ws[t]))
			die("pthread_create");
	for (int t = 0; t < conns; t++) {
		pthread_join(ws[t].tid, NULL);
		total += ws[t].count;
		sent += ws[t].sent;
		recvd += ws[t].recvd;
		measured += ws[t].measured;
		eagain.data += ws[t].eagain.data;
		eagain.eof += ws[t].eagain.eof;
		if (ws[t].error && !error)
			error = ws[t].error;
		secs += (ws[t].end - ws[t].start) / conns;
	}
	printf("{\"mode\": \"%s\", \"size\": %zu, \"nodelay\": %d, \"conns\": %d, \"seconds\": %.4f, "
	       "\"sent_bytes\": %llu, \"recv_bytes\": %llu, \"eagain\": %ld, \"eagain_eof\": %ld, "
	       "\"spin\": %d, \"error\": %s%s%s, ",
	       cmode == RR ? "rr" : "stream", size, nodelay, conns, secs,
	       (unsigned long long)sent, (unsigned long long)recvd, eagain.data, eagain.eof, spin,
	       error ? "\"" : "", error ? error : "null", error ? "\"" : "");
	printf("\"local_ports\": [");
	for (int t = 0; t < conns; t++)
		printf("%s%d", t ? ", " : "", ws[t].local_port);
	printf("], ");
	if (cmode == RR) {
		uint32_t *all = malloc((total ? total : 1) * sizeof(*all));
		double sum = 0;

		for (int t = 0; t < conns; t++) {
			memcpy(all + k, ws[t].lat_ns, ws[t].count * sizeof(*all));
			k += ws[t].count;
		}
		qsort(all, total, sizeof(*all), cmp_u32);
		for (size_t j = 0; j < total; j++)
			sum += all[j];
#define PCT(p) (total ? all[(size_t)((total - 1) * (p))] / 1e3 : 0.0)
		printf("\"count\": %zu, \"rate\": %.1f, \"mean_us\": %.2f, \"p50_us\": %.2f, "
		       "\"p90_us\": %.2f, \"p99_us\": %.2f, \"max_us\": %.2f}\n",
		       total, secs > 0 ? total / secs : 0.0, total ? sum / total / 1e3 : 0.0,
		       PCT(0.50), PCT(0.90), PCT(0.99), PCT(1.0));
	} else {
		printf("\"measured_bytes\": %llu, \"sender_MBps\": %.2f}\n",
		       (unsigned long long)measured, secs > 0 ? measured / secs / 1e6 : 0.0);
	}
	return error ? 1 : 0;
}

/* ------------------------------------------------------------- pipe-rr */

/* The floor that wake-ups set, with no network at all: two threads of one
 * process ping-pong SIZE bytes over two pipes, blocking. Run under the same
 * CPU pinning as the client and server, it shows what a request/response
 * rate cannot exceed whatever the socket path costs. */
static int pipes[2][2];
static int pipe_cpu[2] = { -1, -1 };  /* -C A,B: the two threads' CPUs */

static void pin_self(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set))
		die("pthread_setaffinity_np");
}

static void *pong(void *arg)
{
	char *buf = arg;

	pin_self(pipe_cpu[1]);
	for (;;) {
		size_t have = 0;

		while (have < size) {
			ssize_t r = read(pipes[0][0], buf + have, size - have);

			if (r <= 0)
				return NULL;
			have += r;
		}
		if (write_all(pipes[1][1], buf, size) < 0)
			return NULL;
	}
}

static int pipe_rr(void)
{
	char *a = payload(size, 'p'), *b = payload(size, 0);
	double t0 = now_s(), from = t0 + warmup, stop = from + duration, end;
	long count = 0;
	pthread_t tid;

	if (pipe(pipes[0]) < 0 || pipe(pipes[1]) < 0)
		die("pipe");
	pin_self(pipe_cpu[0]);
	if (pthread_create(&tid, NULL, pong, b))
		die("pthread_create");
	for (;;) {
		double t = now_s();
		size_t have = 0;

		if (t >= stop)
			break;
		if (write_all(pipes[0][1], a, size) < 0)
			die("write");
		while (have < size) {
			ssize_t r = read(pipes[1][0], a + have, size - have);

			if (r <= 0)
				die("read");
			have += r;
		}
		if (t >= from)
			count++;
	}
	end = now_s();
	close(pipes[0][1]);
	pthread_join(tid, NULL);
	printf("{\"mode\": \"pipe-rr\", \"size\": %zu, \"count\": %ld, \"seconds\": %.4f, "
	       "\"rate\": %.1f}\n", size, count, end - from, count / (end - from));
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: sockbench server [-w WARMUP] [-b READBUF] [-P] ADDR PORT:rr|stream:SIZE:nagle|nodelay...\n"
		"       sockbench rr|stream [-d SECONDS] [-w WARMUP] [-s SIZE] [-N] [-P] [-c CONNS] ADDR:PORT\n"
		"       sockbench pipe-rr [-d SECONDS] [-w WARMUP] [-s SIZE] [-C CPU,CPU]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	int conns = 1, opt;

	if (argc < 2)
		usage();
	const char *mode = argv[1];

	optind = 2;
	while ((opt = getopt(argc, argv, "d:w:s:b:c:NPC:")) != -1) {
		switch (opt) {
		case 'd': duration = atof(optarg); break;
		case 'w': warmup = atof(optarg); break;
		case 's': size = strtoul(optarg, NULL, 0); break;
		case 'b': readbuf = strtoul(optarg, NULL, 0); break;
		case 'c': conns = atoi(optarg); break;
		case 'N': nodelay = 1; break;
		case 'P': spin = 1; break;
		case 'C':
			if (sscanf(optarg, "%d,%d", &pipe_cpu[0], &pipe_cpu[1]) != 2)
				usage();
			break;
		default: usage();
		}
	}
	if (size < 1 || size > MAX_SIZE || readbuf < 1 || readbuf > MAX_SIZE ||
	    conns < 1 || conns > MAX_CONNS || duration <= 0 || warmup < 0)
		usage();
	if (!strcmp(mode, "server")) {
		if (server(argc - optind, argv + optind) < 0)
			usage();
		return 0;
	}
	if (!strcmp(mode, "pipe-rr"))
		return pipe_rr();
	if (strcmp(mode, "rr") && strcmp(mode, "stream"))
		usage();
	cmode = !strcmp(mode, "rr") ? RR : STREAM;
	if (optind != argc - 1)
		usage();
	const char *colon = strrchr(argv[optind], ':');
	char host[INET6_ADDRSTRLEN + 2];

	if (!colon || (size_t)(colon - argv[optind]) >= sizeof(host))
		usage();
	memcpy(host, argv[optind], colon - argv[optind]);
	host[colon - argv[optind]] = 0;
	if (parse_addr(host, atoi(colon + 1), &target, &target_len) < 0)
		usage();
	return client(conns);
}
