"""The numbers meshbpf passes to bpf() and libbpf, from the kernel's
uapi/linux/bpf.h (enum bpf_prog_type, bpf_map_type, bpf_attach_type,
bpf_link_type, bpf_func_id): the one place they are written; the loader,
the feature probes and the map reader name them from here."""

PROG_TYPE = {"cgroup_sock": 9, "sock_ops": 13, "sk_msg": 16, "raw_tracepoint": 17,
             "cgroup_sock_addr": 18, "cgroup_sockopt": 25}

MAP_TYPE = {"hash": 1, "array": 2, "percpu_hash": 5, "percpu_array": 6, "lru_hash": 9,
            "lru_percpu_hash": 10, "lpm_trie": 11, "sockmap": 15, "sockhash": 18, "percpu_cgroup_storage": 21,
            "sk_storage": 24, "ringbuf": 27}

LINK_TYPE = {"raw_tracepoint": 1, "cgroup": 3}

ATTACH = {
    "sock_ops": 3, "sk_msg_verdict": 7,
    "connect4": 10, "connect6": 11, "sendmsg4": 14, "sendmsg6": 15,
    "recvmsg4": 19, "recvmsg6": 20, "getsockopt": 21, "setsockopt": 22,
    "getpeername4": 29, "getpeername6": 30, "getsockname4": 31, "getsockname6": 32,
    "sock_release": 34,
}

# enum bpf_func_id
HELPER = {
    "get_socket_cookie": 46, "get_netns_cookie": 122, "set_retval": 187,
    "sk_storage_get": 107, "sock_hash_update": 70, "msg_redirect_hash": 71,
    "probe_read_kernel": 113, "sock_ops_cb_flags_set": 59, "getsockopt": 57,
    "get_current_uid_gid": 15, "get_current_ancestor_cgroup_id": 123,
}
