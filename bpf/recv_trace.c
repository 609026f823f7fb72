/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Tracepoints of the socket read path: count, for each spliced socket,
 * the reads that found nothing (redirection hands a pair whose reader
 * spins on non-blocking recv() back to TCP; see spin_reader).
 */
#include <uapi/linux/bpf.h>

#include "lib/common.h"
#include "lib/compat.h"
#include "lib/redir_maps.h"

#define MBPF_EAGAIN 11

/* attaches to the raw tracepoint sock:sock_recv_length (6.3+), which every
 * recvmsg() of every socket passes after the protocol's recvmsg returns;
 * its arguments are (struct sock *sk, int ret, int flags). A read that
 * returns data costs one comparison; an empty one, one lookup. */
int mbpf_recv_len(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 sk_addr = ctx->args[0];
	struct mbpf_spin *v;

	if ((int)ctx->args[1] != -MBPF_EAGAIN)
		return 0;
	v = mbpf_spin.lookup(&sk_addr);
	if (v)
		__sync_fetch_and_add(&v->empty_reads, 1);
	return 0;
}
