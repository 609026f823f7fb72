/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south load balancing (issue 12): tc (clsact, direct action)
 * programs on the node's external devices. mbpf_ns_ingress translates what
 * arrives from outside: to a NodePort, an external IP, a LoadBalancer IP or
 * a ClusterIP routed to the node, and the replies of SNATed flows coming
 * back from backends on other nodes. mbpf_ns_egress translates the replies
 * of this node's backends on their way out. See lib/nodeport.h.
 * mbpf_ns_xdp, where the device takes XDP, runs before mbpf_ns_ingress and
 * does the common cases sooner (lib/ns_xdp.h); the rest reaches tc as is.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "lib/common.h"
#include "lib/ns_maps.h"
#include "lib/nodeport.h"
#include "lib/ns_xdp.h"

/* tc ingress of an external device: from outside the node */
int mbpf_ns_ingress(struct __sk_buff *skb)
{
	return ns_handle(skb, 1);
}

/* tc egress of an external device: leaving the node */
int mbpf_ns_egress(struct __sk_buff *skb)
{
	return ns_handle(skb, 0);
}

/* XDP on an external device: the fast path of mbpf_ns_ingress */
int mbpf_ns_xdp(struct xdp_md *ctx)
{
	struct ns_xdp_pkt x = {};
	struct mbpf_ns_ct_key key = {};
	struct mbpf_ns_ct t = {};
	struct mbpf_ns_ct *entry;
	struct mbpf_ns_cfg *cfg;
	__u32 zero = 0, counter = 0;  /* counted only once translated here */

	cfg = mbpf_ns_cfg.lookup(&zero);
	if (!cfg || !cfg->enabled || ns_xdp_parse(ctx, &x) < 0)
		return XDP_PASS;
	ns_ct_key(&key, &x.p, MBPF_NS_CT_REV);
	entry = mbpf_ns_ct.lookup(&key);
	if (entry && (entry->flags & MBPF_NS_CT_F_SNAT)) {
		t = *entry;   /* a reply from another node: from the frontend, to the client */
		ns_ct_touch(entry, &x.p, MBPF_NS_CT_REV);
		counter = MBPF_NS_REPLY;
	} else {
		key.dir = MBPF_NS_CT_FWD;
		entry = mbpf_ns_ct.lookup(&key);
		if (entry) {
			t = *entry;
			if (!ns_backend_still(&t))
				return XDP_PASS;  /* its backend is gone: tc balances it again */
			ns_ct_touch(entry, &x.p, MBPF_NS_CT_FWD);
			counter = MBPF_NS_ESTABLISHED;
		} else {
			struct mbpf_ns_svc svc;

			if (!ns_frontend(&x.p, &svc))
				return XDP_PASS;
			if (svc.count == 0 && !(svc.flags & MBPF_NS_F_LOCAL))
				return XDP_PASS;  /* tc answers with a RST or an ICMP error */
			if (ns_track_new(ctx, &x.p, cfg, &t))
				return XDP_DROP;  /* what tc would do (counted there) */
		}
		if (!(t.flags & MBPF_NS_CT_F_SNAT)) {
			/* to a pod of this node: the stack routes it */
			ns_xdp_rewrite(&x, x.p.saddr, x.p.sport, t.dst, t.dport);
			if (counter)
				ns_count(counter);
			return XDP_PASS;
		}
	}
	{
		struct bpf_fib_lookup fib = {};
		void *data, *end;

		x.p.sport = t.sport;
		x.p.dport = t.dport;
		if (!ns_xdp_fib_tuple(ctx, &x.p, t.src, t.dst, &fib)) {
			/* route or neighbour unknown: tc does it (bpf_redirect_neigh) */
			x.p.sport = x.ports[0];
			x.p.dport = x.ports[1];
			return XDP_PASS;
		}
		x.p.sport = x.ports[0];
		x.p.dport = x.ports[1];
		if (ns_xdp_ttl_dec(&x) < 0)
			return XDP_DROP;
		ns_xdp_rewrite(&x, t.src, t.sport, t.dst, t.dport);
		if (counter)
			ns_count(counter);  /* (a new flow was counted when tracked) */
		data = (void *)(long)ctx->data;
		end = (void *)(long)ctx->data_end;
		if (data + 12 > end)
			return XDP_DROP;
		__builtin_memcpy(data, fib.dmac, 6);
		__builtin_memcpy(data + 6, fib.smac, 6);
		ns_count(MBPF_NS_XDP_FWD);
		if (fib.ifindex == ctx->ingress_ifindex)
			return XDP_TX;
		return bpf_redirect(fib.ifindex, 0);
	}
}
