// SPDX-License-Identifier: Apache-2.0
/*
 * DNS cache hits answered in the kernel, at XDP (dns_xdp) or tc ingress (dns_tc).
 *
 * node-local-dns mirrors its cacheable answers into `dns_cache` (keyed as its own cache is)
 * and its listen addresses into `dns_locals`. A standard query with one question, sent over
 * UDP to one of those addresses, whose entry is live and whose reply fits the client's UDP
 * size, is rewritten in place into the reply that node-local-dns would send (docs/ebpf.md
 * says what may differ: nothing but the TTLs) and sent back out the interface it came in on.
 * Everything else is passed to the stack untouched, and counted in `dns_stats` by reason.
 *
 * The reply: the query's ID and question bytes kept exactly as they came (DNS 0x20 mixed
 * case included); flags QR, AA, RA, RD and CD copied, AD only if the entry had it and the
 * query asked with AD or DO, rcode from the entry; the entry's records with every TTL set to
 * the whole seconds left; an OPT (our UDP size, version 0, DO copied, no options) iff the
 * query had one. MAC, IP addresses and UDP ports swapped, IPv4 header checksum and UDP
 * checksum (both families) computed from scratch: a packet from a pod's veth may carry only a
 * partial checksum, so nothing is derived from the query's.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "dns.h"


char LICENSE[] SEC("license") = "Apache-2.0";

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240); /* the loader sets the size */
	__type(key, struct dns_key);
	__type(value, struct dns_entry);
} dns_cache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct dns_local);
	__type(value, __u32);
} dns_locals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DNS_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} dns_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * DNS_ZONES_MAX);
	__type(key, __u32);
	__type(value, __u64);
} dns_zone_hits SEC(".maps");

#define DNS_HEADER_LEN 12
#define DNS_OPT_LEN 11
#define DNS_TYPE_OPT 41
#define OUR_UDP_SIZE 1232
#define CLASSIC_UDP_SIZE 512
#define MAX_TTL 0x7fffffffULL
#define NS_PER_SEC 1000000000ULL
#define MAX_EDNS_OPTIONS 8
/* UDP header + the largest reply we build, in 16-bit words (checksum loop bound). */
#define MAX_UDP_WORDS ((8 + DNS_HEADER_LEN + DNS_NAME_MAX + 4 + DNS_BODY_MAX + DNS_OPT_LEN + 1) / 2)

#define FLAG_QR 0x8000
#define FLAG_OPCODE 0x7800
#define FLAG_AA 0x0400
#define FLAG_TC 0x0200
#define FLAG_RD 0x0100
#define FLAG_RA 0x0080
#define FLAG_AD 0x0020
#define FLAG_CD 0x0010
#define FLAG_RCODE 0x000f

/* A query the fast path may answer: where its parts are and what the reply needs. */
struct query {
	__u32 dns_off;
	__u32 question_len;
	__u16 id;     /* network byte order, copied as is */
	__u16 flags;  /* host byte order */
	__u16 limit;  /* the largest reply the client accepts */
	__u8 ipv6;
	__u8 edns;
	__u8 dnssec_ok;
};

/* What the rewrite needs from the entry. */
struct reply {
	__u32 dns_len;
	__u32 body_len;
	__u32 ttl_be;
	__u8 header[DNS_HEADER_LEN];
};

/* Hides `v` from the compiler so that a range check on it survives into the object, where the
 * verifier needs it (clang would drop a check it can prove redundant). */
#define opaque(v) asm volatile("" : "+r"(v))

/* Per-CPU scratch space for one packet's query, key and reply. Kept in a map rather than on
 * the stack so that the verifier forgets, once parsing is done, which of the many ways
 * through the name parser a packet took: otherwise it would check the rewrite once per
 * possible name length and give up. */
struct scratch {
	struct query q;
	struct dns_key key;
	struct reply r;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} dns_scratch SEC(".maps");

