/*
 * loadgen: a connect / request / response / close load generator and server.
 *
 *   loadgen server [-q REQ] [-r RESP] ADDR:PORT...
 *       One epoll thread. For each connection: read REQ bytes, write RESP
 *       bytes, close. Prints "ready" on stdout once every socket listens.
 *
 *   loadgen client [-d SECONDS] [-w WARMUP] [-T THREADS] [-q REQ] [-r RESP] ADDR:PORT...
 *       Each thread loops over the targets in turn: socket, connect, write
 *       REQ bytes, read RESP bytes, close. Prints one JSON object.
 *
 * ADDR is IPv4 (1.2.3.4:80) or IPv6 ([::1]:80). Defaults: 64-byte request
 * and response, 2 s run after 0.2 s of warm-up, one client thread.
 *
 * The client closes with SO_LINGER {1, 0}: the connection ends with a RST,
 * so neither side keeps a TIME_WAIT socket. Otherwise NATed and direct
 * 4-tuples collide in TIME_WAIT/PAWS and cost SYN retransmits that have
 * nothing to do with the path being measured.
 *
 * -F (both sides): FINs instead, the client first, as HTTP/1.1 clients
 * close: the client shuts its side after the response and waits for the
 * server's FIN; the server closes once it reads the client's. The client
 * keeps the TIME_WAIT (bench/snat_capacity.py: NAT port reuse).
 * -S (client, with a server without -F): FINs, the server first, as an
 * HTTP/1.0 server closes: the client reads to the server's FIN, then
 * closes. The server keeps the TIME_WAIT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_TARGETS 64
#define MAX_FDS 65536

struct target {
	struct sockaddr_storage sa;
	socklen_t len;
};

static struct target targets[MAX_TARGETS];
static int ntargets;
static size_t req_len = 64, resp_len = 64;
static int fin_close;  /* -F */
static int server_first;  /* -S */
static double duration = 2.0, warmup = 0.2;

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

static void parse_target(const char *text, struct target *t)
{
	char host[INET6_ADDRSTRLEN + 2];
	const char *colon = strrchr(text, ':');
	size_t n;

	if (!colon || (n = colon - text) >= sizeof(host)) {
		fprintf(stderr, "bad address %s (want ADDR:PORT)\n", text);
		exit(2);
	}
	memcpy(host, text, n);
	host[n] = 0;
	memset(t, 0, sizeof(*t));
	if (host[0] == '[' && host[n - 1] == ']') {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&t->sa;

		host[n - 1] = 0;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(atoi(colon + 1));
		if (inet_pton(AF_INET6, host + 1, &s6->sin6_addr) != 1)
			goto bad;
		t->len = sizeof(*s6);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&t->sa;

		s4->sin_family = AF_INET;
		s4->sin_port = htons(atoi(colon + 1));
		if (inet_pton(AF_INET, host, &s4->sin_addr) != 1)
			goto bad;
		t->len = sizeof(*s4);
	}
	return;
bad:
	fprintf(stderr, "bad address %s\n", text);
	exit(2);
}

/* ------------------------------------------------------------------ server */

static size_t got[MAX_FDS];  /* request bytes read so far, by fd */
static char answered[MAX_FDS];  /* -F: the response went, the client's FIN is awaited */

static int serve(void)
{
	static char buf[65536], resp[65536];
	struct epoll_event ev, evs[256];
	int ep = epoll_create1(0), one = 1;

	if (ep < 0)
		die("epoll_create1");
	memset(resp, 'r', sizeof(resp));
	for (int i = 0; i < ntargets; i++) {
		int fd = socket(targets[i].sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);

		if (fd < 0)
			die("socket");
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&targets[i].sa, targets[i].len) < 0)
			die("bind");
		if (listen(fd, 4096) < 0)
			die("listen");
		ev.events = EPOLLIN;
		ev.data.u64 = (uint64_t)fd | 1ULL << 32;  /* high bit: a listener */
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
			die("epoll_ctl");
	}
	printf("ready\n");
	fflush(stdout);

	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);

		for (int i = 0; i < n; i++) {
			int fd = (int)(evs[i].data.u64 & 0xffffffff);

			if (evs[i].data.u64 >> 32) {
				int c;

				while ((c = accept4(fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
					if (c >= MAX_FDS) {
						close(c);
						continue;
					}
					got[c] = 0;
					answered[c] = 0;
					ev.events = EPOLLIN;
					ev.data.u64 = (uint64_t)c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof(buf));

			if (r < 0 && errno == EAGAIN)
				continue;
			if (r > 0 && answered[fd])
				continue;  /* -F: more than the request; the FIN is awaited */
			if (r > 0 && (got[fd] += r) < req_len)
				continue;
			if (r > 0) {
				/* A short or failed write means the client went away. */
				ssize_t w = write(fd, resp, resp_len);
				(void)w;
				if (fin_close) {
					answered[fd] = 1;
					continue;
				}
			}
			close(fd);  /* also removes it from the epoll set */
		}
	}
	return 0;
}

/* ------------------------------------------------------------------ client */

struct worker {
	pthread_t tid;
	int first;            /* target index this thread starts at */
	uint32_t *lat_ns;     /* one sample per measured connection */
	size_t count, cap;
	long errors;
	double start, end;    /* measured window */
};

static char req[65536];

static int one_connection(const struct target *t, const char *req, char *buf)
{
	struct linger lg = { 1, 0 };
	struct timeval tmo = { 1, 0 };  /* a broken path fails in 1 s, not 127 */
	size_t have = 0;
	int ok = -1;
	int fd = socket(t->sa.ss_family, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	if (!fin_close && !server_first)
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof(tmo));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof(tmo));
	if (connect(fd, (const struct sockaddr *)&t->sa, t->len) < 0)
		goto out;
	if (write(fd, req, req_len) != (ssize_t)req_len)
		goto out;
	while (have < resp_len) {
		ssize_t r = read(fd, buf, resp_len - have);

		if (r <= 0)
			goto out;
		have += r;
	}
	if (fin_close || server_first) {
		/* -F: ours first, then the server's; -S: the server's first.
		 * Either way read until its FIN (EOF), then close. */
		ssize_t r;

		if (fin_close && shutdown(fd, SHUT_WR) < 0)
			goto out;
		while ((r = read(fd, buf, resp_len)) > 0)
			;
		if (r != 0)
			goto out;
	}
	ok = 0;
out:
	close(fd);
	return ok;
}

