/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The layouts shared by the SK_MSG program and the Rust side of lifl.
 *
 * A descriptor is the only thing that moves between processes on a node: a
 * fixed 64-byte record that names a buffer in the job's shared-memory arena.
 * The destination endpoint id comes first because the BPF program routes on
 * it. lifl-proto mirrors every struct here by hand and asserts the same sizes
 * and offsets; change both sides together and bump LIFL_DESC_VERSION.
 */
#ifndef LIFL_H
#define LIFL_H

#include <linux/types.h>

/* "LIFD" read as a little-endian u32. */
#define LIFL_DESC_MAGIC 0x4446494cU
#define LIFL_DESC_VERSION 2
#define LIFL_DESC_SIZE 64

/* Default capacities; the sidecar may resize the maps before loading. */
#define LIFL_MAX_ENDPOINTS 4096
#define LIFL_DEFAULT_MAX_REFS 65536

/* What a descriptor carries, from the platform's point of view. */
enum lifl_desc_kind {
	LIFL_KIND_UPDATE = 1,    /* a trainer's model update */
	LIFL_KIND_PARTIAL = 2,   /* an aggregator's partial result */
	LIFL_KIND_MODEL = 3,     /* a global model */
	LIFL_KIND_CONTROL = 4,   /* application-defined, no payload semantics */
	LIFL_KIND_MAX = LIFL_KIND_CONTROL,
};

/* One reference to one arena buffer, moved from src to dst. */
struct lifl_desc {
	__u32 dst;       /* destination endpoint id: the routing key */
	__u32 src;       /* sending endpoint id; must match the sending socket */
	__u32 magic;     /* LIFL_DESC_MAGIC */
	__u16 version;   /* LIFL_DESC_VERSION */
	__u16 kind;      /* enum lifl_desc_kind */
	__u32 job;       /* job id; both endpoints must belong to it */
	__u32 round;     /* federated round the payload belongs to */
	__u32 ref;       /* slot of the reference in the sidecar's ref table */
	__u32 ref_gen;   /* generation of that slot; a stale one is refused */
	__u64 offset;    /* byte offset of the buffer in the job's arena */
	__u64 len;       /* byte length of the buffer */
	__u64 samples;   /* training samples behind the payload (FedAvg weight) */
	__u32 seq;       /* sender's sequence number, echoed in refusals */
	__u32 updates;   /* trainers' updates folded into the payload */
};

/* endpoints map value: what the sidecar registered for an endpoint id. */
struct lifl_endpoint {
	__u32 job;
	__u32 flags;     /* reserved, zero */
};

/* sender_ports map value: who owns the client end bound to a local port. */
struct lifl_sender {
	__u32 endpoint;
	__u32 job;
};

/* refs map value: one live reference to an arena buffer. holder == 0: free. */
struct lifl_ref {
	__u32 holder;    /* endpoint that may send or release it */
	__u32 gen;       /* bumped each time the slot is reused */
	__u32 job;       /* arena the buffer lives in */
	__u32 flags;     /* reserved, zero */
	__u64 offset;
	__u64 len;
};

/* route_stats map value (per CPU): what the program did for one sender. */
struct lifl_route_stats {
	__u64 routed;    /* redirected in the kernel to the destination socket */
	__u64 refused;   /* destination belongs to another job */
	__u64 passed;    /* handed to the sidecar: malformed, unknown or stale */
};

/* The same sizes and offsets are asserted in lifl-proto. */
_Static_assert(sizeof(struct lifl_desc) == LIFL_DESC_SIZE, "descriptor is 64 bytes");
_Static_assert(__builtin_offsetof(struct lifl_desc, job) == 16, "lifl_desc.job offset");
_Static_assert(__builtin_offsetof(struct lifl_desc, ref) == 24, "lifl_desc.ref offset");
_Static_assert(__builtin_offsetof(struct lifl_desc, offset) == 32, "lifl_desc.offset offset");
_Static_assert(__builtin_offsetof(struct lifl_desc, seq) == 56, "lifl_desc.seq offset");
_Static_assert(__builtin_offsetof(struct lifl_desc, updates) == 60, "lifl_desc.updates offset");
_Static_assert(sizeof(struct lifl_endpoint) == 8, "lifl_endpoint size");
_Static_assert(sizeof(struct lifl_sender) == 8, "lifl_sender size");
_Static_assert(sizeof(struct lifl_ref) == 32, "lifl_ref size");
_Static_assert(sizeof(struct lifl_route_stats) == 24, "lifl_route_stats size");

#endif /* LIFL_H */