/* The scratch space, its key zeroed; NULL only if the map is broken. */
static __always_inline struct scratch *scratch(void)
{
	__u32 zero = 0;
	struct scratch *s = bpf_map_lookup_elem(&dns_scratch, &zero);

	if (s)
		__builtin_memset(&s->key, 0, sizeof(s->key));
	return s;
}

/* Makes the compiler reload everything from memory (the scratch map) after this point. */
#define forget() asm volatile("" ::: "memory")

static __always_inline void count(__u32 stat)
{
	__u64 *value = bpf_map_lookup_elem(&dns_stats, &stat);

	if (value)
		*value += 1;
}

/* A hit: counted overall and for the entry's zone and cache (success or denial). */
static __always_inline void count_hit(const struct dns_entry *e)
{
	__u32 slot = 2 * (e->zone % DNS_ZONES_MAX) + (e->denial ? 1 : 0);
	__u64 *value = bpf_map_lookup_elem(&dns_zone_hits, &slot);

	if (value)
		*value += 1;
	count(DNS_STAT_HIT);
}

static __always_inline __u16 load16(const __u8 *p)
{
	return ((__u16)p[0] << 8) | p[1];
}

/* Lower-cases the ASCII letters of 8 bytes at once (a byte is upper case if its low 7 bits are
 * in 'A'..'Z' and its top bit is clear). */
static __always_inline __u64 lower8(__u64 w)
{
	const __u64 ones = 0x0101010101010101ULL;
	__u64 low7 = w & (0x7f * ones);
	__u64 from_a = low7 + (0x80 - 'A') * ones; /* top bit set where low7 >= 'A' */
	__u64 past_z = low7 + (0x7f - 'Z') * ones; /* top bit set where low7 > 'Z' */
	__u64 upper = (from_a ^ past_z) & ~w & (0x80 * ones);
	return w | (upper >> 2);
}

/*
 * Reads a query from the packet into `q` and its cache key into `key` (zeroed by the caller).
 * Returns DNS_STAT_HIT if it is one the fast path may answer, otherwise the reason to pass it.
 * `xdp` says what `ctx` is (inlined with a constant, so each program gets its own copy).
 */
static __always_inline int parse(void *ctx, int xdp, void *data, void *data_end, struct query *q,
				 struct dns_key *key)
{
	struct ethhdr *eth = data;
	struct dns_local local = {};
	__u32 udp_len;
	struct udphdr *udp;

