/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Sidecar capture decisions (issue 11), for the connect hooks, sockops and
 * getsockopt. A meshed pod's app connects are steered to its proxy's
 * outbound port on the pod's own address (unique on the node, so the tuple
 * the proxy sees is too), DNS to its DNS port on loopback (where the Istio
 * agent listens); connects from this node to a meshed pod's ports
 * are steered to its inbound port. The original destination is kept by
 * socket cookie until the connection is established, then by the tuple the
 * proxy's accepted socket sees, where getsockopt(SO_ORIGINAL_DST) and
 * getsockname() find it.
 *
 * Order in connect (bpf/sock_lb.c): outbound capture, else socket-LB, then
 * inbound capture on the final destination. So the proxy's own connect to
 * a Service goes to a backend, and the app's original destination stays
 * the Service address, which the proxy needs to route by. An unconnected
 * UDP send (sendmsg) is captured only for DNS, by the same decision, before
 * socket-LB; sock_lb.c keeps its original server for the reply.
 */
#ifndef MBPF_CAPTURE_H
#define MBPF_CAPTURE_H

#include "common.h"
#include "compat.h"
#include "addr.h"
#include "capture_maps.h"
#include "sock_addr.h"

#define MBPF_IPPROTO_TCP 6
#define MBPF_IPPROTO_UDP 17
#define MBPF_DNS_PORT 53

/* Who calls connect(): its meshed pod (cgroup id, 0 if none) and uid. */
struct cap_caller {
	__u64 pod_cg;
	__u32 uid;
	__u32 pad;
};

static __always_inline void cap_count(__u32 idx)
{
	__u64 *v = mbpf_cap_stats.lookup(&idx);

	if (v)
		*v += 1;
}

/* 0 when no pod is meshed: the one lookup capture costs then. */
static __always_inline int cap_enabled(void)
{
	__u32 zero = 0;
	struct mbpf_cap_cfg *cfg = mbpf_cap_cfg.lookup(&zero);

	return cfg && cfg->pods;
}

/* The caller's meshed pod: the first of its cgroup's ancestors (a
 * container's cgroup is a child of the pod's) found in mbpf_cap_pod. */
static __always_inline __u64 cap_caller_pod(void)
{
	__u64 id;
	int level;

#pragma unroll
	for (level = 1; level <= MBPF_CAP_MAX_LEVEL; level++) {
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id)
			return 0;  /* deeper than the caller's own cgroup */
		if (mbpf_cap_pod.lookup(&id))
			return id;
	}
	return 0;
}

static __always_inline void cap_caller_init(struct cap_caller *c)
{
	c->pod_cg = cap_caller_pod();
	c->uid = (__u32)bpf_get_current_uid_gid();
}

static __always_inline int cap_addr_is_zero(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;

	return !(w[0] | w[1] | w[2] | w[3]);
}

/* A port's verdict for a pod and direction, or -1 if it has none. */
static __always_inline int cap_port_verdict(__u32 pod_id, __u16 port, __u8 dir)
{
	struct mbpf_cap_port_key key = {};
	struct mbpf_cap_verdict *v;

	key.pod_id = pod_id;
	key.port = port;
	key.dir = dir;
	v = mbpf_cap_port.lookup(&key);
	return v ? v->verdict : -1;
}

/* Longest matching prefix decides; no match: the pod's default. */
static __always_inline int cap_cidr_verdict(__u32 pod_id, __u8 flags, const __u8 *addr)
{
	struct mbpf_cap_cidr_key key = {};
	struct mbpf_cap_verdict *v;

	key.prefixlen = 32 + 8 * MBPF_ADDR_LEN;
	key.pod_id = bpf_htonl(pod_id);
	__builtin_memcpy(key.addr, addr, MBPF_ADDR_LEN);
	v = mbpf_cap_cidr.lookup(&key);
	if (v)
		return v->verdict;
	return (flags & MBPF_CAP_F_OUT_ALL) ? MBPF_CAP_INCLUDE : MBPF_CAP_EXCLUDE;
}

static __always_inline void cap_remember(struct bpf_sock_addr *ctx,
					 const struct mbpf_l4addr *dst, __u8 dir)
{
	struct mbpf_cap_orig orig = {};
	__u64 cookie = mbpf_get_socket_cookie(ctx);

	__builtin_memcpy(orig.addr, dst->addr, MBPF_ADDR_LEN);
	orig.port = dst->port;
	orig.dir = dir;
	mbpf_cap_orig.update(&cookie, &orig);
}

