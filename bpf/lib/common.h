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

/* BPF_F_NO_PREALLOC, which LPM tries and socket storage require. (It does
 * not stop a hash element's reuse under a reader: since 6.1 the BPF
 * allocator hands a freed element out again at once, as preallocated maps
 * do; programs copy what they read instead.) */
#define MBPF_F_NO_PREALLOC 1

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
	__u32 flags;                /* host order; MBPF_SVC_F_* */
};

/* mbpf_svc.flags */
#define MBPF_SVC_F_NODE_NETNS  1  /* translated for sockets of the node's netns only (an LB IP whose
				   * loadBalancerSourceRanges hold the node's addresses); others
				   * pass untouched to tc, which checks their source */

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

/* Route-backend counter key (mbpf_route_cnt): connections a split
 * frontend sent to one backend. */
struct mbpf_pick_key {
	__u32 svc_id;               /* host order */
	__u32 backend_id;           /* host order */
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

/* Reverse-NAT map key (LRU), for unconnected UDP, which may send to several
 * services from one socket: a socket and the backend it was sent to. */
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
	__u16 pad;                  /* zero */
	__u32 svc_id;               /* host order; the service it was translated
	                             * for; 0: none to check (DNS capture's
	                             * entries, and those written by 0.1.0) */
};

/* Per-socket reverse NAT (socket storage) of a connected socket: freed with
 * the socket, so live connections never lose it to LRU churn. */
struct mbpf_sk_rnat {
	__u8  backend_addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
	__u8  svc_addr[MBPF_ADDR_LEN];      /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 backend_port;                 /* network order */
	__u16 svc_port;                     /* network order */
	__u32 svc_id;                       /* host order; the service translated
	                                     * for; 0: none to check (DNS capture's
	                                     * entries, and those written by 0.1.0) */
};

/* A slot of the direct-mapped connection table (mbpf_conn_slot): the
 * socket whose cookie indexes it, modulo the table's size, holds it from
 * connect() to release. */
struct mbpf_conn_slot {
	__u64 cookie;               /* the holder's socket cookie; 0: free */
	struct mbpf_sk_rnat rnat;
};

/* Same-node socket redirection: the sockhash and socket-state key, one per
 * TCP socket, as that socket sees its connection. A peer's key is the same
 * with local and remote swapped.
 *
 * Loopback addresses repeat in every network namespace, so a loopback key
 * carries its namespace: the first 8 bytes of both addresses, zero in every
 * loopback address (::1, ::ffff:127.x.y.z), hold the netns cookie instead,
 * and scope says so. The size stays that of 0.1.0's key. */
