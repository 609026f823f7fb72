/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What bcc 0.26's helpers.h gets wrong or lacks, in one place.
 */
#ifndef MBPF_COMPAT_H
#define MBPF_COMPAT_H

/* helpers.h declares bpf_get_socket_cookie() as returning u32, which
 * truncates the 64-bit cookie; declare the helper with its real type. */
static __u64 (*mbpf_get_socket_cookie)(void *ctx) =
	(void *)BPF_FUNC_get_socket_cookie;

#ifdef MBPF_HAVE_SET_RETVAL
/* Kernel 5.18+: lets a cgroup hook choose the errno a refused call returns. */
static long (*mbpf_set_retval)(int retval) = (void *)BPF_FUNC_set_retval;
#endif

/* clang may merge two adjacent 32-bit context reads into one 64-bit read,
 * which the verifier rejects ("invalid bpf_context access") on user_ip6[]
 * and friends. A volatile 32-bit access keeps them apart. */
#define MBPF_CTX_READ32(field) (*(volatile __u32 *)&(field))
#define MBPF_CTX_WRITE32(field, v) (*(volatile __u32 *)&(field) = (v))

/* Not defined in bcc's C environment. */
#define MBPF_ECONNREFUSED 111
#define MBPF_NSEC_PER_SEC 1000000000ULL

#endif /* MBPF_COMPAT_H */
