/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket operations: fill the sockhash with established TCP sockets whose
 * peer is on this node, and take them out again once their pair has gone
 * back to the TCP stack and nothing spliced waits in their queue
 * (mbpf_sockops, with redirection); file a captured connection under the
 * tuple its proxy sees (mbpf_cap_sockops, with sidecar capture). Two
 * programs, each attached only where its feature is on.
 */
#include <uapi/linux/bpf.h>

#include "lib/common.h"
#include "lib/compat.h"

#ifdef MBPF_CAPTURE
#include "lib/capture.h"

/* attaches to cgroup/sock_ops where sidecar capture is on */
int mbpf_cap_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		cap_file_pair(skops);
	return 1;
}
#endif

#ifdef MBPF_REDIRECT
#include "lib/redir_maps.h"
#include "lib/redir.h"

/* tcp_sock options, for bpf_getsockopt */
#define MBPF_SOL_TCP 6
#define MBPF_TCP_NODELAY 1
/* BPF_TCP_* states */
#define MBPF_TCP_FIN_WAIT1 4
#define MBPF_TCP_CLOSE 7
#define MBPF_TCP_CLOSE_WAIT 8
#define MBPF_TCP_LISTEN 10

/* Callbacks a socket in the sockhash asks for: state changes (to forget
 * it), and every ACK (RTT) and incoming header, which is where eviction
 * is tried once the pair has switched to the TCP stack. */
#ifdef MBPF_SPIN
/* ...and, where blocking readers are seen (MBPF_SPIN), every header it
 * sends: a blocking reader that took TCP's data reads it in tcp_recvmsg,
 * without holding its psock, and the ACK it sends from there is the moment
 * its socket can leave the sockhash before its next read sleeps (the
 * HDR_OPT_LEN callback; nothing is written into the header). */
#define MBPF_SOCKOPS_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG | \
			    BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG)
#else
#define MBPF_SOCKOPS_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG | \
			    BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)
#endif

/* The kernel address of the ctx's socket (a pointer the verifier types as
 * a socket; read as a number, probe reads can follow it). */
static __always_inline __u64 sock_addr(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	__u64 addr = 0;

	if (sk)
		bpf_probe_read_kernel(&addr, sizeof(addr), &sk);
	return addr;
}

#if defined(MBPF_SPIN) && defined(MBPF_OFF_SOCKET_WAIT_HEAD)
/* 1 if a task waits on this socket (sk->sk_socket->wq.wait is not empty):
 * a reader asleep in recvmsg, which holds a psock reference while it waits
 * (tcp_bpf_recvmsg). */
static __always_inline int sock_has_waiter(__u64 sk_addr)
{
	__u64 sock = 0, next = 0, head;

	if (bpf_probe_read_kernel(&sock, sizeof(sock), (void *)(sk_addr + MBPF_OFF_SK_SOCKET)) || !sock)
		return 0;
	head = sock + MBPF_OFF_SOCKET_WAIT_HEAD;
	if (bpf_probe_read_kernel(&next, sizeof(next), (void *)head))
		return 0;
	return next != head;
}
#else
static __always_inline int sock_has_waiter(__u64 sk_addr) { return 0; }
#endif

#if defined(MBPF_SPIN) && defined(MBPF_OFF_SOCKET_WAIT_HEAD)
/* 1 if no splice from the (not evicted) peer socket at this address can be
 * on its way: its psock has no reference but the sockhash's. A splice is
 * decided and carried out inside one tcp_bpf_sendmsg() of the peer, which
 * holds the peer's psock from start to end; a sendmsg that starts later
 * finds the pair passed and splices nothing. Without this, eviction waits
 * the grace time after the peer's last splice: a blocking reader that
 * sleeps in recvmsg meanwhile can be woken without data (EAGAIN). Where
 * blocking readers are seen only (MBPF_SPIN), as sock_has_waiter. */
static __always_inline int peer_quiet(__u64 peer_addr)
{
	__u64 psock = 0;
	__u32 refcnt = 0;

	if (!peer_addr ||
	    bpf_probe_read_kernel(&psock, sizeof(psock), (void *)(peer_addr + MBPF_OFF_SK_USER_DATA)))
		return 0;
	psock &= ~7ULL;
	if (!psock ||
	    bpf_probe_read_kernel(&refcnt, sizeof(refcnt), (void *)(psock + MBPF_OFF_PSOCK_REFCNT)))
		return 0;
	return refcnt == 1;
}
#else
static __always_inline int peer_quiet(__u64 peer_addr) { return 0; }
#endif

/* True when this socket's psock is idle: nothing spliced by the peer waits
 * in its ingress queue, and no one but the sockhash holds it. A splice on
 * its way holds a reference while it queues; whatever is queued when the
 * psock is finally dropped is freed, so eviction must find refcnt == 1.
 * One more reference is allowed when a reader waits on the socket (where
 * blocking readers are seen, MBPF_SPIN): a blocking reader sleeps in
 * tcp_bpf_recvmsg holding it, often whenever a segment arrives, and would
 * keep its socket in the sockhash for good. Its reference is dropped when
 * it wakes, and that drops the psock. The extra reference is no splice
 * of the peer's: try_evict gets here only past the grace time after the
 * peer's last splice, or with the peer in no sendmsg (peer_quiet), and a
 * splice queued after all would wake the reader, which reads it first.
 * The psock is reached through sk->sk_user_data (low bits are
 * flags). The offsets come from the running kernel's BTF, not from the
 * headers bcc compiles with. */
