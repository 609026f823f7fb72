/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The sk_msg verdict: splice a send into the peer socket's receive queue
 * when both ends are in the sockhash, or leave it to TCP.
 */
#include <uapi/linux/bpf.h>

#include "lib/common.h"
#include "lib/compat.h"
#include "lib/redir_maps.h"
#include "lib/redir.h"

static __always_inline int pass(__u32 size)
{
	redir_count(MBPF_CNT_PASS_MSGS, 1);
	redir_count(MBPF_CNT_PASS_BYTES, size);
	return SK_PASS;
}

/* attaches to the mbpf_sockhash map as its sk_msg verdict program */
int mbpf_sk_msg(struct sk_msg_md *msg)
{
	struct mbpf_redir_cfg *cfg = redir_cfg();
	struct mbpf_sockstate *st, *peer_st;
	struct mbpf_sock_key key = {};
	struct mbpf_sock_key peer = {};
	__u32 size = msg->size;
	int verdict, unfit;

	redir_key_from_ctx(msg, &key);
	st = mbpf_sockstate.lookup(&key);
	if (!st)
		return pass(size);
	if (st->mode == MBPF_MODE_PASS)
		return pass(size);
	redir_peer_key(&key, &peer);
	peer_st = mbpf_sockstate.lookup(&peer);

	/* Off, or no peer on this node (any more): this pair takes TCP. */
	if (!cfg || !cfg->enabled || !peer_st || peer_st->evicted ||
	    peer_st->mode == MBPF_MODE_PASS) {
		redir_pass_pair(st, peer_st);
		return pass(size);
	}
	if (st->mode == MBPF_MODE_UNDECIDED) {
		/* Only the first send of a direction may choose to splice:
		 * nothing has gone over TCP yet that splicing could overtake. */
		st->mode = MBPF_MODE_REDIRECT;
		if (peer_st->mode == MBPF_MODE_PASS) {
			redir_pass_pair(st, peer_st);
			return pass(size);
		}
	}

	/* A blocking socket must not stay in the sockhash (see
	 * sock_reads_block). The sender is checked on every send, in its own
	 * syscall, so its mode is current: the accepting side gets its file
	 * late, and fcntl() can make a socket blocking at any time. The peer is
	 * not checked here: a server that accept()s and then sets O_NONBLOCK
	 * would look blocking to a client that writes first, and it would not
	 * help a peer already blocked in recvmsg (it holds its psock, so it
	 * cannot leave the sockhash while it waits). sockops keeps accepted
	 * sockets out by their listener's mode instead (listener_blocks). */
	if (sock_reads_block(st->sk_addr)) {
		redir_pass_pair(st, peer_st);
		return pass(size);
	}

	/* Small writes in a row with no reply: where TCP batches them into
	 * large segments it wins, because splicing pays per write. With
	 * Nagle that happens on a loopback-sized MSS (64 KB segments); at an
	 * Ethernet MSS (veth) a splice per write is cheaper. With TCP_NODELAY
	 * TCP still coalesces 128 B - 4 KB writes of a one-way stream while the
	 * receiver is busy, but sends tinier ones one by one, where splicing
	 * wins. Measured in bench/run-redirect. */
	if (size < cfg->small_write &&
	    (st->nodelay ? size >= cfg->nodelay_small_min : st->wide_mss)) {
		st->small_run += 1;
		if (st->small_run > cfg->small_run_max) {
			redir_pass_pair(st, peer_st);
			return pass(size);
		}
	} else {
		st->small_run = 0;
	}
	peer_st->small_run = 0;  /* the peer got a reply */

	/* A reader spinning on recv() holds its socket's lock most of the
	 * time; a splice must take it, so the sender sleeps: TCP is faster.
	 * A reader blocking in recv() would get EAGAIN from a wake-up without
	 * data: its pair goes to TCP, and its socket leaves the sockhash
	 * (try_evict) so that its later reads are TCP's. */
	unfit = reader_unfit(peer_st->sk_addr);
	if (unfit) {
		redir_pass_pair(st, peer_st);
		if (unfit == MBPF_UNFIT_SPINNING)
			redir_count(MBPF_CNT_SPINNERS, 1);
		return pass(size);
	}

	verdict = mbpf_sockhash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict != SK_PASS) {
		/* The peer left the sockhash; without a target the helper
		 * would drop the data. */
		redir_pass_pair(st, peer_st);
		return pass(size);
	}
	st->last_redirect_ns = bpf_ktime_get_ns();
	redir_count(MBPF_CNT_REDIR_MSGS, 1);
	redir_count(MBPF_CNT_REDIR_BYTES, size);
	return SK_PASS;
}