/* Steers a meshed pod's app connect, or its unconnected UDP send (then only
 * DNS), to its proxy: the pod's own address on the outbound port, or DNS
 * to loopback on the DNS port. MBPF_CAP_EV_OUTBOUND or MBPF_CAP_EV_DNS if
 * it did, with *dst the original destination; else 0. */
static __always_inline int cap_outbound(struct bpf_sock_addr *ctx, const struct cap_caller *c, int v6,
					struct mbpf_l4addr *dst)
{
	struct mbpf_cap_pod *p;
	__u8 to[MBPF_ADDR_LEN];  /* the pod's own address, or loopback for DNS */
	__u32 proto = ctx->protocol;
	__u16 dport, to_port, out_port, in_port, dns_port;
	__u32 pod_id;
	__u8 flags;
	int dns, v4;

	if (!c->pod_cg)
		return 0;
	p = mbpf_cap_pod.lookup((__u64 *)&c->pod_cg);
	if (!p)
		return 0;
	/* Read once: the agent may rewrite the entry meanwhile. */
	flags = p->flags;
	dns_port = p->dns_port;
	if (!(flags & MBPF_CAP_F_OUTBOUND) && !dns_port)
		return 0;
	if (c->uid == p->proxy_uid) {
		cap_count(MBPF_CAP_SKIP_UID);
		return 0;
	}
	pod_id = p->pod_id;
	out_port = p->out_port;
	in_port = p->in_port;
	ctx_get_dst(ctx, dst, v6);
	dport = bpf_ntohs(dst->port);
	dns = dport == MBPF_DNS_PORT && dns_port;
	/* DNS: TCP, or UDP connected or not, whatever the outbound ranges (Istio's
	 * DNS rules come before them); otherwise TCP when outbound is captured. */
	if (dns ? proto != MBPF_IPPROTO_TCP && proto != MBPF_IPPROTO_UDP
		: proto != MBPF_IPPROTO_TCP || !(flags & MBPF_CAP_F_OUTBOUND))
		return 0;
	/* Loopback stays, but for DNS: a loopback nameserver (127.0.0.53,
	 * systemd-resolved's stub) is captured, as istio-iptables' DNS rules
	 * come before its loopback RETURN (and its lo RETURN spares port 53). */
	if (!dns && addr_is_loopback(dst->addr))
		return 0;
	v4 = addr_is_v4mapped(dst->addr);  /* also an IPv4-mapped one on an IPv6 socket */
	__builtin_memcpy(to, v4 ? p->ip4 : p->ip6, MBPF_ADDR_LEN);
	if (cap_addr_is_zero(to))
		return 0;  /* the pod has no address of this family */
	/* The pod's own address goes over lo inside the pod: never captured, as
	 * istio-iptables RETURNs it (and the proxy's ports there would loop). */
	if (addr_equal(dst->addr, to))
		return 0;
	if (dns) {
		/* Loopback, where REDIRECT sends a local packet and the Istio agent
		 * listens (127.0.0.1:15053 only). Unlike the outbound port, no
		 * original destination is filed by tuple for it, so the tuple
		 * need not be unique on the node; the answer's reverse NAT is
		 * keyed by socket. */
		to_port = dns_port;
		addr_set_loopback(to, v4);
	} else {
		if (cap_port_verdict(pod_id, dport, MBPF_DIR_OUT) == MBPF_CAP_EXCLUDE) {
			cap_count(MBPF_CAP_SKIP_PORT);
			return 0;
		}
		if (cap_cidr_verdict(pod_id, flags, dst->addr) != MBPF_CAP_INCLUDE) {
			cap_count(MBPF_CAP_SKIP_CIDR);
			return 0;
		}
		to_port = out_port;
		cap_remember(ctx, dst, MBPF_DIR_OUT);
	}
	if (v6)
		ctx_set_dst6(ctx, to, bpf_htons(to_port));
	else if (ctx_set_dst4(ctx, to, bpf_htons(to_port)) < 0)
		return 0;
	cap_count(dns ? MBPF_CAP_DNS : MBPF_CAP_OUT);
	return dns ? MBPF_CAP_EV_DNS : MBPF_CAP_EV_OUTBOUND;
}

/* Steers a connect from this node to a meshed pod's port to that pod's
 * inbound port, unless it is that pod's proxy itself calling. The pod's
 * cgroup id if it did, with *dst the original destination; else 0. */
static __always_inline __u64 cap_inbound(struct bpf_sock_addr *ctx, const struct cap_caller *c, int v6,
					 struct mbpf_l4addr *dst)
{
	struct mbpf_ep_addr key = {};
	struct mbpf_cap_pod *p;
	__u64 *cgp;
	__u64 cg;
	__u16 dport, in_port;
	__u8 flags;
	int verdict;

