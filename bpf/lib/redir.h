/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Shared logic of same-node socket redirection.
 *
 * A connection whose two sockets are both on this node and both eligible
 * starts in REDIRECT mode: sk_msg splices each send into the peer socket's
 * receive queue. A pair whose sender streams small writes without Nagle's
 * batching is slower spliced than over TCP, so it is switched to PASS for
 * good (switching back would reorder bytes), and each socket leaves the
 * sockhash once nothing spliced is waiting in its queue, which gives it its
 * native TCP path back.
 */
#ifndef MBPF_REDIR_H
#define MBPF_REDIR_H

#ifndef MBPF_OFF_SK_USER_DATA
#error "the loader sets the kernel struct offsets from BTF"
#endif

#include "common.h"
#include "compat.h"
#include "addr.h"
#include "redir_maps.h"

static __always_inline void redir_count(__u32 idx, __u64 n)
{
	__u64 *v = mbpf_redir_cnt.lookup(&idx);

	if (v)
		*v += n;
}

static __always_inline struct mbpf_redir_cfg *redir_cfg(void)
{
	__u32 zero = 0;

	return mbpf_redir_cfg.lookup(&zero);
}

/* Family and scope of a filled key; ctx is the program's context, for the
 * netns cookie of a loopback connection (both ends share the namespace). */
#define redir_key_finish(ctx, key)							\
	do {										\
		const __u32 *__w = (const __u32 *)(key)->remote_ip;			\
		(key)->family = (__w[0] == 0 && __w[1] == 0 &&				\
				 __w[2] == bpf_htonl(0x0000ffff)) ? 4 : 6;		\
		if (addr_is_loopback((key)->local_ip) ||				\
		    addr_is_loopback((key)->remote_ip))				\
			redir_key_scope(ctx, key);					\
	} while (0)

#ifdef MBPF_HAVE_REDIR_NETNS_COOKIE
#define redir_key_scope(ctx, key)							\
	do {										\
		__u64 __ns = bpf_get_netns_cookie(ctx);					\
		__builtin_memcpy((key)->local_ip, &__ns, sizeof(__ns));			\
		__builtin_memcpy((key)->remote_ip, &__ns, sizeof(__ns));		\
		(key)->scope = MBPF_SCOPE_NETNS;					\
	} while (0)
#else
/* Without the helper in sockops and sk_msg (before 5.15), loopback pairs of
 * two pods would share keys: they are left to TCP. */
#define redir_key_scope(ctx, key) ((key)->scope = MBPF_SCOPE_AMBIGUOUS)
#endif

/* Fills a key from a bpf_sock_ops or sk_msg_md context: both uapi structs
 * name these fields alike, with the same byte orders (local_port in host
 * order, remote_port network order in the upper 16 bits). */
#define redir_key_from_ctx(ctx, key)							\
	do {										\
		__u32 __family = (ctx)->family;						\
		addr_fill((key)->local_ip, __family, (ctx)->local_ip4,			\
			   MBPF_CTX_READ32((ctx)->local_ip6[0]), MBPF_CTX_READ32((ctx)->local_ip6[1]),	\
			   MBPF_CTX_READ32((ctx)->local_ip6[2]), MBPF_CTX_READ32((ctx)->local_ip6[3]));	\
		addr_fill((key)->remote_ip, __family, (ctx)->remote_ip4,			\
			   MBPF_CTX_READ32((ctx)->remote_ip6[0]), MBPF_CTX_READ32((ctx)->remote_ip6[1]),	\
			   MBPF_CTX_READ32((ctx)->remote_ip6[2]), MBPF_CTX_READ32((ctx)->remote_ip6[3]));	\
		(key)->local_port = (__u16)(ctx)->local_port;				\
		(key)->remote_port = (__u16)bpf_ntohl((ctx)->remote_port);		\
		redir_key_finish(ctx, key);						\
	} while (0)

static __always_inline void redir_peer_key(const struct mbpf_sock_key *key,
					   struct mbpf_sock_key *peer)
{
	__builtin_memcpy(peer->local_ip, key->remote_ip, MBPF_ADDR_LEN);
	__builtin_memcpy(peer->remote_ip, key->local_ip, MBPF_ADDR_LEN);
	peer->local_port = key->remote_port;
	peer->remote_port = key->local_port;
	peer->family = key->family;
	peer->scope = key->scope;
}

/* Switches a pair to the TCP stack, for good. Either state may be NULL. */
static __always_inline void redir_pass_pair(struct mbpf_sockstate *self,
					    struct mbpf_sockstate *peer)
{
	if (self)
		self->mode = MBPF_MODE_PASS;
	if (peer)
		peer->mode = MBPF_MODE_PASS;
	redir_count(MBPF_CNT_SWITCHED, 1);
}

