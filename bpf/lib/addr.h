/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * 16-byte addresses as every map keys them (IPv4 as ::ffff:a.b.c.d,
 * network order): filled from a context's words, compared, classified.
 */
#ifndef MBPF_ADDR_H
#define MBPF_ADDR_H

#include "common.h"
#include "compat.h"

static __always_inline int addr_is_v4mapped(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_equal(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* One address from a family and a context's ip4 / ip6 words. */
static __always_inline void addr_fill(__u8 *out, __u32 family, __u32 ip4,
				      __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	__u32 *w = (__u32 *)out;

	if (family == 2 /* AF_INET */) {
		w[0] = 0;
		w[1] = 0;
		w[2] = bpf_htonl(0x0000ffff);
		w[3] = ip4;
	} else {
		w[0] = w0;
		w[1] = w1;
		w[2] = w2;
		w[3] = w3;
	}
}

static __always_inline int addr_is_loopback(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	if (w[0] || w[1])
		return 0;
	if (w[2] == bpf_htonl(0x0000ffff))
		return a[12] == 127;                       /* 127.0.0.0/8 */
	return w[2] == 0 && w[3] == bpf_htonl(1);          /* ::1 */
}

/* 127.0.0.1 in map form (::ffff:127.0.0.1) when v4, else ::1. */
static __always_inline void addr_set_loopback(__u8 *a, int v4)
{
	__u32 *w = (__u32 *)a;

	w[0] = 0;
	w[1] = 0;
	w[2] = v4 ? bpf_htonl(0x0000ffff) : 0;
	w[3] = v4 ? bpf_htonl(0x7f000001) : bpf_htonl(1);
}

#endif /* MBPF_ADDR_H */