static void *client_thread(void *arg)
{
	struct worker *w = arg;
	char *buf = malloc(resp_len);
	double t0 = now_s();
	double measure_from = t0 + warmup, stop = measure_from + duration;
	int i = w->first;

	w->start = measure_from;
	for (;;) {
		double a = now_s(), b;

		if (a >= stop)
			break;
		int rc = one_connection(&targets[i], req, buf);

		b = now_s();
		i = (i + 1) % ntargets;
		if (a < measure_from)
			continue;
		if (rc < 0) {
			w->errors++;
			continue;
		}
		if (w->count == w->cap) {
			w->cap = w->cap ? w->cap * 2 : 1 << 16;
			w->lat_ns = realloc(w->lat_ns, w->cap * sizeof(*w->lat_ns));
			if (!w->lat_ns)
				die("realloc");
		}
		double ns = (b - a) * 1e9;
		w->lat_ns[w->count++] = ns > 4e9 ? 4000000000u : (uint32_t)ns;
	}
	w->end = now_s();
	free(buf);
	return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

static int client(int nthreads)
{
	struct worker *ws = calloc(nthreads, sizeof(*ws));
	size_t total = 0, k = 0;
	long errors = 0;
	double secs = 0, sum = 0;

	memset(req, 'q', req_len);
	for (int t = 0; t < nthreads; t++) {
		ws[t].first = t % ntargets;
		if (pthread_create(&ws[t].tid, NULL, client_thread, &ws[t]))
			die("pthread_create");
	}
	for (int t = 0; t < nthreads; t++) {
		pthread_join(ws[t].tid, NULL);
		total += ws[t].count;
		errors += ws[t].errors;
		secs += (ws[t].end - ws[t].start) / nthreads;
	}
	uint32_t *all = malloc((total ? total : 1) * sizeof(*all));

	for (int t = 0; t < nthreads; t++) {
		memcpy(all + k, ws[t].lat_ns, ws[t].count * sizeof(*all));
		k += ws[t].count;
	}
	qsort(all, total, sizeof(*all), cmp_u32);
	for (size_t j = 0; j < total; j++)
		sum += all[j];
#define PCT(p) (total ? all[(size_t)((total - 1) * (p))] / 1e3 : 0.0)
	printf("{\"count\": %zu, \"seconds\": %.3f, \"rate\": %.1f, \"mean_us\": %.2f, "
	       "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"max_us\": %.2f, "
	       "\"errors\": %ld, \"threads\": %d}\n",
	       total, secs, secs > 0 ? total / secs : 0.0, total ? sum / total / 1e3 : 0.0,
	       PCT(0.50), PCT(0.90), PCT(0.99), PCT(1.0), errors, nthreads);
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: loadgen server [-F] [-q REQ] [-r RESP] ADDR:PORT...\n"
			"       loadgen client [-F | -S] [-d SECONDS] [-w WARMUP] [-T THREADS] "
			"[-q REQ] [-r RESP] ADDR:PORT...\n");
	exit(2);
}

int main(int argc, char **argv)
{
	int threads = 1, opt;

	if (argc < 2)
		usage();
	const char *mode = argv[1];

	optind = 2;
	while ((opt = getopt(argc, argv, "FSd:w:T:q:r:")) != -1) {
		switch (opt) {
		case 'F': fin_close = 1; break;
		case 'S': server_first = 1; break;
		case 'd': duration = atof(optarg); break;
		case 'w': warmup = atof(optarg); break;
		case 'T': threads = atoi(optarg); break;
		case 'q': req_len = strtoul(optarg, NULL, 0); break;
		case 'r': resp_len = strtoul(optarg, NULL, 0); break;
		default: usage();
		}
	}
	if (req_len < 1 || req_len > 65536 || resp_len < 1 || resp_len > 65536 || threads < 1 ||
	    (fin_close && server_first))
		usage();
	for (; optind < argc && ntargets < MAX_TARGETS; optind++)
		parse_target(argv[optind], &targets[ntargets++]);
	if (!ntargets)
		usage();
	if (!strcmp(mode, "server"))
		return serve();
	if (!strcmp(mode, "client"))
		return client(threads);
	usage();
	return 2;
}