/* 1 if the socket at this kernel address belongs to a file opened for
 * blocking I/O (no O_NONBLOCK), 0 if non-blocking, or not known (no file
 * yet: a passive socket before accept(); or an unreadable address).
 *
 * Why it matters: tcp_bpf_recvmsg, the recvmsg of every socket in a
 * sockhash, returns EAGAIN when a blocking read is woken with no data, on
 * every kernel up to 7.0 at least. Such wake-ups are common: the bare ACK
 * of the reader's own FIN (a "write, shutdown(SHUT_WR), read to EOF"
 * client facing a server that answers after 40 ms), a signal, write space
 * for another thread. A non-blocking reader takes EAGAIN as "poll again";
 * a blocking one takes it as an error. So blocking sockets stay out; an
 * accepted socket, which has no file when it is established, is judged by
 * its listener's (mbpf_sockops, listener_blocks). */
static __always_inline int sock_reads_block(__u64 sk_addr)
{
	__u64 sock = 0, file = 0;
	__u32 flags = 0;

	if (!sk_addr ||
	    bpf_probe_read_kernel(&sock, sizeof(sock), (void *)(sk_addr + MBPF_OFF_SK_SOCKET)) || !sock ||
	    bpf_probe_read_kernel(&file, sizeof(file), (void *)(sock + MBPF_OFF_SOCKET_FILE)) || !file ||
	    bpf_probe_read_kernel(&flags, sizeof(flags), (void *)(file + MBPF_OFF_FILE_FLAGS)))
		return 0;
	return !(flags & 04000 /* O_NONBLOCK */);
}

/* The network namespace of the socket at this kernel address: the address
 * of its struct net (0 if unreadable). Read through BTF offsets because
 * bpf_get_netns_cookie() reaches sockops only in 5.15. */
static __always_inline __u64 sock_netns(__u64 sk_addr)
{
	__u64 net = 0;

	if (sk_addr)
		bpf_probe_read_kernel(&net, sizeof(net), (void *)(sk_addr + MBPF_OFF_SK_NET));
	return net;
}

/* reader_unfit's answers */
#define MBPF_UNFIT_SPINNING 1
#define MBPF_UNFIT_BLOCKING 2

#ifdef MBPF_SPIN
#if !defined(MBPF_SPIN_EMPTY_MIN) || !defined(MBPF_SPIN_RUN_MAX)
#error "the loader sets the spin thresholds (meshbpf/datapath/redirect.py)"
#endif
/* A socket joins the sockhash: its empty reads are counted from now on
 * (bpf/recv_trace.c counts only sockets listed here). */
static __always_inline void spin_track(__u64 sk_addr)
{
	struct mbpf_spin fresh = {};

	if (sk_addr)
		mbpf_spin.update(&sk_addr, &fresh);
}

static __always_inline void spin_forget(__u64 sk_addr)
{
	if (sk_addr)
		mbpf_spin.delete(&sk_addr);
}

/* 1 if the reader of the socket with this mbpf_spin entry spins on non-blocking
 * recv(), judged just before a splice into it. An epoll or poll reader
 * makes at most one empty read per wake-up and a blocking one none; a
 * spinner makes many between two splices. Only several such splices in a
 * row count, so one slow answer (many empty reads while the peer thought)
 * is not mistaken for spinning. The count is read and zeroed without an
 * atomic exchange (5.12+): a read counted in between is lost, which only
 * delays the verdict. */
static __always_inline int spin_reader(struct mbpf_spin *v)
{
	__u32 empty;

	empty = v->empty_reads;
	v->empty_reads = 0;
	if (empty < MBPF_SPIN_EMPTY_MIN) {
		v->spin_run = 0;
		return 0;
	}
	v->spin_run += 1;
	return v->spin_run >= MBPF_SPIN_RUN_MAX;
}

/* Why the reader of the socket at this address is unfit for splicing,
 * judged just before a splice into it: MBPF_UNFIT_BLOCKING if one of its
 * recv() calls was allowed to block (bpf/recv_trace.c notes it as the call
 * returns): its next wake-up without data would give it EAGAIN
 * (sock_reads_block), so the pair goes to TCP and the socket leaves the
 * sockhash (sockops, try_evict). This catches what the listener check
 * cannot see: a blocking socket accepted from a non-blocking listener that
 * only reads. Its first blocking read, before the first splice, is not
 * seen in time. MBPF_UNFIT_SPINNING if it spins on non-blocking recv()
 * (spin_reader); 0 if fit. */
static __always_inline int reader_unfit(__u64 sk_addr)
{
	struct mbpf_spin *v = mbpf_spin.lookup(&sk_addr);

	if (!v)
		return 0;
	if (v->reads_block)
		return MBPF_UNFIT_BLOCKING;
	return spin_reader(v) ? MBPF_UNFIT_SPINNING : 0;
}
#else
/* Without the recv tracepoint (before 6.3) spinning and blocking readers
 * are not seen. */
static __always_inline void spin_track(__u64 sk_addr) {}
static __always_inline void spin_forget(__u64 sk_addr) {}
static __always_inline int reader_unfit(__u64 sk_addr) { return 0; }
#endif

static __always_inline int redir_in_cidrs(const __u8 *addr)
{
	struct mbpf_cidr_key k = { .prefixlen = 128 };

	__builtin_memcpy(k.addr, addr, MBPF_ADDR_LEN);
	return mbpf_redir_cidr.lookup(&k) != NULL;
}

#endif /* MBPF_REDIR_H */