	if ((void *)(eth + 1) > data_end)
		return DNS_STAT_NOT_LOCAL;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP)
			return DNS_STAT_NOT_LOCAL;
		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end)
			return DNS_STAT_NOT_LOCAL;
		local.family = 4;
		__builtin_memcpy(local.addr, &ip->daddr, 4);
		__builtin_memcpy(local.port, &udp->dest, 2);
		if (!bpf_map_lookup_elem(&dns_locals, &local))
			return DNS_STAT_NOT_LOCAL;
		/* IP options or a fragment: the UDP header is elsewhere or the message partial. */
		if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
			return DNS_STAT_UNSUPPORTED;
		udp_len = bpf_ntohs(udp->len);
		if (udp_len + sizeof(*ip) > bpf_ntohs(ip->tot_len))
			return DNS_STAT_MALFORMED;
		q->ipv6 = 0;
		q->dns_off = sizeof(*eth) + sizeof(*ip) + sizeof(*udp);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		/* Extension headers are left to the stack. */
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_UDP)
			return DNS_STAT_NOT_LOCAL;
		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > data_end)
			return DNS_STAT_NOT_LOCAL;
		local.family = 6;
		__builtin_memcpy(local.addr, &ip6->daddr, 16);
		__builtin_memcpy(local.port, &udp->dest, 2);
		if (!bpf_map_lookup_elem(&dns_locals, &local))
			return DNS_STAT_NOT_LOCAL;
		udp_len = bpf_ntohs(udp->len);
		if (udp_len > bpf_ntohs(ip6->payload_len))
			return DNS_STAT_MALFORMED;
		q->ipv6 = 1;
		q->dns_off = sizeof(*eth) + sizeof(*ip6) + sizeof(*udp);
	} else {
		/* VLAN tags, ARP, everything else. */
		return DNS_STAT_NOT_LOCAL;
	}
	if (udp_len < sizeof(*udp) + DNS_HEADER_LEN || udp_len > sizeof(*udp) + 4096)
		return DNS_STAT_MALFORMED;
	/* The message ends where the UDP length says; link-layer padding may follow. */
	__u32 dns_end = q->dns_off + udp_len - sizeof(*udp);
	if (data + dns_end > data_end)
		return DNS_STAT_MALFORMED;

	__u8 *dns = data + q->dns_off;
	if ((void *)(dns + DNS_HEADER_LEN) > data_end)
		return DNS_STAT_MALFORMED;
	q->id = *(__u16 *)dns;
	q->flags = load16(dns + 2);
	if (q->flags & (FLAG_QR | FLAG_OPCODE | FLAG_TC))
		return DNS_STAT_UNSUPPORTED;
	__u16 arcount = load16(dns + 10);
	if (load16(dns + 4) != 1 || load16(dns + 6) != 0 || load16(dns + 8) != 0 || arcount > 1)
		return DNS_STAT_UNSUPPORTED;

	/* The qname: plain labels (a query has no compression pointers). Find its end... */
	__u8 *name = dns + DNS_HEADER_LEN;
	__u32 name_len = 0, pos = 0;
#pragma clang loop unroll(disable)
	for (int label = 0; label < DNS_NAME_MAX / 2; label++) {
		__u8 *len = name + (pos & (DNS_NAME_MAX - 1));
		if ((void *)(len + 1) > data_end)
			return DNS_STAT_MALFORMED;
		if (*len == 0) {
			name_len = pos + 1;
			break;
		}
		if (*len > 63)
			return DNS_STAT_UNSUPPORTED;
		pos += 1 + *len;
		if (pos >= DNS_NAME_MAX)
			return DNS_STAT_UNSUPPORTED; /* longer than we mirror */
	}
	if (name_len == 0)
		return DNS_STAT_UNSUPPORTED;
	/* ...and go on from memory: the verifier then checks what follows once, not once per
	 * way through the loop above. */
	q->question_len = name_len + 4;
	forget();
	__u64 qname_len = q->question_len - 4;
	opaque(qname_len);
	if (qname_len == 0 || qname_len > DNS_NAME_MAX)
		return DNS_STAT_ERROR;
	__u32 name_off = q->dns_off + DNS_HEADER_LEN;
	long copied = xdp ? bpf_xdp_load_bytes(ctx, name_off, key->name, qname_len)
			  : bpf_skb_load_bytes(ctx, name_off, key->name, qname_len);
	if (copied)
		return DNS_STAT_MALFORMED;
	__u64 *words = (__u64 *)key->name;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < DNS_NAME_MAX / 8; i++) {
		if (i * 8 >= qname_len)
			break;
		words[i] = lower8(words[i]);
	}

	pos = q->dns_off + DNS_HEADER_LEN + (__u32)qname_len;
	__u8 *tail = data + (pos & 0x1fff);
	if ((void *)(tail + 4) > data_end)
		return DNS_STAT_MALFORMED;
	__builtin_memcpy(key->qtype, tail, 2);
	__builtin_memcpy(key->qclass, tail + 2, 2);

	pos += 4;
	q->edns = 0;
	q->dnssec_ok = 0;
	q->limit = CLASSIC_UDP_SIZE;
	if (arcount == 1) {
		__u8 *opt = data + (pos & 0x1fff);
		if ((void *)(opt + DNS_OPT_LEN) > data_end)
			return DNS_STAT_MALFORMED;
		if (opt[0] != 0 || load16(opt + 1) != DNS_TYPE_OPT)
			return DNS_STAT_MALFORMED;
		/* EDNS version > 0 gets BADVERS from userspace. */
		if (opt[6] != 0)
			return DNS_STAT_UNSUPPORTED;
		__u16 size = load16(opt + 3);
		q->limit = size < CLASSIC_UDP_SIZE ? CLASSIC_UDP_SIZE : size > OUR_UDP_SIZE ? OUR_UDP_SIZE : size;
		q->edns = 1;
		q->dnssec_ok = (opt[7] & 0x80) != 0;
		__u32 at = pos + DNS_OPT_LEN, end = at + load16(opt + 9);
		if (end != dns_end)
			return DNS_STAT_MALFORMED;
		/* Options (cookies, padding) are not echoed, as in userspace, but must be well formed. */
#pragma clang loop unroll(disable)
		for (int i = 0; i < MAX_EDNS_OPTIONS && at < end; i++) {
			__u8 *option = data + (at & 0x1fff); /* below 8 KiB: dns_end is */
			if ((void *)(option + 4) > data_end)
				return DNS_STAT_MALFORMED;
			at += 4 + load16(option + 2);
		}
		if (at > end)
			return DNS_STAT_MALFORMED;
		if (at < end)
			return DNS_STAT_UNSUPPORTED;
	} else if (pos != dns_end) {
		return DNS_STAT_MALFORMED;
	}
	key->flags = (q->dnssec_ok ? DNS_KEY_DO : 0) | (q->flags & FLAG_CD ? DNS_KEY_CD : 0);
	return DNS_STAT_HIT;
}

