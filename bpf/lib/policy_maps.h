/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * NetworkPolicy maps, pinned under MBPF_PIN_DIR like the socket-LB maps, so
 * that the tc programs keep enforcing while no agent runs. Layouts: the
 * "NetworkPolicy" section of common.h. Sizes come from the loader as -D flags.
 */
#ifndef MBPF_POLICY_MAPS_H
#define MBPF_POLICY_MAPS_H

#include "common.h"

#ifndef MBPF_PIN_DIR
#error "the loader sets MBPF_PIN_DIR to the bpffs folder"
#endif
#ifndef MBPF_PIN
#define MBPF_PIN(name) MBPF_PIN_DIR "/" #name
#endif

#ifndef MBPF_POL_EP_MAX
#define MBPF_POL_EP_MAX 4096
#endif
#ifndef MBPF_POL_EPADDR_MAX
#define MBPF_POL_EPADDR_MAX 8192
#endif
#ifndef MBPF_POL_PEER_MAX
#define MBPF_POL_PEER_MAX 262144
#endif
#ifndef MBPF_POL_PORT_MAX
#define MBPF_POL_PORT_MAX 262144
#endif
#ifndef MBPF_CT_MAX
#define MBPF_CT_MAX 262144
#endif

/* host-side ifindex -> endpoint id, generation in force, isolation flags */
BPF_TABLE_PINNED("hash", __u32, struct mbpf_ep, mbpf_pol_ep,
		 MBPF_POL_EP_MAX, MBPF_PIN(mbpf_pol_ep));
/* pod address -> the endpoint that owns it (anti-spoofing) */
BPF_TABLE_PINNED("hash", struct mbpf_ep_addr, __u32, mbpf_pol_epaddr,
		 MBPF_POL_EPADDR_MAX, MBPF_PIN(mbpf_pol_epaddr));
/* (endpoint, generation, direction, peer prefix) -> peer set */
BPF_TABLE_PINNED("lpm_trie", struct mbpf_pol_peer_key, struct mbpf_pol_peer, mbpf_pol_peer,
		 MBPF_POL_PEER_MAX, MBPF_PIN(mbpf_pol_peer), MBPF_F_NO_PREALLOC);
/* (endpoint, generation, direction, protocol, peer set, port prefix) -> rule */
BPF_TABLE_PINNED("lpm_trie", struct mbpf_pol_port_key, struct mbpf_pol_port, mbpf_pol_port,
		 MBPF_POL_PORT_MAX, MBPF_PIN(mbpf_pol_port), MBPF_F_NO_PREALLOC);
/* flows seen and allowed, per endpoint and direction (replies pass) */
BPF_TABLE_PINNED("lru_hash", struct mbpf_ct_key, struct mbpf_ct, mbpf_ct,
		 MBPF_CT_MAX, MBPF_PIN(mbpf_ct));
/* MBPF_POL_* and MBPF_DROP_* counters, per CPU */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mbpf_pol_stats,
		 MBPF_POL_STAT_MAX, MBPF_PIN(mbpf_pol_stats));

/* mbpf_pol_cfg (the events switch) and mbpf_events: shared with sock_lb.c */
#include "policy_events.h"

#endif /* MBPF_POLICY_MAPS_H */
