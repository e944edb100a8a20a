// SPDX-License-Identifier: Apache-2.0
/*
 * Sockets spliced in the kernel for sni-proxy: once a connection is routed, the bytes that
 * arrive on the client's socket leave on the backend's socket and the other way round,
 * without waking the proxy.
 *
 * Two socket hashes, both keyed by a socket's cookie (SO_COOKIE, unique per boot):
 *
 *   splice_peer[cookie of S] = the socket S's bytes go to. No program is attached here, so a
 *       socket in this map only is a redirect target and nothing else changes for it.
 *   splice_src[cookie of S]  = S itself. splice_verdict is attached here (stream verdict, no
 *       stream parser: every skb as it arrives), so inserting S here is what starts S's
 *       redirection.
 *
 * The loader puts both sockets into splice_peer before either goes into splice_src, so a
 * verdict always finds its peer. If it does not (the peer was closed and the kernel removed
 * it), the skb is passed to the socket's own receive queue, where the proxy sees it, instead
 * of being dropped after TCP acknowledged it.
 *
 * The redirect has no BPF_F_INGRESS: the bytes go out of the peer (its send path), as a proxy
 * forwards them, not into its receive queue.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "splice.h"

char LICENSE[] SEC("license") = "Apache-2.0";

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536); /* the loader sets the size */
	__type(key, __u64);
	__type(value, __u32); /* a socket descriptor when written from userspace */
} splice_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536); /* the loader sets the size */
	__type(key, __u64);
	__type(value, __u32);
} splice_src SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SPLICE_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} splice_stats SEC(".maps");

static __always_inline void count(__u32 stat, __u64 n)
{
	__u64 *value = bpf_map_lookup_elem(&splice_stats, &stat);

	if (value)
		*value += n;
}

SEC("sk_skb/stream_verdict")
int splice_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u64 len = skb->len;

	if (bpf_sk_redirect_hash(skb, &splice_peer, &cookie, 0) == SK_PASS) {
		count(SPLICE_STAT_REDIRECTED_SKBS, 1);
		count(SPLICE_STAT_REDIRECTED_BYTES, len);
		return SK_PASS;
	}
	count(SPLICE_STAT_NO_PEER_SKBS, 1);
	count(SPLICE_STAT_NO_PEER_BYTES, len);
	return SK_PASS;
}