static __always_inline int psock_idle(struct bpf_sock_ops *skops)
{
	__u64 sk_addr = sock_addr(skops), psock = 0, next = 0, head;
	__u32 refcnt = 0;

	if (!sk_addr)
		return 0;
	if (bpf_probe_read_kernel(&psock, sizeof(psock), (void *)(sk_addr + MBPF_OFF_SK_USER_DATA)))
		return 0;
	psock &= ~7ULL;  /* SK_USER_DATA_NOCOPY | _BPF | _PSOCK */
	if (!psock)
		return 1;  /* no psock at all: nothing can be queued */
	head = psock + MBPF_OFF_PSOCK_INGRESS_MSG;
	if (bpf_probe_read_kernel(&next, sizeof(next), (void *)head))
		return 0;
	if (bpf_probe_read_kernel(&refcnt, sizeof(refcnt), (void *)(psock + MBPF_OFF_PSOCK_REFCNT)))
		return 0;
	if (next != head)
		return 0;
	return refcnt == 1 || (refcnt == 2 && sock_has_waiter(sk_addr));
}

/* The listener map's key for a listener or a socket it accepted. */
static __always_inline int listen_key(struct bpf_sock_ops *skops, __u64 sk_addr,
				      struct mbpf_listen_key *key)
{
	key->netns = sock_netns(sk_addr);
	key->port = (__u16)skops->local_port;
	return key->netns != 0;
}

/* listen(): remember the listener, to judge the sockets it will accept
 * (listener_blocks), and hear when it closes. Its children inherit the
 * state callback; those that do not join drop it (drop_listener_flag). */
static __always_inline void on_listen(struct bpf_sock_ops *skops)
{
	struct mbpf_listen_key key = {};
	__u64 sk_addr = sock_addr(skops);

	if (!listen_key(skops, sk_addr, &key))
		return;
	if (mbpf_listeners.update(&key, &sk_addr))
		return;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* A listener closed. Another listener on the same port (SO_REUSEPORT) may
 * have taken the entry since: only our own is deleted. */
static __always_inline void on_listener_close(struct bpf_sock_ops *skops)
{
	struct mbpf_listen_key key = {};
	__u64 sk_addr = sock_addr(skops);
	__u64 *listener;

	if (!listen_key(skops, sk_addr, &key))
		return;
	listener = mbpf_listeners.lookup(&key);
	if (listener && *listener == sk_addr)
		mbpf_listeners.delete(&key);
}

/* 1 if an accepted socket will read in blocking mode, as far as can be told
 * when it is established: it has no file before accept(), so its
 * listener's mode stands for it. A blocking listener is a blocking server
 * (a thread per connection: socketserver, classic C servers, ServerSocket);
 * event loops listen non-blocking (nginx, redis, Go, libuv, asyncio). Wrong
 * both ways now and then (see README): a blocking acceptor that hands its
 * sockets to an event loop costs the pair its splicing; a non-blocking
 * listener whose sockets block is not caught here (sk_msg catches them
 * when they send). A listener opened before the sockops program was
 * attached is unknown: its sockets join, as before. */
static __always_inline int listener_blocks(struct bpf_sock_ops *skops, __u64 sk_addr)
{
	struct mbpf_listen_key key = {};
	__u64 *listener;
	__u64 listener_addr;

	if (!listen_key(skops, sk_addr, &key))
		return 0;
	listener = mbpf_listeners.lookup(&key);
	if (!listener)
		return 0;
	listener_addr = *listener;
	return sock_reads_block(listener_addr);
}

/* Returns 1 if the socket joined the sockhash. */
static __always_inline int on_established(struct bpf_sock_ops *skops, int active)
{
	struct mbpf_redir_cfg *cfg = redir_cfg();
	struct mbpf_sockstate st = {};
	struct mbpf_sock_key key = {};
	struct mbpf_sock_key peer = {};
	__u64 sk_addr;
	int nodelay = 0;
	int err;

	if (!cfg || !cfg->enabled)
		return 0;
	if (skops->family != 2 && skops->family != 10)
		return 0;
	redir_key_from_ctx(skops, &key);
	if (key.scope == MBPF_SCOPE_AMBIGUOUS)
		return 0;
	if (cfg->require_cidr && (!redir_in_cidrs(key.local_ip) || !redir_in_cidrs(key.remote_ip)))
		return 0;
	/* A connect() in blocking mode: its reads would block too (see
	 * sock_reads_block). The accepting side has no file yet: its
	 * listener's mode stands for it, and sk_msg checks it when it sends. */
	sk_addr = sock_addr(skops);
	if (active && sock_reads_block(sk_addr))
		return 0;
	/* The passive side joins only if the active side did: the peer is
	 * then a socket on this node, in a workload that takes part. Without
	 * it, the peer's first send finds no peer and takes TCP. */
	if (!active) {
		redir_peer_key(&key, &peer);
		if (!mbpf_sockstate.lookup(&peer))
			return 0;
		if (listener_blocks(skops, sk_addr))
			return 0;
	}
	if (bpf_getsockopt(skops, MBPF_SOL_TCP, MBPF_TCP_NODELAY, &nodelay, sizeof(nodelay)) == 0 && nodelay)
		st.nodelay = 1;
	st.wide_mss = skops->mss_cache >= cfg->nagle_mss_min;
	st.sk_addr = sk_addr;
	if (mbpf_sockstate.update(&key, &st))
		return 0;
	/* (a statement of its own: bcc's rewrite of this call breaks inside an if) */
	err = mbpf_sockhash.sock_hash_update(skops, &key, BPF_NOEXIST);
	if (err) {
		mbpf_sockstate.delete(&key);
		return 0;
	}
	redir_count(MBPF_CNT_INSERTED, 1);
	spin_track(sk_addr);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | MBPF_SOCKOPS_FLAGS);
	return 1;
}

