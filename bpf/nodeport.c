/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south load balancing (issue 12): tc (clsact, direct action)
 * programs on the node's external devices. mbpf_ns_ingress translates what
 * arrives from outside: to a NodePort, an external IP, a LoadBalancer IP or
 * a ClusterIP routed to the node, and the replies of SNATed flows coming
 * back from backends on other nodes. mbpf_ns_egress translates the replies
 * of this node's backends on their way out. See lib/nodeport.h.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "lib/common.h"
#include "lib/ns_maps.h"
#include "lib/nodeport.h"

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
