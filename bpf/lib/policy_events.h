/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Flow events for `meshbpf monitor`: the on/off switch (mbpf_pol_cfg) and
 * the ring buffer (mbpf_events), shared by the policy programs (policy.c:
 * verdicts and drops) and the socket-LB ones (sock_lb.c: translations).
 * Both modules declare the same pinned maps; whichever compiles first
 * creates them, the other reopens them. Records: the "Flow event" structs
 * of common.h, told apart by their kind byte.
 *
 * Events are emitted only while a reader has set mbpf_pol_cfg.events:
 * nobody listening costs one array lookup per new flow, drop or
 * translation.
 */
#ifndef MBPF_POLICY_EVENTS_H
#define MBPF_POLICY_EVENTS_H

#include "common.h"

#ifndef MBPF_PIN_DIR
#error "the loader sets MBPF_PIN_DIR to the bpffs folder"
#endif
#ifndef MBPF_PIN
#define MBPF_PIN(name) MBPF_PIN_DIR "/" #name
#endif

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

/* Is a reader listening? */
static __always_inline int events_wanted(void)
{
	__u32 zero = 0;
	struct mbpf_pol_cfg *cfg = mbpf_pol_cfg.lookup(&zero);

	return cfg && cfg->events;
}

#endif /* MBPF_POLICY_EVENTS_H */
