/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south maps, pinned under MBPF_PIN_DIR so that translation and the
 * connection tracking outlive the agent. Layouts: the "North-south" sections
 * of common.h. Sizes come from the loader as -D flags.
 */
#ifndef MBPF_NS_MAPS_H
#define MBPF_NS_MAPS_H

#include "common.h"

#ifndef MBPF_PIN_DIR
#error "the loader sets MBPF_PIN_DIR to the bpffs folder"
#endif
#ifndef MBPF_PIN
#define MBPF_PIN(name) MBPF_PIN_DIR "/" #name
#endif

#ifndef MBPF_NS_SVC_MAX
#define MBPF_NS_SVC_MAX 65536
#endif
#ifndef MBPF_NS_BE_MAX
#define MBPF_NS_BE_MAX 65536
#endif
#ifndef MBPF_NS_SRC_MAX
#define MBPF_NS_SRC_MAX 16384
#endif
#ifndef MBPF_NS_ADDR_MAX
#define MBPF_NS_ADDR_MAX 256
#endif
#ifndef MBPF_NS_CT_MAX
#define MBPF_NS_CT_MAX 131072
#endif

/* frontend (address or wildcard, port, protocol) -> table, count, source ranges */
BPF_TABLE_PINNED("hash", struct mbpf_ns_key, struct mbpf_ns_svc, mbpf_ns_svc,
		 MBPF_NS_SVC_MAX, MBPF_PIN(mbpf_ns_svc));
/* backend id -> address, port, on this node or not */
BPF_TABLE_PINNED("hash", __u32, struct mbpf_ns_backend, mbpf_ns_be,
		 MBPF_NS_BE_MAX, MBPF_PIN(mbpf_ns_be));
/* MBPF_NS_TABLE_MAX Maglev rows of MBPF_MAGLEV_M backend ids */
BPF_TABLE_PINNED("array", __u32, __u32, mbpf_maglev,
		 MBPF_NS_TABLE_MAX * MBPF_MAGLEV_M, MBPF_PIN(mbpf_maglev));
/* (source-range id, client prefix) -> 1 */
BPF_TABLE_PINNED("lpm_trie", struct mbpf_ns_src_key, __u32, mbpf_ns_src,
		 MBPF_NS_SRC_MAX, MBPF_PIN(mbpf_ns_src), MBPF_F_NO_PREALLOC);
/* the node's own addresses (where NodePorts answer) -> 1 */
BPF_TABLE_PINNED("hash", struct mbpf_ep_addr, __u32, mbpf_ns_addr,
		 MBPF_NS_ADDR_MAX, MBPF_PIN(mbpf_ns_addr));
/* key 0: SNAT addresses, on/off */
BPF_TABLE_PINNED("array", __u32, struct mbpf_ns_cfg, mbpf_ns_cfg,
		 1, MBPF_PIN(mbpf_ns_cfg));
/* both directions of every translated flow; LRU eviction is the garbage collection */
BPF_TABLE_PINNED("lru_hash", struct mbpf_ns_ct_key, struct mbpf_ns_ct, mbpf_ns_ct,
		 MBPF_NS_CT_MAX, MBPF_PIN(mbpf_ns_ct));
/* ns_claim_rev()'s scratch (the XDP program's stack is full); not pinned */
struct ns_claim_scratch {
	struct mbpf_ns_ct_key fk;     /* ns_take_over(): the other flow's FWD key */
	struct bpf_sock_tuple t;      /* ns_node_socket(): the reply tuple */
};
BPF_PERCPU_ARRAY(mbpf_ns_claim, struct ns_claim_scratch, 1);
/* MBPF_NS_* counters, per CPU */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mbpf_ns_stats,
		 MBPF_NS_STAT_MAX, MBPF_PIN(mbpf_ns_stats));

#endif /* MBPF_NS_MAPS_H */
