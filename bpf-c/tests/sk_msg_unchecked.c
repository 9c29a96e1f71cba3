// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_msg_unchecked: a program the verifier must refuse. The sidecar's tests
 * load it to prove that a rejection reaches the operator with the
 * verifier's log. Never loaded outside tests.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("sk_msg")
int sk_msg_unchecked(struct sk_msg_md *msg)
{
	/* Reads the message without comparing against data_end first. */
	volatile __u32 first = *(__u32 *)msg->data;

	return first ? SK_PASS : SK_PASS;
}