struct mbpf_sock_key {
	__u8  local_ip[MBPF_ADDR_LEN];   /* network order; IPv4 as ::ffff:a.b.c.d */
	__u8  remote_ip[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 local_port;                /* host order */
	__u16 remote_port;               /* host order */
	__u8  family;                    /* 4 or 6: the family of the addresses */
	__u8  scope;                     /* MBPF_SCOPE_* */
	__u8  pad[2];                    /* zero */
};

/* mbpf_sock_key.scope */
#define MBPF_SCOPE_NODE      0  /* addresses unique on the node */
#define MBPF_SCOPE_NETNS     1  /* loopback; address bytes 0-7 hold the netns cookie (host order) */
#define MBPF_SCOPE_AMBIGUOUS 2  /* loopback, on a kernel that cannot tell namespaces apart: never spliced */

/* Per-socket redirection state (socket-state map value). Each field is
 * written whole (no read-modify-write of shared bits), because the socket's
 * own programs and its peer's write it concurrently. */
struct mbpf_sockstate {
	__u64 sk_addr;          /* host order; the kernel address of this socket, for
				 * reading its psock (0.1.0 kept an unread timestamp
				 * here: a bad address only fails the read) */
	__u64 last_redirect_ns; /* host order; this socket's last splice into its peer */
	__u32 small_run;        /* host order; small sends in a row with no reply */
	__u8  mode;             /* MBPF_MODE_*: undecided, redirect, pass (one way) */
	__u8  nodelay;          /* 1 if the application set TCP_NODELAY */
	__u8  evicted;          /* 1 once out of the sockhash: native TCP again */
	__u8  wide_mss;         /* 1 if the path MSS >= cfg nagle_mss_min (loopback-sized) */
};

/* Value of mbpf_spin, keyed by a spliced socket's kernel address (__u64,
 * host order): how its reader polls. A reader spinning on non-blocking
 * recv() holds the socket's lock most of the time, and every splice into
 * the socket must take that lock, so the sender sleeps on it. A reader that
 * blocks in recv() can get a spurious EAGAIN from tcp_bpf_recvmsg. */
struct mbpf_spin {
	__u32 empty_reads;      /* host order; recv() calls that found nothing (EAGAIN) since
				 * the peer's last splice into this socket */
	__u16 spin_run;         /* host order; splices in a row that each met at least
				 * MBPF_SPIN_EMPTY_MIN empty reads (a __u32 before; its upper
				 * half, now the next two fields, never left 0: the pair passes
				 * at MBPF_SPIN_RUN_MAX) */
	__u8  reads_block;      /* 1 once a recv() returned that was allowed to block (no
				 * MSG_DONTWAIT, no O_NONBLOCK): the pair goes to TCP */
	__u8  pad;              /* zero */
};

/* Listener map key (mbpf_listeners): what a listening TCP socket shares with
 * every socket it accepts, its network namespace and local port. The value
 * is the listener's kernel address (__u64, host order): whether it blocks
 * tells, before accept(), whether its accepted sockets will. */
struct mbpf_listen_key {
	__u64 netns;            /* host order; the kernel address of the socket's struct net
				 * (sk->__sk_common.skc_net), stable while the listener lives */
	__u16 port;             /* host order; the local port */
	__u8  pad[6];           /* zero */
};

/* mbpf_sockstate.mode: 0 -> REDIRECT -> PASS, or 0 -> PASS; never back,
 * because bytes passed to TCP and bytes redirected later would reorder. */
#define MBPF_MODE_UNDECIDED 0
#define MBPF_MODE_REDIRECT  1
#define MBPF_MODE_PASS      2

/* Redirection settings, one entry (key 0) of the settings map. */
struct mbpf_redir_cfg {
	__u32 enabled;          /* host order; 0: pass everything, insert nothing */
	__u32 require_cidr;     /* host order; 1: both ends must be in the CIDR map */
	__u32 small_write;      /* host order; bytes: a send below this is "small" */
	__u32 small_run_max;    /* host order; small sends in a row before passing */
	__u32 nodelay_small_min; /* host order; bytes: with TCP_NODELAY, smaller sends never count as small */
	__u32 nagle_mss_min;    /* host order; bytes: with Nagle, sends count as small only on a path with this MSS */
	__u64 evict_grace_ns;   /* host order; evict only this long after the peer's last splice */
};

/* Key of the pod-CIDR LPM map. */
struct mbpf_cidr_key {
	__u32 prefixlen;        /* host order; over the 16-byte (v4-mapped) address */
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
};

/* Indexes of the redirection counters (per-CPU array of __u64). */
#define MBPF_CNT_REDIR_MSGS     0  /* sendmsg calls spliced to the peer socket */
#define MBPF_CNT_REDIR_BYTES    1
#define MBPF_CNT_PASS_MSGS      2  /* sendmsg calls left to the TCP stack */
#define MBPF_CNT_PASS_BYTES     3
#define MBPF_CNT_SWITCHED       4  /* pairs switched to the TCP stack (small writes, no peer) */
#define MBPF_CNT_EVICTED        5  /* sockets taken out of the sockhash */
#define MBPF_CNT_INSERTED       6  /* sockets put into the sockhash */
#define MBPF_CNT_SPINNERS       7  /* pairs switched to TCP for a reader spinning on recv() */
#define MBPF_CNT_MAX            8

/* Socket-LB counters (per-CPU array of __u64, mbpf_lb_stats): one row of
 * four per result, one column per family and protocol. A translation is
 * counted as TRANSLATED and, where it applies, also as AFFINITY, SLOT0 or
 * TERMINATING. */
#define MBPF_LB_TRANSLATED   0  /* connect() or UDP datagram sent to a backend */
#define MBPF_LB_REFUSED      1  /* service without usable backend: refused */
#define MBPF_LB_AFFINITY     2  /* backend kept by session affinity */
#define MBPF_LB_SLOT0        3  /* picked slot gone mid-update: retried slot 0 */
#define MBPF_LB_TERMINATING  4  /* no ready endpoint: a serving, terminating one */
#define MBPF_LB_RNAT_STALE   5  /* reverse NAT skipped: its service is gone or replaced */
#define MBPF_LB_RESULTS      6
#define MBPF_LB_STAT_MAX     (MBPF_LB_RESULTS * 4)
/* Column: bit 1 IPv6 hook, bit 0 UDP. */
#define MBPF_LB_STAT(result, v6, udp) ((result) * 4 + ((v6) ? 2 : 0) + ((udp) ? 1 : 0))

/* mbpf_slot.state */
#define MBPF_SLOT_READY        1  /* endpoint is ready */
#define MBPF_SLOT_TERMINATING  2  /* serving and terminating: used only when none is ready */
#define MBPF_SLOT_REFUSE       3  /* a split's share whose backend Service is missing: refuse */

/* ---- NetworkPolicy (bpf/policy.c, bpf/lib/policy.h) --------------------
 * Enforced by tc programs on the host side of each local pod's interface:
 * mbpf_tc_from_pod on its ingress (traffic the pod sends), mbpf_tc_to_pod on
 * its egress (traffic the pod receives). A change is atomic per pod: its
 * rules are written under the endpoint's other generation, then the
 * endpoint entry flips to that generation in one update, then the old
 * generation's rules are deleted (meshbpf/reconcile/policy.py).
 *
 * Lookup for a new flow in direction dir of endpoint ep: the peer map with
 * the peer's address gives the peer set (addresses that the same rules
 * allow) and whether any port is allowed; if not, the port map with
 * (peer set, protocol, port) decides. Replies and established flows pass
 * through the conntrack map, so a policy edit never cuts a flow it allowed. */

#define MBPF_DIR_IN   0  /* to the pod: its ingress rules */
#define MBPF_DIR_OUT  1  /* from the pod: its egress rules */

/* Endpoint map (hash, mbpf_pol_ep) value; the key is the __u32 ifindex of
 * the pod's host-side interface, host order. */
struct mbpf_ep {
	__u32 ep_id;                /* host order; 1..; keys the rule maps */
	__u8  gen;                  /* 0 or 1: the generation of rules in force */
	__u8  flags;                /* MBPF_EP_F_* */
	__u16 pad;                  /* zero */
};
#define MBPF_EP_F_ISOLATE_IN   1  /* default deny for traffic to the pod */
#define MBPF_EP_F_ISOLATE_OUT  2  /* default deny for traffic from the pod */

/* Endpoint address map (hash, mbpf_pol_epaddr) key; the value is the __u32
 * ep_id (host order) that owns the address. A packet from a pod whose
 * source address is not its own is dropped. */
struct mbpf_ep_addr {
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
};

/* Peer map key (LPM trie, mbpf_pol_peer). prefixlen counts the bits after
 * it: 64 (ep_id, gen, dir, pad) + the address prefix (IPv4 /n is 96 + n). */
struct mbpf_pol_peer_key {
	__u32 prefixlen;            /* host order */
	__u32 ep_id;                /* host order */
	__u8  gen;                  /* 0 or 1 */
	__u8  dir;                  /* MBPF_DIR_* */
	__u8  pad[2];               /* zero */
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
};

/* Peer map value. */
struct mbpf_pol_peer {
	__u32 peer_set;             /* host order; keys the port map; 1.. */
	__u32 rule;                 /* host order; with ANY_PORT: the rule that allows */
	__u32 flags;                /* host order; MBPF_PEER_F_* */
	__u32 pad;                  /* zero */
};
#define MBPF_PEER_F_ANY_PORT  1  /* any protocol, any port */

/* Port map key (LPM trie, mbpf_pol_port). prefixlen counts the bits after
 * it: 96 (ep_id .. peer_set) + the port prefix (0..16). */
struct mbpf_pol_port_key {
	__u32 prefixlen;            /* host order */
	__u32 ep_id;                /* host order */
	__u8  gen;                  /* 0 or 1 */
	__u8  dir;                  /* MBPF_DIR_* */
	__u8  proto;                /* IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP */
	__u8  pad;                  /* zero */
	__u32 peer_set;             /* host order */
	__u16 port;                 /* network order (prefixes compare bytes) */
	__u16 pad2;                 /* zero; never inside the prefix */
};

/* Port map value. */
struct mbpf_pol_port {
	__u32 rule;                 /* host order; the rule that allows */
	__u32 pad;                  /* zero */
};

/* Conntrack map key (LRU hash, mbpf_ct): one entry per flow, shared by its
 * two ends (bpf/lib/ct.h): dir MBPF_CT_SHARED, ep_id 0, and the flow's ends
 * in a fixed order, the lower (address, port) as saddr/sport. Entries of
 * 0.1.0 (dir MBPF_DIR_*, ep_id set: a flow as endpoint ep first saw it in
 * direction dir) are still honoured until evicted. */
struct mbpf_ct_key {
	__u8  saddr[MBPF_ADDR_LEN]; /* network order; IPv4 as ::ffff:a.b.c.d */
	__u8  daddr[MBPF_ADDR_LEN]; /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 sport;                /* network order; 0 for protocols without ports */
	__u16 dport;                /* network order; 0 for protocols without ports */
	__u32 ep_id;                /* host order; 0 in shared entries */
	__u8  proto;                /* IP protocol */
	__u8  dir;                  /* MBPF_CT_SHARED (0.1.0: MBPF_DIR_*) */
	__u8  pad[2];               /* zero */
};
#define MBPF_CT_SHARED  2

/* Conntrack map value: when the flow was last seen, and per end of the flow
 * ([MBPF_CT_LOW]: saddr's) the pod that let it through at that end (an
 * address it owns). Same size as before: the pinned map is kept across an
 * upgrade (the earlier build kept endpoint ids, for people, where seen_s
 * and pad are: its UDP entries read as long idle and are judged afresh). */
struct mbpf_ct {
	__u32 seen_s;               /* host order; ct_now_s() (seconds since boot + 2^24) at the
	                             * flow's last packet; a non-TCP flow idle longer than
	                             * MBPF_CT_IDLE_S is a new flow (bpf/lib/ct.h) */
	__u32 pad;                  /* zero */
	__u32 ifindex[2];           /* host order; its host-side interface: what the programs match */
};
#define MBPF_CT_LOW   0
#define MBPF_CT_HIGH  1

/* Policy counters (per-CPU array of __u64, mbpf_pol_stats). Verdicts count
 * new flows; packets of known flows are not counted. */
#define MBPF_POL_IN_ALLOW    0  /* new flow to a pod, allowed */
#define MBPF_POL_IN_DENY     1  /* new flow to a pod, dropped by policy */
#define MBPF_POL_OUT_ALLOW   2  /* new flow from a pod, allowed */
#define MBPF_POL_OUT_DENY    3  /* new flow from a pod, dropped by policy */
#define MBPF_DROP_SPOOFED    4  /* from a pod, source address not its own */
#define MBPF_DROP_MALFORMED  5  /* headers could not be read */
#define MBPF_POL_STAT_MAX    8

/* Policy settings (array, one entry, mbpf_pol_cfg). */
struct mbpf_pol_cfg {
	__u32 events;               /* host order; non-zero: a reader listens, emit events */
	__u32 pad;                  /* zero */
};

/* Flow event (ring buffer, mbpf_events): one per new flow decided and per
 * dropped packet, only while mbpf_pol_cfg.events is set. */
struct mbpf_pol_event {
	__u64 ts_ns;                /* host order; bpf_ktime_get_ns() */
	__u8  saddr[MBPF_ADDR_LEN]; /* network order; IPv4 as ::ffff:a.b.c.d */
	__u8  daddr[MBPF_ADDR_LEN]; /* network order */
	__u16 sport;                /* network order; 0 for protocols without ports */
	__u16 dport;                /* network order */
	__u32 ep_id;                /* host order */
	__u32 rule;                 /* host order; the rule that allowed, 0 if none */
	__u32 ifindex;              /* host order; the pod's host-side interface */
	__u8  proto;                /* IP protocol */
	__u8  dir;                  /* MBPF_DIR_* */
	__u8  verdict;              /* MBPF_EV_* */
	__u8  kind;                 /* MBPF_EV_KIND_POLICY (0.1.0 wrote a zero pad here) */
	__u32 pad2;                 /* zero */
};
#define MBPF_EV_ALLOW      0  /* new flow allowed (by a rule, or not isolated) */
#define MBPF_EV_DENY       1  /* new flow dropped by policy */
#define MBPF_EV_SPOOFED    2  /* dropped: source address not the pod's */
#define MBPF_EV_MALFORMED  3  /* dropped: headers could not be read */

/* Every record in mbpf_events has its kind at byte MBPF_EV_KIND_OFF, so a
 * reader tells the two layouts apart before reading the rest. */
#define MBPF_EV_KIND_OFF     59
#define MBPF_EV_KIND_POLICY  0  /* struct mbpf_pol_event */
#define MBPF_EV_KIND_LB      1  /* struct mbpf_lb_event */
#define MBPF_EV_KIND_CAP     2  /* struct mbpf_cap_event */

/* Socket-LB event (ring buffer mbpf_events, bpf/sock_lb.c): one per connect()
 * or unconnected UDP send to a Service address, translated or refused, only
 * while mbpf_pol_cfg.events is set. The client is the calling task's cgroup
 * (a pod's processes live below its kubelet pod cgroup): connect() runs
 * before the socket has a source address. */
struct mbpf_lb_event {
	__u64 ts_ns;                /* host order; bpf_ktime_get_ns() */
	__u8  svc_addr[MBPF_ADDR_LEN];     /* network order; IPv4 as ::ffff:a.b.c.d */
	__u8  backend_addr[MBPF_ADDR_LEN]; /* network order; zero when refused */
	__u16 svc_port;             /* network order */
	__u16 backend_port;         /* network order; zero when refused */
	__u32 svc_id;               /* host order */
	__u32 pad[2];               /* zero; keeps kind at MBPF_EV_KIND_OFF */
	__u8  proto;                /* IPPROTO_TCP or IPPROTO_UDP */
	__u8  hook;                 /* MBPF_LB_EV_CONNECT or MBPF_LB_EV_SENDMSG */
	__u8  verdict;              /* MBPF_LB_EV_TRANSLATED or MBPF_LB_EV_REFUSED */
	__u8  kind;                 /* MBPF_EV_KIND_LB (at MBPF_EV_KIND_OFF) */
	__u32 pad2;                 /* zero */
	__u64 cgroup_id;            /* host order; the caller's cgroup v2 id */
	__u64 netns_cookie;         /* host order; the caller's netns, 0 if unknown */
};
#define MBPF_LB_EV_CONNECT     0  /* connect() (TCP, connected UDP) */
#define MBPF_LB_EV_SENDMSG     1  /* sendmsg() of unconnected UDP */
#define MBPF_LB_EV_TRANSLATED  0  /* sent to a backend */
#define MBPF_LB_EV_REFUSED     1  /* no usable backend: refused */

/* Sidecar capture event (ring buffer mbpf_events): one per connect() or
 * unconnected UDP send that capture steered to a proxy (bpf/sock_lb.c), and
 * one per SYN from a client outside every connect hook that tc turned to a
 * pod's inbound port (bpf/capture_in.c, hook MBPF_CAP_EV_TC), only while
 * mbpf_pol_cfg.events is set. Kind at MBPF_EV_KIND_OFF. The pod is the
 * meshed pod whose proxy gets it: the caller's (outbound, DNS) or the
 * destination's (inbound). A tc event has no calling task: its client is
 * the packet's source (peer_*), its cgroup_id and netns_cookie are 0. */
struct mbpf_cap_event {
	__u64 ts_ns;                /* host order; bpf_ktime_get_ns() */
	__u8  orig_addr[MBPF_ADDR_LEN];  /* network order; the destination asked, IPv4 as ::ffff:a.b.c.d */
	__u8  to_addr[MBPF_ADDR_LEN];    /* network order; where it goes: the proxy's address */
	__u16 orig_port;            /* network order */
	__u16 to_port;              /* network order; the proxy's outbound, inbound or DNS port */
	__u32 pad;                  /* zero */
	__u64 pod_cg;               /* host order; the meshed pod's cgroup id (mbpf_cap_pod key) */
	__u8  proto;                /* IPPROTO_TCP or IPPROTO_UDP */
	__u8  hook;                 /* MBPF_LB_EV_CONNECT, MBPF_LB_EV_SENDMSG or MBPF_CAP_EV_TC */
	__u8  decision;             /* MBPF_CAP_EV_* */
	__u8  kind;                 /* MBPF_EV_KIND_CAP (at MBPF_EV_KIND_OFF) */
	__u32 pad2;                 /* zero */
	__u64 cgroup_id;            /* host order; the caller's cgroup v2 id */
	__u64 netns_cookie;         /* host order; the caller's netns, 0 if unknown */
	__u8  peer_addr[MBPF_ADDR_LEN];  /* network order; tc: the client's address, else zero */
	__u16 peer_port;            /* network order; tc: the client's port, else zero */
	__u16 pad3;                 /* zero */
	__u32 pad4;                 /* zero */
};
#define MBPF_CAP_EV_TC        2  /* hook: tc on the pod's interface (mbpf_cap_tc_in) */
#define MBPF_CAP_EV_OUTBOUND  1  /* an app's connect to its proxy's outbound port */
#define MBPF_CAP_EV_INBOUND   2  /* a connect to a meshed pod, to its proxy's inbound port */
#define MBPF_CAP_EV_DNS       3  /* an app's DNS to its proxy's DNS port */

/* ---- Sidecar capture (issue 11) ------------------------------------------
 * A meshed pod's app traffic is steered to its proxy at connect(); the proxy
 * reads the original destination with getsockopt(SO_ORIGINAL_DST).
 *
 * mbpf_cap_pod: hash, key __u64 cgroup id (host order) of the pod's cgroup
 * (the kubelet pod cgroup; containers are its children). The connect hooks
 * find the caller's pod by its ancestor cgroup ids, levels 1..MBPF_CAP_MAX_LEVEL,
 * and also look up a destination pod by address (mbpf_cap_addr).
 */
#define MBPF_CAP_MAX_LEVEL 8

struct mbpf_cap_pod {
	__u8  ip4[MBPF_ADDR_LEN];   /* network order; the pod's IPv4 as ::ffff:a.b.c.d, zero if none */
	__u8  ip6[MBPF_ADDR_LEN];   /* network order; the pod's IPv6, zero if none */
	__u32 proxy_uid;            /* host order; sockets of this uid are never captured */
	__u32 pod_id;               /* host order; 1..; keys mbpf_cap_cidr and mbpf_cap_port */
	__u16 out_port;             /* host order; proxy's outbound port (15001) */
	__u16 in_port;              /* host order; proxy's inbound port (15006) */
	__u16 dns_port;             /* host order; 0: DNS not captured, else port 53 goes here */
	__u8  flags;                /* MBPF_CAP_F_* */
	__u8  pad;                  /* zero */
};
#define MBPF_CAP_F_OUTBOUND   1  /* capture the app's outbound connects
                                   * (DNS: by dns_port alone) */
#define MBPF_CAP_F_INBOUND    2  /* capture connects to the pod's ports */
#define MBPF_CAP_F_IN_ALL     4  /* inbound: every port not EXCLUDEd in mbpf_cap_port
                                  * (includeInboundPorts "*"); else only INCLUDEd ports */
#define MBPF_CAP_F_OUT_ALL    8  /* outbound: destinations matching no mbpf_cap_cidr prefix
                                  * are captured (includeOutboundIPRanges "*") */

/* mbpf_cap_addr: hash, key 16-byte address (network order, IPv4 mapped) of a
 * meshed pod -> __u64 cgroup id, its mbpf_cap_pod key (inbound lookups). */

/* mbpf_cap_cidr: LPM trie. prefixlen counts 32 bits of pod_id plus address
 * bits (an IPv4 /8 is 32 + 96 + 8). Longest prefix wins; the planner resolves
 * Istio's "exclude before include" into prefixes that say so. */
struct mbpf_cap_cidr_key {
	__u32 prefixlen;            /* host order */
	__u32 pod_id;               /* big-endian, so the trie compares it first as bytes */
	__u8  addr[MBPF_ADDR_LEN];  /* network order */
};
struct mbpf_cap_verdict {
	__u8  verdict;              /* MBPF_CAP_INCLUDE or MBPF_CAP_EXCLUDE */
	__u8  pad[3];               /* zero */
};
#define MBPF_CAP_EXCLUDE  0
#define MBPF_CAP_INCLUDE  1

/* mbpf_cap_port: hash, per pod and direction, a port's verdict
 * (value struct mbpf_cap_verdict). Outbound: excludeOutboundPorts (EXCLUDE).
 * Inbound: with MBPF_CAP_F_IN_ALL the excluded ports (EXCLUDE), else the
 * included ones (INCLUDE). */
struct mbpf_cap_port_key {
	__u32 pod_id;               /* host order */
	__u16 port;                 /* host order */
	__u8  dir;                  /* MBPF_DIR_IN or MBPF_DIR_OUT */
	__u8  pad;                  /* zero */
};

/* mbpf_cap_orig: LRU hash, key __u64 socket cookie (host order) of a captured
 * socket -> its original destination, until the connection is established;
 * then sockops files it in mbpf_cap_pair under the tuple the proxy sees. */
struct mbpf_cap_orig {
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;                 /* network order */
	__u8  dir;                  /* MBPF_DIR_OUT (to the outbound port), MBPF_DIR_IN or MBPF_CAP_DIR_IN_NAT */
	__u8  pad;                  /* zero */
	__u32 pad2;                 /* zero */
};
/* mbpf_cap_orig.dir of an inbound connection from another node: its port is
 * translated on the pod's own interface (bpf/capture_in.c), both ways. */
#define MBPF_CAP_DIR_IN_NAT 2

/* mbpf_cap_pair: LRU hash, the captured connection as the proxy's accepted
 * socket sees it -> struct mbpf_cap_orig. */
struct mbpf_cap_pair_key {
	__u8  peer[MBPF_ADDR_LEN];  /* network order; the app's (connecting) address */
	__u8  local[MBPF_ADDR_LEN]; /* network order; the proxy's listening address */
	__u16 peer_port;            /* network order */
	__u16 local_port;           /* network order */
	__u32 pad;                  /* zero */
};

/* mbpf_cap_cfg: array, one entry. */
struct mbpf_cap_cfg {
	__u32 pods;                 /* host order; meshed pods; 0: the hooks skip capture at once */
	__u32 pad;                  /* zero */
};

/* mbpf_cap_stats: per-CPU array of __u64 counters. */
#define MBPF_CAP_OUT          0  /* outbound connect steered to the proxy */
#define MBPF_CAP_IN           1  /* inbound connect steered to the proxy */
#define MBPF_CAP_DNS          2  /* DNS steered to the proxy's DNS port */
#define MBPF_CAP_SKIP_UID     3  /* the proxy's own connect: not captured */
#define MBPF_CAP_SKIP_PORT    4  /* excluded port */
#define MBPF_CAP_SKIP_CIDR    5  /* excluded destination range */
#define MBPF_CAP_ORIG_HIT     6  /* SO_ORIGINAL_DST answered */
#define MBPF_CAP_ORIG_MISS    7  /* SO_ORIGINAL_DST asked, no record */
#define MBPF_CAP_STAT_MAX     8

/* ---- North-south load balancing (issue 12) ------------------------------
 * tc (and XDP where the driver allows) programs on the node's external
 * devices translate packets that arrive from outside the node: to a
 * NodePort, an external IP, a LoadBalancer ingress IP, or a ClusterIP routed
 * to the node. The agent's north-south planner
 * (meshbpf/reconcile/northsouth.py) owns every map below except the
 * connection tracking, which is the datapath's own; plain mirrors of these
 * structs are in meshbpf/reconcile/northsouth_keys.py. */

/* Maglev table size M: a prime, the same on every node (part of a table's
 * definition, meshbpf/reconcile/maglev.py). The loader sets it. */
#ifndef MBPF_MAGLEV_M
#define MBPF_MAGLEV_M 16381
#endif

/* mbpf_ns_svc key: a packet's destination. A NodePort is keyed with its
 * family's unspecified address (IPv4 ::ffff:0.0.0.0, IPv6 ::): it answers
 * on every node address of that family in mbpf_ns_addr. */
struct mbpf_ns_key {
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d; unspecified: NodePort */
	__u16 port;                 /* network order */
	__u8  proto;                /* IPPROTO_TCP or IPPROTO_UDP */
	__u8  pad;                  /* zero */
};

/* mbpf_ns_svc value. */
struct mbpf_ns_svc {
	__u32 table_id;             /* host order; its Maglev table: entries
	                             * table_id * MBPF_MAGLEV_M .. + M - 1 of mbpf_maglev */
	__u32 count;                /* host order; distinct backends in the table;
	                             * 0: no usable endpoint (Cluster: reject with a
	                             * TCP RST or ICMP unreachable; Local: drop) */
	__u32 src_id;               /* host order; 0: any client; else only clients
	                             * in mbpf_ns_src under this id (loadBalancerSourceRanges) */
	__u32 flags;                /* host order; MBPF_NS_F_* */
};

#define MBPF_NS_F_LOCAL     1   /* externalTrafficPolicy: Local: the table holds
                                 * only this node's endpoints; the client's
                                 * address is kept (never SNAT) */
#define MBPF_NS_F_NODEPORT  2   /* keyed by a family's unspecified address (a NodePort) */

/* mbpf_ns_be value; the key is a __u32 backend id (host order). */
struct mbpf_ns_backend {
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
	__u16 port;                 /* network order */
	__u8  flags;                /* MBPF_NS_BE_* */
	__u8  pad;                  /* zero */
};

#define MBPF_NS_BE_LOCAL    1   /* on this node: reached without SNAT */

/* mbpf_maglev: array of __u32 backend ids (keys of mbpf_ns_be), one row of
 * MBPF_MAGLEV_M entries per table; a flow takes
 * row[flow_hash % MBPF_MAGLEV_M]. The hash covers the client's address and
 * port, the destination address and port and the protocol, never anything
 * of the node: the same flow picks the same backend on every node. */

/* mbpf_ns_src: LPM trie, loadBalancerSourceRanges -> __u32 (1: allowed). */
struct mbpf_ns_src_key {
	__u32 prefixlen;            /* host order; 32 + bits of addr that count
	                             * (an IPv4 /24 is 32 + 96 + 24) */
	__u32 src_id;               /* network order (compared as bytes) */
	__u8  addr[MBPF_ADDR_LEN];  /* network order; IPv4 as ::ffff:a.b.c.d */
};

/* mbpf_ns_addr: hash, the node's own addresses -> __u32 (1), on which
 * NodePorts answer. */

/* mbpf_ns_cfg: array, one entry. */
struct mbpf_ns_cfg {
	__u8  snat4[MBPF_ADDR_LEN]; /* network order; ::ffff:a.b.c.d the node's IPv4
	                             * source for SNAT; zero: none (IPv4 to remote
	                             * backends is dropped) */
	__u8  snat6[MBPF_ADDR_LEN]; /* network order; likewise for IPv6 */
	__u32 enabled;              /* host order; 0: the programs pass everything */
	__u16 snat_port_min;        /* host order; SNAT ports are snat_port_min..snat_port_max
	                             * (the agent's --snat-ports, reserved on the node:
	                             * net.ipv4.ip_local_reserved_ports); 0: 61000..65535 */
	__u16 snat_port_max;        /* host order; inclusive */
};

/* ---- North-south: the datapath's own (bpf/nodeport.c) --------------------- */

/* Tables in mbpf_maglev; a power of two, so that M (an odd prime) is
 * max_entries with its factors of two taken out (the loader sets it). */
#ifndef MBPF_NS_TABLE_MAX
#define MBPF_NS_TABLE_MAX 256
#endif

/* mbpf_ns_ct key (LRU hash): a packet's tuple as it is on the wire, before
 * translation. Each translated flow has two entries: MBPF_NS_CT_FWD under
 * the client's tuple (client -> frontend), MBPF_NS_CT_REV under the reply's
 * (backend -> client, or -> the SNAT address and port). */
struct mbpf_ns_ct_key {
	__u8  saddr[MBPF_ADDR_LEN]; /* network order; IPv4 as ::ffff:a.b.c.d */
	__u8  daddr[MBPF_ADDR_LEN]; /* network order */
	__u16 sport;                /* network order */
	__u16 dport;                /* network order */
	__u8  proto;                /* IPPROTO_TCP or IPPROTO_UDP */
	__u8  dir;                  /* MBPF_NS_CT_FWD or MBPF_NS_CT_REV */
	__u8  pad[2];               /* zero */
};
#define MBPF_NS_CT_FWD  1
#define MBPF_NS_CT_REV  2

/* mbpf_ns_ct value. FWD: the new destination (backend) and, with
 * MBPF_NS_CT_F_SNAT, the new source. REV: the reply's new source (the
 * frontend) and new destination (the client). */
struct mbpf_ns_ct {
	__u8  dst[MBPF_ADDR_LEN];   /* network order; FWD: backend; REV: client */
	__u8  src[MBPF_ADDR_LEN];   /* network order; FWD: SNAT address (zero: none); REV: frontend */
	__u16 dport;                /* network order; FWD: backend port; REV: client port */
	__u16 sport;                /* network order; FWD: SNAT port; REV: frontend port */
	__u32 backend_id;           /* host order; the mbpf_ns_be key chosen */
	__u64 last_ns;              /* host order; bpf_ktime_get_ns() of this direction's last packet */
	__u8  flags;                /* MBPF_NS_CT_F_* */
	__u8  pad[7];               /* zero */
};
#define MBPF_NS_CT_F_SNAT   1   /* the source was translated too (a remote backend) */
#define MBPF_NS_CT_F_LOCAL  2   /* the backend is on this node: replies leave
                                 * through the external device (tc egress) */
#define MBPF_NS_CT_F_FIN    4   /* TCP: a FIN went by in this direction (the agent's
                                 * garbage collection frees the flow sooner) */
