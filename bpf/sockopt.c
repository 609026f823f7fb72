/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket options: notice TCP_NODELAY set after a connection is established,
 * which sockops cannot see. A sender without Nagle gains from splicing even
 * with small writes, so redirection keeps such sockets spliced
 * (mbpf_setsockopt). Answer a proxy's SO_ORIGINAL_DST for a connection
 * sidecar capture steered to it (mbpf_getsockopt).
 */
#include <uapi/linux/bpf.h>

#include "lib/common.h"
#include "lib/compat.h"

#ifdef MBPF_REDIRECT
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
	addr_fill(key.local_ip, family, sk->src_ip4,
		   MBPF_CTX_READ32(sk->src_ip6[0]), MBPF_CTX_READ32(sk->src_ip6[1]),
		   MBPF_CTX_READ32(sk->src_ip6[2]), MBPF_CTX_READ32(sk->src_ip6[3]));
	addr_fill(key.remote_ip, family, sk->dst_ip4,
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
#endif /* MBPF_REDIRECT */

#ifdef MBPF_CAPTURE
#include "lib/capture.h"

#define MBPF_SOL_IP 0
#define MBPF_SOL_IPV6 41
#define MBPF_SO_ORIGINAL_DST 80  /* and IP6T_SO_ORIGINAL_DST */

/* struct sockaddr_in / sockaddr_in6, as getsockopt hands them out */
struct mbpf_sockaddr4 {
	__u16 family;
	__u16 port;     /* network order */
	__u32 addr;     /* network order */
	__u8  zero[8];
};
struct mbpf_sockaddr6 {
	__u16 family;
	__u16 port;     /* network order */
	__u32 flowinfo;
	__u8  addr[MBPF_ADDR_LEN];
	__u32 scope_id;
};

/* attaches to cgroup/getsockopt where sidecar capture is on. Without
 * conntrack the kernel has no answer (ENOPROTOOPT or ENOENT); a captured
 * connection gets its original destination instead. Anything else keeps
 * the kernel's answer. */
int mbpf_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mbpf_cap_orig orig;
	struct mbpf_cap_orig *o;
	__u8 *optval = ctx->optval;
	__u8 *optval_end = ctx->optval_end;
	__u32 level = MBPF_CTX_READ32(ctx->level);

	if (MBPF_CTX_READ32(ctx->optname) != MBPF_SO_ORIGINAL_DST || !sk ||
	    (level != MBPF_SOL_IP && level != MBPF_SOL_IPV6))
		return 1;
	/* The accepted socket's remote end is the app, its local end the
	 * proxy's port: the key sockops filed the connection under. */
	o = cap_pair_of_sk(sk);
	if (!o) {
		cap_count(MBPF_CAP_ORIG_MISS);
		return 1;
	}
	orig = *o;
	if (level == MBPF_SOL_IP) {
		struct mbpf_sockaddr4 *sa = (void *)optval;

		if (optval + sizeof(*sa) > optval_end || !addr_is_v4mapped(orig.addr))
			return 1;
		sa->family = 2;
		sa->port = orig.port;
		sa->addr = ((__u32 *)orig.addr)[3];
		__builtin_memset(sa->zero, 0, sizeof(sa->zero));
		MBPF_CTX_WRITE32(ctx->optlen, sizeof(*sa));
	} else {
		struct mbpf_sockaddr6 *sa = (void *)optval;

		if (optval + sizeof(*sa) > optval_end)
			return 1;
		sa->family = 10;
		sa->port = orig.port;
		sa->flowinfo = 0;
		__builtin_memcpy(sa->addr, orig.addr, MBPF_ADDR_LEN);
		sa->scope_id = 0;
		MBPF_CTX_WRITE32(ctx->optlen, sizeof(*sa));
	}
	/* retval 0 and return 1: the call succeeds with this answer (0 is EPERM) */
	MBPF_CTX_WRITE32(ctx->retval, 0);
	cap_count(MBPF_CAP_ORIG_HIT);
	return 1;
}
#endif /* MBPF_CAPTURE */