/* Finds the live entry for `key` and works out the reply; DNS_STAT_HIT or why not. */
static __always_inline int lookup(const struct query *q, const struct dns_key *key,
				  struct dns_entry **found, struct reply *r)
{
	struct dns_entry *e = bpf_map_lookup_elem(&dns_cache, key);

	if (!e)
		return DNS_STAT_MISS;
	__u64 now = bpf_ktime_get_ns();
	if (e->expires_ns <= now)
		return DNS_STAT_EXPIRED;
	if (e->question_len != q->question_len || e->body_len == 0 || e->body_len > DNS_BODY_MAX)
		return DNS_STAT_MISS;
	r->body_len = e->body_len;
	r->dns_len = DNS_HEADER_LEN + q->question_len + r->body_len + (q->edns ? DNS_OPT_LEN : 0);
	if (r->dns_len > q->limit)
		return DNS_STAT_TOO_BIG;

	__u64 ttl = (e->expires_ns - now) / NS_PER_SEC;
	r->ttl_be = bpf_htonl(ttl > MAX_TTL ? MAX_TTL : ttl);

	__u16 flags = FLAG_QR | FLAG_AA | FLAG_RA | (q->flags & (FLAG_RD | FLAG_CD)) | (e->flags & FLAG_RCODE);
	if ((e->flags & FLAG_AD) && ((q->flags & FLAG_AD) || q->dnssec_ok))
		flags |= FLAG_AD;
	__u16 arcount = bpf_ntohs(e->counts[2]) + q->edns;
	__builtin_memcpy(r->header, &q->id, 2);
	r->header[2] = flags >> 8;
	r->header[3] = flags & 0xff;
	r->header[4] = 0;
	r->header[5] = 1;
	__builtin_memcpy(r->header + 6, &e->counts[0], 4);
	r->header[10] = arcount >> 8;
	r->header[11] = arcount & 0xff;
	*found = e;
	return DNS_STAT_HIT;
}

static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/*
 * Turns the rewritten message around: swaps MACs, addresses and ports, sets lengths and hop
 * limit, and computes the checksums. Returns 0, or -1 if the packet is not what we wrote.
 */