	if (ctx->protocol != MBPF_IPPROTO_TCP)
		return 0;
	ctx_get_dst(ctx, dst, v6);
	__builtin_memcpy(key.addr, dst->addr, MBPF_ADDR_LEN);
	cgp = mbpf_cap_addr.lookup(&key);
	if (!cgp)
		return 0;
	cg = *cgp;
	p = mbpf_cap_pod.lookup(&cg);
	if (!p)
		return 0;
	flags = p->flags;
	in_port = p->in_port;
	if (!(flags & MBPF_CAP_F_INBOUND))
		return 0;
	if (cg == c->pod_cg && c->uid == p->proxy_uid) {
		cap_count(MBPF_CAP_SKIP_UID);
		return 0;
	}
	dport = bpf_ntohs(dst->port);
	if (dport == in_port || dport == p->out_port)
		return 0;
	verdict = cap_port_verdict(p->pod_id, dport, MBPF_DIR_IN);
	if ((flags & MBPF_CAP_F_IN_ALL) ? verdict == MBPF_CAP_EXCLUDE : verdict != MBPF_CAP_INCLUDE) {
		cap_count(MBPF_CAP_SKIP_PORT);
		return 0;
	}
	cap_remember(ctx, dst, MBPF_DIR_IN);
	MBPF_CTX_WRITE32(ctx->user_port, (__u32)bpf_htons(in_port));
	cap_count(MBPF_CAP_IN);
	return cg;
}

/* A socket's captured-connection record, or NULL: for the proxy's accepted
 * socket the remote end is the app and the local end the proxy's port, the
 * tuple cap_file_pair filed the original destination under. getsockopt
 * (SO_ORIGINAL_DST) and getsockname ask this. */
static __always_inline struct mbpf_cap_orig *cap_pair_of_sk(struct bpf_sock *sk)
{
	struct mbpf_cap_pair_key key = {};
	__u32 family = sk->family;

	if (family != 2 && family != 10)
		return 0;
	addr_fill(key.peer, family, sk->dst_ip4,
		 MBPF_CTX_READ32(sk->dst_ip6[0]), MBPF_CTX_READ32(sk->dst_ip6[1]),
		 MBPF_CTX_READ32(sk->dst_ip6[2]), MBPF_CTX_READ32(sk->dst_ip6[3]));
	addr_fill(key.local, family, sk->src_ip4,
		 MBPF_CTX_READ32(sk->src_ip6[0]), MBPF_CTX_READ32(sk->src_ip6[1]),
		 MBPF_CTX_READ32(sk->src_ip6[2]), MBPF_CTX_READ32(sk->src_ip6[3]));
	key.peer_port = (__u16)sk->dst_port;             /* network order */
	key.local_port = bpf_htons((__u16)sk->src_port); /* host order in bpf_sock */
	return mbpf_cap_pair.lookup(&key);
}

/* sockops, ACTIVE_ESTABLISHED: a captured socket now has its tuple; file
 * its original destination under that tuple as the proxy will see it. */
static __always_inline void cap_file_pair(struct bpf_sock_ops *skops)
{
	struct mbpf_cap_pair_key key = {};
	struct mbpf_cap_orig orig;
	struct mbpf_cap_orig *o;
	__u64 cookie = mbpf_get_socket_cookie(skops);
	__u32 family = skops->family;

	o = mbpf_cap_orig.lookup(&cookie);
	if (!o)
		return;
	orig = *o;
	addr_fill(key.peer, family, skops->local_ip4,
		 MBPF_CTX_READ32(skops->local_ip6[0]), MBPF_CTX_READ32(skops->local_ip6[1]),
		 MBPF_CTX_READ32(skops->local_ip6[2]), MBPF_CTX_READ32(skops->local_ip6[3]));
	addr_fill(key.local, family, skops->remote_ip4,
		 MBPF_CTX_READ32(skops->remote_ip6[0]), MBPF_CTX_READ32(skops->remote_ip6[1]),
		 MBPF_CTX_READ32(skops->remote_ip6[2]), MBPF_CTX_READ32(skops->remote_ip6[3]));
	/* local_port is host order; remote_port network order in the upper half */
	key.peer_port = bpf_htons((__u16)skops->local_port);
	key.local_port = bpf_htons((__u16)bpf_ntohl(skops->remote_port));
	mbpf_cap_pair.update(&key, &orig);
	mbpf_cap_orig.delete(&cookie);
}

#endif /* MBPF_CAPTURE_H */
