/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Same-node socket redirection maps, pinned under MBPF_PIN_DIR like the
 * socket-LB maps. The sockhash must stay pinned: the sk_msg program is
 * detached when the last reference to its map goes.
 */
#ifndef MBPF_REDIR_MAPS_H
#define MBPF_REDIR_MAPS_H

#include "common.h"

#ifndef MBPF_SOCKHASH_MAX
#define MBPF_SOCKHASH_MAX 65536
#endif
#ifndef MBPF_SOCKSTATE_MAX
#define MBPF_SOCKSTATE_MAX 131072
#endif
#ifndef MBPF_LISTENERS_MAX
#define MBPF_LISTENERS_MAX 16384
#endif
#ifndef MBPF_SPIN_MAX
#define MBPF_SPIN_MAX 65536
#endif
#ifndef MBPF_CIDR_MAX
#define MBPF_CIDR_MAX 1024
#endif

/* socket tuple -> socket: the sockets that may be spliced. Spelled out
 * because bcc's BPF_SOCKHASH has no pinned form and BPF_TABLE_PINNED lacks
 * the sockhash methods. */
struct mbpf_sockhash_table_t {
	struct mbpf_sock_key key;
	int leaf;
	int (*update)(struct mbpf_sock_key *, int *);
	int (*delete)(struct mbpf_sock_key *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" MBPF_PIN(mbpf_sockhash))))
struct mbpf_sockhash_table_t mbpf_sockhash = { .max_entries = MBPF_SOCKHASH_MAX };
BPF_ANNOTATE_KV_PAIR(mbpf_sockhash, struct mbpf_sock_key, int);
/* socket tuple -> redirection state of that socket */
BPF_TABLE_PINNED("lru_hash", struct mbpf_sock_key, struct mbpf_sockstate, mbpf_sockstate,
		 MBPF_SOCKSTATE_MAX, MBPF_PIN(mbpf_sockstate));
/* (netns, port) -> kernel address of the socket listening there; filled on
 * listen(), emptied when it closes (LRU: a listener closed while the sockops
 * program was detached leaves its entry behind) */
BPF_TABLE_PINNED("lru_hash", struct mbpf_listen_key, __u64, mbpf_listeners,
		 MBPF_LISTENERS_MAX, MBPF_PIN(mbpf_listeners));
/* kernel address of a spliced socket -> how its reader polls (struct
 * mbpf_spin): sockops adds the socket when it joins the sockhash and drops
 * it when it leaves or closes, the recv tracepoint counts its empty reads,
 * sk_msg reads them before each splice into it. Only kept with MBPF_SPIN. */
BPF_TABLE_PINNED("lru_hash", __u64, struct mbpf_spin, mbpf_spin,
		 MBPF_SPIN_MAX, MBPF_PIN(mbpf_spin));
/* pod CIDRs: with require_cidr, both ends must match one */
BPF_TABLE_PINNED("lpm_trie", struct mbpf_cidr_key, __u8, mbpf_redir_cidr,
		 MBPF_CIDR_MAX, MBPF_PIN(mbpf_redir_cidr), MBPF_F_NO_PREALLOC);
/* key 0: the redirection settings */
BPF_TABLE_PINNED("array", __u32, struct mbpf_redir_cfg, mbpf_redir_cfg,
		 1, MBPF_PIN(mbpf_redir_cfg));
/* MBPF_CNT_* counters, per CPU */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, mbpf_redir_cnt,
		 MBPF_CNT_MAX, MBPF_PIN(mbpf_redir_cnt));

#endif /* MBPF_REDIR_MAPS_H */
