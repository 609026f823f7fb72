/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-LB maps. All are pinned under MBPF_PIN_DIR (set by the loader) so
 * that they outlive the agent, and so that the CLI can read them.
 * Sizes come from the loader as -D flags; the defaults are for a large cluster.
 */
#ifndef MBPF_LB_MAPS_H
#define MBPF_LB_MAPS_H

#include "common.h"

#ifndef MBPF_PIN_DIR
#error "the loader sets MBPF_PIN_DIR to the bpffs folder"
#endif
#define MBPF_PIN(name) MBPF_PIN_DIR "/" #name

#ifndef MBPF_SVC_MAX
#define MBPF_SVC_MAX 65536
#endif
#ifndef MBPF_SLOT_MAX
#define MBPF_SLOT_MAX 262144
#endif
#ifndef MBPF_BACKEND_MAX
#define MBPF_BACKEND_MAX 131072
#endif
#ifndef MBPF_AFFINITY_MAX
#define MBPF_AFFINITY_MAX 65536
#endif
#ifndef MBPF_RNAT_MAX
#define MBPF_RNAT_MAX 131072
#endif
#ifndef MBPF_CONN_RNAT_MAX
#define MBPF_CONN_RNAT_MAX 65536
#endif
#ifndef MBPF_CONN_SLOT_MAX
#define MBPF_CONN_SLOT_MAX 131072  /* a power of two: a cookie's slot is its low bits */
#endif

/* (service address, port, protocol) -> service id and usable backend count.
 * Programs copy what they read from this map and mbpf_backends once: an
 * element may be reused for another key while they hold it (see sock_lb.c). */
BPF_TABLE_PINNED("hash", struct mbpf_svc_key, struct mbpf_svc, mbpf_svc,
		 MBPF_SVC_MAX, MBPF_PIN(mbpf_svc));
/* (service id, slot) -> backend id */
BPF_TABLE_PINNED("hash", struct mbpf_slot_key, struct mbpf_slot, mbpf_slots,
		 MBPF_SLOT_MAX, MBPF_PIN(mbpf_slots));
/* backend id -> backend address, port and protocol */
BPF_TABLE_PINNED("hash", __u32, struct mbpf_backend, mbpf_backends,
		 MBPF_BACKEND_MAX, MBPF_PIN(mbpf_backends));
/* (client netns, service id) -> backend chosen last, for sessionAffinity */
BPF_TABLE_PINNED("lru_hash", struct mbpf_aff_key, struct mbpf_aff, mbpf_affinity,
		 MBPF_AFFINITY_MAX, MBPF_PIN(mbpf_affinity));
/* (socket, backend) -> service address shown by recvmsg() and getpeername() */
BPF_TABLE_PINNED("lru_hash", struct mbpf_rnat_key, struct mbpf_rnat, mbpf_rnat,
		 MBPF_RNAT_MAX, MBPF_PIN(mbpf_rnat));

#ifndef MBPF_ROUTE_CNT_MAX
#define MBPF_ROUTE_CNT_MAX 16384
#endif
/* (split frontend's service id, backend id) -> connections, per CPU. The
 * agent creates an entry for each backend of a weighted split (a route);
 * the programs only count into entries that exist, so frontends without a
 * route cost one failed lookup and leave nothing behind. */
BPF_TABLE_PINNED("percpu_hash", struct mbpf_pick_key, __u64, mbpf_route_cnt,
		 MBPF_ROUTE_CNT_MAX, MBPF_PIN(mbpf_route_cnt));

/* MBPF_LB_* counters per CPU, summed by the metrics collector */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mbpf_lb_stats,
		 MBPF_LB_STAT_MAX, MBPF_PIN(mbpf_lb_stats));

#ifdef MBPF_HAVE_CONN_RNAT
/* connected socket's cookie -> the service its connect() was translated
 * from; mbpf_sock_release deletes the entry with the socket. A preallocated
 * hash entry spares connect() socket storage's two allocations and close()
 * its free (measured side by side: bench/README.md, "The connection table");
 * when it is full, socket storage takes over. */
BPF_TABLE_PINNED("hash", __u64, struct mbpf_sk_rnat, mbpf_conn_rnat,
		 MBPF_CONN_RNAT_MAX, MBPF_PIN(mbpf_conn_rnat));
#endif

#ifdef MBPF_HAVE_CONN_SLOTS
_Static_assert((MBPF_CONN_SLOT_MAX & (MBPF_CONN_SLOT_MAX - 1)) == 0,
	       "MBPF_CONN_SLOT_MAX must be a power of two");
/* cookie modulo the size -> that connected socket's reverse NAT. Where
 * compare-and-swap exists (5.12+) this replaces the hash above: claiming a
 * slot is one array lookup and a cmpxchg, releasing it one store, against
 * a hash insert and delete under the bucket lock (about 0.3 µs a
 * connection, bench/README.md). A slot held by a live socket sends a
 * colliding one to socket storage. mbpf_conn_rnat stays declared: entries
 * an earlier build wrote are read and deleted until their sockets go. */
BPF_TABLE_PINNED("array", __u32, struct mbpf_conn_slot, mbpf_conn_slot,
		 MBPF_CONN_SLOT_MAX, MBPF_PIN(mbpf_conn_slot));
#endif

#ifdef MBPF_HAVE_SK_STORAGE
/* socket -> the service its connect() was translated from; freed with the
 * socket. Spelled out because bcc's BPF_SK_STORAGE has no pinned form. */
struct mbpf_sk_rnat_table_t {
	int key;
	struct mbpf_sk_rnat leaf;
	void *(*sk_storage_get)(void *, void *, int);
	int (*sk_storage_delete)(void *);
	u32 flags;
};
__attribute__((section("maps/sk_storage:" MBPF_PIN(mbpf_sk_rnat))))
struct mbpf_sk_rnat_table_t mbpf_sk_rnat = { .flags = BPF_F_NO_PREALLOC };
BPF_ANNOTATE_KV_PAIR(mbpf_sk_rnat, int, struct mbpf_sk_rnat);
#endif

#endif /* MBPF_LB_MAPS_H */
