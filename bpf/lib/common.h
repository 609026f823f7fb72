/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Structs shared with userspace. This header is the one definition: the agent
 * uses bcc's Key/Leaf types generated from it, and the hand mirror in
 * meshbpf/datapath/layout.py is checked against the compiled layout by
 * tests/kernel/test_layout.py.
 *
 * Rules: fixed-width fields only, explicit padding (always written as zero),
 * and every field says its byte order. Addresses are 16 bytes in every map;
 * IPv4 is stored IPv4-mapped (::ffff:a.b.c.d), so one lookup path serves
 * connect4, connect6 and IPv4 destinations written through an IPv6 socket.
 */
#ifndef MBPF_COMMON_H
#define MBPF_COMMON_H

#include <linux/types.h>

#define MBPF_ADDR_LEN 16

/* Frontend (service) map key: a Service's virtual address, port and protocol. */
struct mbpf_svc_key {
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;                 /* network order */
	__u8  proto;                /* IPPROTO_TCP or IPPROTO_UDP */
	__u8  pad;                  /* zero */
};

/* Frontend (service) map value. */
struct mbpf_svc {
	__u32 svc_id;               /* host order; keys the slot and affinity maps */
	__u32 count;                /* host order; usable slots 0..count-1; 0 = refuse */
	__u32 affinity_timeout;     /* host order; seconds, 0 = no session affinity */
	__u32 flags;                /* host order; MBPF_SVC_F_*, reserved, zero today */
};

/* Backend-slot map key: the n-th usable backend of a service. */
struct mbpf_slot_key {
	__u32 svc_id;               /* host order */
	__u32 slot;                 /* host order; 0..count-1 */
};

/* Backend-slot map value. */
struct mbpf_slot {
	__u32 backend_id;           /* host order; key of the backend map */
	__u8  state;                /* MBPF_SLOT_* (why this endpoint is usable) */
	__u8  pad[3];               /* zero */
};

/* Backend map value; the key is a __u32 backend id in host order. */
struct mbpf_backend {
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;                 /* network order */
	__u8  proto;                /* IPPROTO_TCP or IPPROTO_UDP */
	__u8  pad;                  /* zero */
};

/* Session-affinity map key (LRU). The client is its network namespace:
 * socket hooks run before the source address is chosen, and a pod is one
 * network namespace, which is what ClientIP means for pod traffic. */
struct mbpf_aff_key {
	__u64 netns_cookie;         /* host order; bpf_get_netns_cookie() */
	__u32 svc_id;               /* host order */
	__u32 pad;                  /* zero */
};

/* Session-affinity map value. */
struct mbpf_aff {
	__u64 last_used_ns;         /* host order; bpf_ktime_get_ns() */
	__u32 backend_id;           /* host order */
	__u32 slot;                 /* host order; slot the backend held when chosen */
};

/* Reverse-NAT map key (LRU): a socket and the backend it was sent to. */
struct mbpf_rnat_key {
	__u64 cookie;               /* host order; bpf_get_socket_cookie() */
	__u8  addr[MBPF_ADDR_LEN];  /* network order; backend address */
	__u16 port;                 /* network order; backend port */
	__u8  pad[6];               /* zero */
};

/* Reverse-NAT map value: what recvmsg() and getpeername() report instead. */
struct mbpf_rnat {
	__u8  addr[MBPF_ADDR_LEN];  /* network order; service address */
	__u16 port;                 /* network order; service port */
	__u8  pad[6];               /* zero */
};

/* mbpf_slot.state */
#define MBPF_SLOT_READY        1  /* endpoint is ready */
#define MBPF_SLOT_TERMINATING  2  /* serving and terminating: used only when none is ready */

#endif /* MBPF_COMMON_H */