static __always_inline int turn_around(void *data, void *data_end, const struct query *q, __u32 dns_len)
{
	struct ethhdr *eth = data;
	__u8 mac[ETH_ALEN];
	__u64 sum = 0;
	struct udphdr *udp;
	__u32 udp_len = sizeof(*udp) + dns_len;

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	if (!q->ipv6) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return -1;
		__u32 addr = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = addr;
		ip->tot_len = bpf_htons(sizeof(*ip) + udp_len);
		ip->ttl = 64;
		ip->check = 0;
		__u16 *words = (void *)ip;
		__u64 ip_sum = 0;
#pragma clang loop unroll(full)
		for (int i = 0; i < 10; i++)
			ip_sum += words[i];
		ip->check = fold(ip_sum);
		sum += (ip->saddr & 0xffff) + (ip->saddr >> 16) + (ip->daddr & 0xffff) + (ip->daddr >> 16);
		udp = (void *)(ip + 1);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		struct in6_addr addr = ip6->saddr;
		ip6->saddr = ip6->daddr;
		ip6->daddr = addr;
		ip6->payload_len = bpf_htons(udp_len);
		ip6->hop_limit = 64;
		__u16 *words = (void *)&ip6->saddr;
#pragma clang loop unroll(full)
		for (int i = 0; i < 16; i++)
			sum += words[i];
		udp = (void *)(ip6 + 1);
	}
	if ((void *)(udp + 1) > data_end)
		return -1;
	__u16 port = udp->source;
	udp->source = udp->dest;
	udp->dest = port;
	udp->len = bpf_htons(udp_len);
	udp->check = 0;
	/* Pseudo-header: the addresses (above), protocol and UDP length; all in wire order. */
	sum += bpf_htons(IPPROTO_UDP) + bpf_htons(udp_len);

	/* Four bytes at a time (the ones' complement sum does not care how it is grouped), then
	 * the last 0-3 bytes, each in its place of a 32-bit word in wire order. */
	__u32 *words = (void *)udp;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < MAX_UDP_WORDS / 2; i++) {
		if (4 * i + 3 >= udp_len)
			break;
		if ((void *)(words + i + 1) > data_end)
			return -1;
		sum += words[i];
	}
	__u32 rest = udp_len & 3;
	if (rest) {
		__u8 *tail = (__u8 *)udp + (udp_len & 0xffc);
		__u8 last[4] = {};
		if ((void *)(tail + 1) > data_end)
			return -1;
		last[0] = tail[0];
		if (rest > 1) {
			if ((void *)(tail + 2) > data_end)
				return -1;
			last[1] = tail[1];
		}
		if (rest > 2) {
			if ((void *)(tail + 3) > data_end)
				return -1;
			last[2] = tail[2];
		}
		sum += *(__u32 *)last;
	}
	__u16 check = fold(sum);
	udp->check = check ? check : 0xffff;
	return 0;
}

/*
 * Writes the reply's header, TTLs and OPT into the packet, whose body the caller has already
 * copied from the entry, and turns the frame around. Direct writes: one helper call (the
 * body copy) per reply instead of one per field. Returns 0, or -1 if the packet is not what
 * we sized it to be.
 */
static __always_inline int write_reply(void *data, void *data_end, struct scratch *s,
				       const struct dns_entry *e, __u64 body_len)
{
	__u8 *header = data + (s->q.dns_off & 0x7f);
	if ((void *)(header + DNS_HEADER_LEN) > data_end)
		return -1;
	__builtin_memcpy(header, s->r.header, DNS_HEADER_LEN);

	__u32 body_off = s->q.dns_off + DNS_HEADER_LEN + s->q.question_len;
	__u32 ttl_count = e->ttl_count;
	__u32 ttl = s->r.ttl_be;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < DNS_TTLS_MAX && i < ttl_count; i++) {
		__u8 *field = data + ((body_off + e->ttl_offsets[i]) & 0x7ff);
		if ((void *)(field + 4) > data_end)
			return -1;
		__builtin_memcpy(field, &ttl, 4);
	}
	if (s->q.edns) {
		/* Owner root, type OPT, class = our UDP size, ext-rcode 0, version 0, DO, no rdata. */
		__u8 *opt = data + ((body_off + body_len) & 0x7ff);
		if ((void *)(opt + DNS_OPT_LEN) > data_end)
			return -1;
		opt[0] = 0;
		opt[1] = 0;
		opt[2] = DNS_TYPE_OPT;
		opt[3] = OUR_UDP_SIZE >> 8;
		opt[4] = OUR_UDP_SIZE & 0xff;
		opt[5] = 0;
		opt[6] = 0;
		opt[7] = s->q.dnssec_ok ? 0x80 : 0;
		opt[8] = 0;
		opt[9] = 0;
		opt[10] = 0;
	}
	return turn_around(data, data_end, &s->q, s->r.dns_len);
}