/* An accepted socket inherits its listener's callback flags (on_listen);
 * one that stays out of the sockhash needs no state callbacks. */
static __always_inline void drop_listener_flag(struct bpf_sock_ops *skops)
{
	__u32 flags = skops->bpf_sock_ops_cb_flags;

	if (flags & BPF_SOCK_OPS_STATE_CB_FLAG)
		bpf_sock_ops_cb_flags_set(skops, flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* Leaves the sockhash once the pair passes to TCP and our queue is empty. */
static __always_inline void try_evict(struct bpf_sock_ops *skops)
{
	struct mbpf_redir_cfg *cfg = redir_cfg();
	struct mbpf_sockstate *st, *peer_st;
	struct mbpf_sock_key key = {};
	struct mbpf_sock_key peer = {};

	redir_key_from_ctx(skops, &key);
	st = mbpf_sockstate.lookup(&key);
	if (!st || st->evicted || st->mode != MBPF_MODE_PASS || !cfg)
		return;
	redir_peer_key(&key, &peer);
	peer_st = mbpf_sockstate.lookup(&peer);
	if (peer_st && !peer_st->evicted) {
		/* The peer may still splice into us unless it passes too... */
		if (peer_st->mode != MBPF_MODE_PASS)
			return;
		/* ...and a splice it decided just before may still be on its
		 * way, unless the peer is in no sendmsg at all (peer_quiet). */
		if (bpf_ktime_get_ns() - peer_st->last_redirect_ns < cfg->evict_grace_ns &&
		    !peer_quiet(peer_st->sk_addr))
			return;
	}
	if (!psock_idle(skops))
		return;
	if (mbpf_sockhash.delete(&key) == 0) {
		st->evicted = 1;
		redir_count(MBPF_CNT_EVICTED, 1);
		spin_forget(sock_addr(skops));
	}
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* This socket sent or received a FIN. A blocking read on a socket in the
 * sockhash returns EAGAIN after a wakeup that brings no data (a kernel bug
 * in tcp_bpf_recvmsg), and the state change that follows a FIN is such a
 * wakeup; so the pair goes back to TCP and this socket leaves the sockhash
 * now if nothing spliced waits in it ("send, shutdown, read the reply"). */
static __always_inline void on_fin(struct bpf_sock_ops *skops)
{
	struct mbpf_sockstate *st, *peer_st;
	struct mbpf_sock_key key = {};
	struct mbpf_sock_key peer = {};

	redir_key_from_ctx(skops, &key);
	st = mbpf_sockstate.lookup(&key);
	if (!st || st->evicted)
		return;
	redir_peer_key(&key, &peer);
	peer_st = mbpf_sockstate.lookup(&peer);
	if (st->mode != MBPF_MODE_PASS || (peer_st && peer_st->mode != MBPF_MODE_PASS))
		redir_pass_pair(st, peer_st);
	try_evict(skops);
}

/* attaches to cgroup/sock_ops */
int mbpf_sockops(struct bpf_sock_ops *skops)
{
	struct mbpf_sock_key key = {};

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_established(skops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (!on_established(skops, 0))
			drop_listener_flag(skops);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		on_listen(skops);
		break;
	case BPF_SOCK_OPS_RTT_CB:
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		try_evict(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[0] is the old state, args[1] the new one; the sockhash
		 * drops closed sockets by itself, the state maps are ours to
		 * clean. A listener only ever leaves LISTEN for CLOSE. */
		if (skops->args[0] == MBPF_TCP_LISTEN) {
			on_listener_close(skops);
		} else if (skops->args[1] == MBPF_TCP_CLOSE) {
			redir_key_from_ctx(skops, &key);
			mbpf_sockstate.delete(&key);
			spin_forget(sock_addr(skops));
		} else if (skops->args[1] == MBPF_TCP_FIN_WAIT1 ||
			   skops->args[1] == MBPF_TCP_CLOSE_WAIT) {
			on_fin(skops);
		}
		break;
	}
	return 1;
}
#endif /* MBPF_REDIRECT */
