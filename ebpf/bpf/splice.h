/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The socket splice's counters, as the kernel program and the Rust loader (ebpf/src/sockmap.rs,
 * `Stat`) both number them; a test there checks the object's splice_stats map has this many.
 */
#ifndef GARDENER_AGENTS_SPLICE_H
#define GARDENER_AGENTS_SPLICE_H

/* Indexes into the per-CPU array splice_stats. */
enum splice_stat {
	/* skbs (and their payload bytes) sent on to the peer socket */
	SPLICE_STAT_REDIRECTED_SKBS,
	SPLICE_STAT_REDIRECTED_BYTES,
	/* skbs whose socket had no peer in splice_peer: left to the socket's own reader */
	SPLICE_STAT_NO_PEER_SKBS,
	SPLICE_STAT_NO_PEER_BYTES,
	SPLICE_STAT_COUNT,
};

#endif
