/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Sidecar capture maps (issue 11), pinned under MBPF_PIN_DIR like the
 * socket-LB maps. The settings maps (pod, addr, cidr, port, cfg) are the
 * agent's; the connection records (orig, pair) are the kernel's own.
 * Layouts: bpf/lib/common.h, section "Sidecar capture".
 */
#ifndef MBPF_CAPTURE_MAPS_H
#define MBPF_CAPTURE_MAPS_H

#include "common.h"

#ifndef MBPF_PIN
#define MBPF_PIN(name) MBPF_PIN_DIR "/" #name
#endif

#ifndef MBPF_CAP_POD_MAX
#define MBPF_CAP_POD_MAX 4096
#endif
#ifndef MBPF_CAP_ADDR_MAX
#define MBPF_CAP_ADDR_MAX 8192
#endif
#ifndef MBPF_CAP_CIDR_MAX
#define MBPF_CAP_CIDR_MAX 65536
#endif
#ifndef MBPF_CAP_PORT_MAX
#define MBPF_CAP_PORT_MAX 65536
#endif
#ifndef MBPF_CAP_ORIG_MAX
#define MBPF_CAP_ORIG_MAX 65536
#endif
#ifndef MBPF_CAP_PAIR_MAX
#define MBPF_CAP_PAIR_MAX 65536
#endif

/* pod cgroup id -> the pod's capture settings */
BPF_TABLE_PINNED("hash", __u64, struct mbpf_cap_pod, mbpf_cap_pod,
		 MBPF_CAP_POD_MAX, MBPF_PIN(mbpf_cap_pod));
/* meshed pod address -> its cgroup id (inbound capture) */
BPF_TABLE_PINNED("hash", struct mbpf_ep_addr, __u64, mbpf_cap_addr,
		 MBPF_CAP_ADDR_MAX, MBPF_PIN(mbpf_cap_addr));
/* (pod, destination prefix) -> outbound include / exclude */
BPF_TABLE_PINNED("lpm_trie", struct mbpf_cap_cidr_key, struct mbpf_cap_verdict, mbpf_cap_cidr,
		 MBPF_CAP_CIDR_MAX, MBPF_PIN(mbpf_cap_cidr), MBPF_F_NO_PREALLOC);
/* (pod, port, direction) -> include / exclude */
BPF_TABLE_PINNED("hash", struct mbpf_cap_port_key, struct mbpf_cap_verdict, mbpf_cap_port,
		 MBPF_CAP_PORT_MAX, MBPF_PIN(mbpf_cap_port));
/* captured socket (cookie) -> original destination, until established */
BPF_TABLE_PINNED("lru_hash", __u64, struct mbpf_cap_orig, mbpf_cap_orig,
		 MBPF_CAP_ORIG_MAX, MBPF_PIN(mbpf_cap_orig));
/* the connection as the proxy sees it -> original destination */
BPF_TABLE_PINNED("lru_hash", struct mbpf_cap_pair_key, struct mbpf_cap_orig, mbpf_cap_pair,
		 MBPF_CAP_PAIR_MAX, MBPF_PIN(mbpf_cap_pair));
/* key 0: how many pods are meshed; 0 turns every capture lookup off */
BPF_TABLE_PINNED("array", __u32, struct mbpf_cap_cfg, mbpf_cap_cfg,
		 1, MBPF_PIN(mbpf_cap_cfg));
/* MBPF_CAP_* counters, per CPU */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mbpf_cap_stats,
		 MBPF_CAP_STAT_MAX, MBPF_PIN(mbpf_cap_stats));

#endif /* MBPF_CAPTURE_MAPS_H */
