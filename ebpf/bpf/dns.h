/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The DNS fast path's maps, as the kernel program and the Rust loader both see them.
 * ebpf/src/dns.rs defines the same structs with #[repr(C)]; ebpf/tests/layout.rs reads this
 * object's BTF and fails if a size or an offset differs.
 */
#ifndef GARDENER_AGENTS_DNS_H
#define GARDENER_AGENTS_DNS_H

#include <linux/types.h>

/* Longest qname mirrored, in wire form with the root label: longer names stay in userspace. */
#define DNS_NAME_MAX 128
/* Largest response body mirrored (everything after the question, OPT excluded). */
#define DNS_BODY_MAX 512
/* Most records per mirrored response (one TTL field each). */
#define DNS_TTLS_MAX 32
/* Zones whose hits are counted apart (`dns_zone_hits` holds a success and a denial counter
 * per zone, at 2 * zone + denial). */
#define DNS_ZONES_MAX 64

/* The cache key, as node-local-dns's cache::Key: the lower-cased qname, qtype, qclass and the
 * DO and CD bits. Unused name bytes are zero. */
struct dns_key {
	__u8 name[DNS_NAME_MAX];
	__u8 qtype[2];  /* network byte order */
	__u8 qclass[2]; /* network byte order */
	__u8 flags;     /* DNS_KEY_DO | DNS_KEY_CD */
	__u8 pad[3];
};

#define DNS_KEY_DO 0x01
#define DNS_KEY_CD 0x02

/* A cached response without its header's ID and flags, its question and its OPT: the reply
 * is the query's own header and question followed by `body`, with every TTL set to the
 * remaining lifetime. */
struct dns_entry {
	__u64 expires_ns;       /* CLOCK_MONOTONIC (bpf_ktime_get_ns); not answered from then on */
	__u16 flags;            /* the stored header's flags: rcode (low 4 bits) and AD are used */
	__u16 counts[3];        /* ANCOUNT, NSCOUNT, ARCOUNT, network byte order */
	__u16 question_len;     /* qname + qtype + qclass, must equal the query's */
	__u16 body_len;         /* bytes of `body` in use, 1..=DNS_BODY_MAX */
	__u16 ttl_count;        /* entries of `ttl_offsets` in use */
	__u8 zone;              /* the owner's zone index (< DNS_ZONES_MAX): where hits are counted */
	__u8 denial;            /* 1 for NXDOMAIN/NODATA (the owner's denial cache), else 0 */
	__u16 ttl_offsets[DNS_TTLS_MAX]; /* offset of each TTL field in `body` */
	__u8 body[DNS_BODY_MAX];
};

/* A local address and port the fast path answers for (node-local-dns's listen IPs). IPv4 uses
 * the first 4 bytes of `addr`. */
struct dns_local {
	__u8 addr[16];
	__u8 port[2]; /* network byte order */
	__u8 family;  /* 4 or 6 */
	__u8 pad;
};

/* Per-CPU counters (the `dns_stats` array), by index. */
enum dns_stat {
	DNS_STAT_HIT = 0,          /* answered in the kernel */
	DNS_STAT_MISS = 1,         /* a query we could answer, but no entry */
	DNS_STAT_EXPIRED = 2,      /* an entry, but past its lifetime */
	DNS_STAT_NOT_LOCAL = 3,    /* not UDP to a local address and port (not for us at all) */
	DNS_STAT_UNSUPPORTED = 4,  /* for us, but left to userspace: flags, counts, EDNS, names */
	DNS_STAT_MALFORMED = 5,    /* for us, but truncated or inconsistent */
	DNS_STAT_TOO_BIG = 6,      /* the reply would exceed the client's UDP size */
	DNS_STAT_ERROR = 7,        /* a helper failed (packet resize) */
	DNS_STAT_COUNT = 8,
};

#endif
