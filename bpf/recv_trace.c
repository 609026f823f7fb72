/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Tracepoints of the socket read path: for each spliced socket, count the
 * reads that found nothing and note a read that was allowed to block
 * (redirection hands a pair whose reader spins on non-blocking recv(), or
 * blocks in recv(), back to TCP; see reader_unfit).
 */
#include <uapi/linux/bpf.h>

#include "lib/common.h"
#include "lib/compat.h"
#include "lib/redir_maps.h"

#define MBPF_EAGAIN 11
#define MBPF_MSG_DONTWAIT 0x40
#define MBPF_MSG_ERRQUEUE 0x2000

/* attaches to the raw tracepoint sock:sock_recv_length (6.3+), which every
 * recvmsg() of every socket passes after the protocol's recvmsg returns;
 * its arguments are (struct sock *sk, int ret, int flags), and flags carry
 * MSG_DONTWAIT when the file is O_NONBLOCK (sock_read_iter, recvfrom,
 * recvmsg add it). A non-blocking read that returns data costs two
 * comparisons; an empty one, or any blocking read, one lookup. */
int mbpf_recv_len(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 sk_addr = ctx->args[0];
	int flags = (int)ctx->args[2];
	struct mbpf_spin *v;

	if (flags & MBPF_MSG_DONTWAIT) {
		if ((int)ctx->args[1] != -MBPF_EAGAIN)
			return 0;
		v = mbpf_spin.lookup(&sk_addr);
		if (v)
			__sync_fetch_and_add(&v->empty_reads, 1);
		return 0;
	}
	if (flags & MBPF_MSG_ERRQUEUE)
		return 0;
	/* A blocking read: its next wake-up without data would give EAGAIN
	 * (see sock_reads_block). Noted once; sk_msg reads it before each
	 * splice into this socket. */
	v = mbpf_spin.lookup(&sk_addr);
	if (v && !v->reads_block)
		v->reads_block = 1;
	return 0;
}
