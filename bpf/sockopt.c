/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket options: notice TCP_NODELAY set after a connection is established,
 * which sockops cannot see. A sender without Nagle gains from splicing even
 * with small writes, so redirection keeps such sockets spliced.
 */
#include <uapi/linux/bpf.h>

#include "lib/common.h"
#include "lib/compat.h"
#include "lib/redir_maps.h"
#include "lib/redir.h"

/* attaches to cgroup/setsockopt */
int mbpf_setsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mbpf_sockstate *st;
	struct mbpf_sock_key key = {};
	__u8 *optval = ctx->optval;
	__u8 *optval_end = ctx->optval_end;
	__u32 family;

	if (MBPF_CTX_READ32(ctx->level) != 6 /* SOL_TCP */ ||
	    MBPF_CTX_READ32(ctx->optname) != 1 /* TCP_NODELAY */ || !sk)
		return 1;
	if (optval + sizeof(int) > optval_end)
		return 1;
	family = sk->family;
	if (family != 2 && family != 10)
		return 1;
	redir_addr(key.local_ip, family, sk->src_ip4,
		   MBPF_CTX_READ32(sk->src_ip6[0]), MBPF_CTX_READ32(sk->src_ip6[1]),
		   MBPF_CTX_READ32(sk->src_ip6[2]), MBPF_CTX_READ32(sk->src_ip6[3]));
	redir_addr(key.remote_ip, family, sk->dst_ip4,
		   MBPF_CTX_READ32(sk->dst_ip6[0]), MBPF_CTX_READ32(sk->dst_ip6[1]),
		   MBPF_CTX_READ32(sk->dst_ip6[2]), MBPF_CTX_READ32(sk->dst_ip6[3]));
	key.local_port = (__u16)sk->src_port;
	key.remote_port = bpf_ntohs((__u16)sk->dst_port);
	redir_key_finish(ctx, &key);
	st = mbpf_sockstate.lookup(&key);
	if (st)
		st->nodelay = *(int *)optval ? 1 : 0;
	return 1;  /* the kernel applies the option as usual */
}