#define MBPF_NS_CT_F_RST    8   /* TCP: a RST went by in this direction (a SYN
                                 * clears both: the tuple's next connection) */
#define MBPF_NS_CT_F_FIN_FIRST 16  /* TCP, SNAT: this direction's FIN came while the
                                    * other had none (it closed first; a SYN clears it) */

/* mbpf_ns_stats: per-CPU array of __u64 counters. */
#define MBPF_NS_NEW         0   /* new flow translated (DNAT, maybe SNAT) */
#define MBPF_NS_SNAT        1   /* of which also SNATed (remote backend) */
#define MBPF_NS_ESTABLISHED 2   /* packet of a known flow translated */
#define MBPF_NS_REPLY       3   /* reply reverse-translated */
#define MBPF_NS_REJECT      4   /* no endpoint (Cluster): TCP RST / ICMP unreachable sent */
#define MBPF_NS_DROP_LOCAL  5   /* no local endpoint (Local): dropped */
#define MBPF_NS_DROP_SRC    6   /* client not in loadBalancerSourceRanges: dropped */
#define MBPF_NS_DROP_NOSNAT 7   /* remote backend, no SNAT address or port: dropped
                                 * (every try of MBPF_NS_SNAT_PORT_TRIES taken) */
#define MBPF_NS_DROP_OTHER  8   /* no backend entry, unforwardable, cut headers: dropped */
#define MBPF_NS_ICMP_ERROR  9   /* ICMP error about a translated flow, translated back */
#define MBPF_NS_XDP_FWD     10  /* of the translated: sent on by XDP itself (XDP_TX / redirect) */
#define MBPF_NS_SNAT_RETRY  11  /* an SNAT port tried and skipped: its reply tuple is a live
                                 * conntrack entry's or a node socket's */
#define MBPF_NS_STAT_MAX    12

#endif /* MBPF_COMMON_H */
