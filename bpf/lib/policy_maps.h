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

/* key 0: policy settings (whether to emit events) */
BPF_TABLE_PINNED("array", __u32, struct mbpf_pol_cfg, mbpf_pol_cfg,
		 1, MBPF_PIN(mbpf_pol_cfg));

#ifdef MBPF_HAVE_RINGBUF
#ifndef MBPF_EVENTS_BYTES
#define MBPF_EVENTS_BYTES (256 * 1024)
#endif
/* flow events for `meshbpf monitor`. Spelled out because bcc's
 * BPF_RINGBUF_OUTPUT has no pinned form. */
struct mbpf_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" MBPF_PIN(mbpf_events))))
struct mbpf_events_table_t mbpf_events = { .max_entries = MBPF_EVENTS_BYTES };
BPF_ANNOTATE_KV_PAIR(mbpf_events, int, u32);
#endif

#endif /* MBPF_POLICY_MAPS_H */
