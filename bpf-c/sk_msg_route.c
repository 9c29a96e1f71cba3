// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_msg_route: moves lifl descriptors between endpoints inside the kernel.
 *
 * Data path: an endpoint writes a 64-byte struct lifl_desc on its end of a
 * loopback TCP pair whose other end the sidecar keeps. This program runs on
 * that send, once per descriptor, and either redirects it (BPF_F_INGRESS)
 * into the destination endpoint's socket through endpoint_socks, or lets it
 * pass so that it lands on the sidecar's end, which refuses or forwards it.
 *
 * It never returns SK_DROP: a dropped verdict makes every later send on the
 * sender's socket fail with EACCES.
 */
#include <stdbool.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lifl.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* key: endpoint id; value: the endpoint's client socket. Writer: sidecar. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, LIFL_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, __u64);
} endpoint_socks SEC(".maps");

/* key: endpoint id; value: struct lifl_endpoint. Writer: sidecar. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LIFL_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct lifl_endpoint);
} endpoints SEC(".maps");

/* key: local port of a client socket; value: struct lifl_sender. Writer: sidecar. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LIFL_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct lifl_sender);
} sender_ports SEC(".maps");

/*
 * key: ref slot; value: struct lifl_ref. Writers: sidecar (issue, release),
 * this program (holder moves to the destination on a redirect).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LIFL_DEFAULT_MAX_REFS);
	__type(key, __u32);
	__type(value, struct lifl_ref);
} refs SEC(".maps");

/* key: sending endpoint id; value: per-CPU struct lifl_route_stats. Reader: sidecar. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, LIFL_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct lifl_route_stats);
} route_stats SEC(".maps");

enum verdict_kind { ROUTED, REFUSED, PASSED };

static __always_inline int count(__u32 sender, enum verdict_kind kind)
{
	struct lifl_route_stats *stats = bpf_map_lookup_elem(&route_stats, &sender);

	if (stats) {
		if (kind == ROUTED)
			stats->routed++;
		else if (kind == REFUSED)
			stats->refused++;
		else
			stats->passed++;
	}
	return SK_PASS;
}

/* Whether the sender may move this reference to another endpoint of its job. */
static __always_inline bool holds_ref(const struct lifl_desc *desc, const struct lifl_sender *sender)
{
	__u32 slot = desc->ref;
	struct lifl_ref *ref = bpf_map_lookup_elem(&refs, &slot);

	return ref && ref->holder == sender->endpoint && ref->gen == desc->ref_gen &&
	       ref->job == sender->job && ref->offset == desc->offset && ref->len == desc->len;
}

SEC("sk_msg")
int sk_msg_route(struct sk_msg_md *msg)
{
	__u32 port = msg->local_port;
	struct lifl_sender *sender;
	struct lifl_endpoint *dst_ep;
	struct lifl_desc *desc;
	struct lifl_ref *ref;
	__u32 dst, slot;

	/*
	 * One verdict per descriptor: the program runs again for the rest of a
	 * batched send. A tail shorter than a descriptor takes exactly its own
	 * bytes, so a verdict never spills into the sender's next message.
	 */
	bpf_msg_apply_bytes(msg, msg->size < LIFL_DESC_SIZE ? msg->size : LIFL_DESC_SIZE);

	sender = bpf_map_lookup_elem(&sender_ports, &port);
	if (!sender)
		return SK_PASS;
	if (msg->size < LIFL_DESC_SIZE)
		return count(sender->endpoint, PASSED);

	/* The descriptor may straddle two pages of the message: make it linear. */
	if (msg->data + LIFL_DESC_SIZE > msg->data_end &&
	    bpf_msg_pull_data(msg, 0, LIFL_DESC_SIZE, 0))
		return count(sender->endpoint, PASSED);
	desc = msg->data;
	if ((void *)(desc + 1) > msg->data_end)
		return count(sender->endpoint, PASSED);

	/* Anything malformed, spoofed or unknown is the sidecar's to judge. */
	if (desc->magic != LIFL_DESC_MAGIC || desc->version != LIFL_DESC_VERSION ||
	    desc->kind < LIFL_KIND_UPDATE || desc->kind > LIFL_KIND_MAX ||
	    desc->src != sender->endpoint)
		return count(sender->endpoint, PASSED);
	dst = desc->dst;
	dst_ep = bpf_map_lookup_elem(&endpoints, &dst);
	if (!dst_ep)
		return count(sender->endpoint, PASSED);

	/* Jobs are isolated: never deliver across them. */
	if (dst_ep->job != sender->job || desc->job != sender->job)
		return count(sender->endpoint, REFUSED);

	if (!holds_ref(desc, sender))
		return count(sender->endpoint, PASSED);
	if (bpf_msg_redirect_hash(msg, &endpoint_socks, &dst, BPF_F_INGRESS) != SK_PASS)
		return count(sender->endpoint, PASSED);

	/* The reference now belongs to the destination, which may release it. */
	slot = desc->ref;
	ref = bpf_map_lookup_elem(&refs, &slot);
	if (ref)
		ref->holder = dst;
	return count(sender->endpoint, ROUTED);
}