SEC("xdp")
int dns_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct scratch *s = scratch();
	struct dns_entry *e = 0;

	if (!s)
		return XDP_PASS;
	int verdict = parse(ctx, 1, data, data_end, &s->q, &s->key);
	forget();
	if (verdict == DNS_STAT_HIT)
		verdict = lookup(&s->q, &s->key, &e, &s->r);
	forget();
	if (verdict != DNS_STAT_HIT || !e) {
		count(verdict);
		return XDP_PASS;
	}

	int delta = (int)(s->q.dns_off + s->r.dns_len) - (int)(data_end - data);
	if (bpf_xdp_adjust_tail(ctx, delta)) {
		count(DNS_STAT_ERROR);
		return XDP_PASS;
	}
	/* From here on the packet is ours: anything that fails drops it (the client retries). */
	__u32 body_off = s->q.dns_off + DNS_HEADER_LEN + s->q.question_len;
	__u64 body_len = s->r.body_len;
	opaque(body_len);
	if (body_len == 0 || body_len > DNS_BODY_MAX)
		goto drop;
	if (bpf_xdp_store_bytes(ctx, body_off, e->body, body_len))
		goto drop;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (write_reply(data, data_end, s, e, body_len))
		goto drop;
	count_hit(e);
	return XDP_TX;
drop:
	count(DNS_STAT_ERROR);
	return XDP_DROP;
}

SEC("classifier")
int dns_tc(struct __sk_buff *skb)
{
	struct scratch *s;
	struct dns_entry *e = 0;

	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6)) {
		count(DNS_STAT_NOT_LOCAL);
		return TC_ACT_OK;
	}
	/* Direct access needs the headers and the message in the linear part. */
	if (bpf_skb_pull_data(skb, skb->len)) {
		count(DNS_STAT_ERROR);
		return TC_ACT_OK;
	}
	s = scratch();
	if (!s)
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int verdict = parse(skb, 0, data, data_end, &s->q, &s->key);
	forget();
	if (verdict == DNS_STAT_HIT)
		verdict = lookup(&s->q, &s->key, &e, &s->r);
	forget();
	if (verdict != DNS_STAT_HIT || !e) {
		count(verdict);
		return TC_ACT_OK;
	}

	if (bpf_skb_change_tail(skb, s->q.dns_off + s->r.dns_len, 0)) {
		count(DNS_STAT_ERROR);
		return TC_ACT_OK;
	}
	__u32 body_off = s->q.dns_off + DNS_HEADER_LEN + s->q.question_len;
	__u64 body_len = s->r.body_len;
	opaque(body_len);
	if (body_len == 0 || body_len > DNS_BODY_MAX)
		goto drop;
	if (bpf_skb_store_bytes(skb, body_off, e->body, body_len, 0))
		goto drop;
	if (bpf_skb_pull_data(skb, skb->len))
		goto drop;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (write_reply(data, data_end, s, e, body_len))
		goto drop;
	count_hit(e);
	/* Out of the interface it came in on: back into the pod's veth. */
	return bpf_redirect(skb->ifindex, 0);
drop:
	count(DNS_STAT_ERROR);
	return TC_ACT_SHOT;
}
