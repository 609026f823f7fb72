/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * NetworkPolicy on every packet: tc (clsact, direct action) programs on the
 * host side of each local pod's interface. mbpf_tc_from_pod sits on that
 * interface's ingress (what the pod sends: its egress rules), mbpf_tc_to_pod
 * on its egress (what the pod receives: its ingress rules).
 *
 * A packet of an interface without an endpoint entry passes untouched. For
 * a managed pod: known flows and replies pass on one conntrack lookup; else
 * its own source address only (from_pod), then, if the pod is isolated in
 * that direction, the rules of its current generation.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "lib/common.h"
#include "lib/policy_maps.h"
#include "lib/ct.h"
#include "lib/policy.h"

static __always_inline int enforce(struct __sk_buff *skb, __u8 dir)
{
	struct mbpf_flow f = {};
	struct mbpf_ep *epp;
	struct mbpf_ep ep;
	__u32 ifindex = skb->ifindex;
	__u32 rule = 0;
	int res, allowed;
	__u8 isolate = dir == MBPF_DIR_IN ? MBPF_EP_F_ISOLATE_IN : MBPF_EP_F_ISOLATE_OUT;

	res = parse(skb, &f);
	if (res == MBPF_PARSE_NOT_IP)
		return MBPF_TC_PASS;
	/* A TCP SYN opens a new connection: it is judged by the rules in force
	 * even if an earlier connection on the same addresses and ports left an
	 * entry (the kernel reuses ports soon after a close), so a policy that
	 * now denies the pair is never bypassed by an old flow's entry.
	 * Any other packet of a known flow passes on one lookup, before even
	 * the endpoint's (ct.h): its entry is marked at the pod's end with this
	 * interface only with an address the pod owns (below), so the hit has
	 * also checked the source of what the pod sends. */
	if (res == MBPF_PARSE_OK) {
		if (is_nd(&f))
			return MBPF_TC_PASS;
		if (!f.syn && ct_known(&f, ifindex, dir))
			return MBPF_TC_PASS;
		if (is_icmp_error(&f) && icmp_error_known(skb, &f, ifindex, dir))
			return MBPF_TC_PASS;
	}

	epp = mbpf_pol_ep.lookup(&ifindex);
	if (!epp)
		return MBPF_TC_PASS;  /* not a pod we manage */
	ep = *epp;  /* one copy: ep_id, gen and flags from the same update */
	if (res != MBPF_PARSE_OK) {
		pol_count(MBPF_DROP_MALFORMED);
		pol_event(skb, &f, ep.ep_id, dir, MBPF_EV_MALFORMED, 0);
		return MBPF_TC_DROP;
	}
	if (dir == MBPF_DIR_OUT && !address_is_own(&f, f.saddr, ep.ep_id)) {
		pol_count(MBPF_DROP_SPOOFED);
		pol_event(skb, &f, ep.ep_id, dir, MBPF_EV_SPOOFED, 0);
		return MBPF_TC_DROP;
	}
	if (!f.syn && ct_legacy_known(&f, ep.ep_id, dir))
		return MBPF_TC_PASS;  /* an entry of 0.1.0 (ct.h) */
	if (ep.flags & isolate) {
		rule = policy_allows(&f, &ep, dir, &allowed);
		if (!allowed) {
			pol_count(dir == MBPF_DIR_IN ? MBPF_POL_IN_DENY : MBPF_POL_OUT_DENY);
			pol_event(skb, &f, ep.ep_id, dir, MBPF_EV_DENY, 0);
			return MBPF_TC_DROP;
		}
	}
	/* what the pod sends was checked above; what it receives is recorded only
	 * if sent to one of its addresses (else it passes, unrecorded) */
	if (dir == MBPF_DIR_OUT || address_is_own(&f, f.daddr, ep.ep_id))
		ct_create(&f, ifindex, dir);
	pol_count(dir == MBPF_DIR_IN ? MBPF_POL_IN_ALLOW : MBPF_POL_OUT_ALLOW);
	pol_event(skb, &f, ep.ep_id, dir, MBPF_EV_ALLOW, rule);
	return MBPF_TC_PASS;
}

/* tc ingress of the pod's host-side interface: traffic from the pod */
int mbpf_tc_from_pod(struct __sk_buff *skb)
{
	return enforce(skb, MBPF_DIR_OUT);
}

/* tc egress of the pod's host-side interface: traffic to the pod */
int mbpf_tc_to_pod(struct __sk_buff *skb)
{
	return enforce(skb, MBPF_DIR_IN);
}
