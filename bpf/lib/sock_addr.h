/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Reading and writing the destination of a bpf_sock_addr context as the
 * 16-byte, IPv4-mapped form the maps use.
 */
#ifndef MBPF_SOCK_ADDR_H
#define MBPF_SOCK_ADDR_H

#include "common.h"
#include "compat.h"
#include "addr.h"

/* The address and port a socket hook sees, in map form. */
struct mbpf_l4addr {
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;                 /* network order */
};

static __always_inline void ctx_get_dst4(struct bpf_sock_addr *ctx,
					 struct mbpf_l4addr *out)
{
	__u32 *w = (__u32 *)out->addr;

	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0x0000ffff);
	w[3] = MBPF_CTX_READ32(ctx->user_ip4);
	/* user_port keeps the network-order port in its low 16 bits */
	out->port = (__u16)MBPF_CTX_READ32(ctx->user_port);
}

static __always_inline void ctx_get_dst6(struct bpf_sock_addr *ctx,
					 struct mbpf_l4addr *out)
{
	__u32 *w = (__u32 *)out->addr;

	w[0] = MBPF_CTX_READ32(ctx->user_ip6[0]);
	w[1] = MBPF_CTX_READ32(ctx->user_ip6[1]);
	w[2] = MBPF_CTX_READ32(ctx->user_ip6[2]);
	w[3] = MBPF_CTX_READ32(ctx->user_ip6[3]);
	out->port = (__u16)MBPF_CTX_READ32(ctx->user_port);
}

static __always_inline void ctx_get_dst(struct bpf_sock_addr *ctx,
					struct mbpf_l4addr *out, int v6)
{
	if (v6)
		ctx_get_dst6(ctx, out);
	else
		ctx_get_dst4(ctx, out);
}

/* Returns 0, or -1 when an IPv6 address cannot go into an IPv4 socket. */
static __always_inline int ctx_set_dst4(struct bpf_sock_addr *ctx,
					const __u8 *addr, __u16 port)
{
	const __u32 *w = (const __u32 *)addr;

	if (!addr_is_v4mapped(addr))
		return -1;
	MBPF_CTX_WRITE32(ctx->user_ip4, w[3]);
	MBPF_CTX_WRITE32(ctx->user_port, (__u32)port);
	return 0;
}

static __always_inline void ctx_set_dst6(struct bpf_sock_addr *ctx,
					 const __u8 *addr, __u16 port)
{
	const __u32 *w = (const __u32 *)addr;

	MBPF_CTX_WRITE32(ctx->user_ip6[0], w[0]);
	MBPF_CTX_WRITE32(ctx->user_ip6[1], w[1]);
	MBPF_CTX_WRITE32(ctx->user_ip6[2], w[2]);
	MBPF_CTX_WRITE32(ctx->user_ip6[3], w[3]);
	MBPF_CTX_WRITE32(ctx->user_port, (__u32)port);
}

#endif /* MBPF_SOCK_ADDR_H */
