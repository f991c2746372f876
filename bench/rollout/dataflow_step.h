// A feasibility probe for issue 9's batch-1 aim (75% of the HBM read
// ceiling): a persistent, dataflow decode step at gpu-ref's shapes in bf16
// (16 MoE layers of qkv, attention over 96 cached keys, wo, router + 2 shared
// experts, 6 routed experts chosen at run time, their down projections, then
// the lm_head), built the way docs/kernels.md's "What a step that meets the
// batch-1 aims would need" sketches it: one block per SM; a producer warp
// that streams the block's weight rows for every stage in order into a ring
// of shared-memory slots with bulk copies (the routed experts' only after
// the router's counter says the logits are final); eight consumer warps that
// wait on a per-(layer, stage) counter for exactly their stage's input, dot
// the landed rows and bump the stage's counter. No grid barrier.
//
// It measures the structure, not the model: weights are a constant pattern,
// RMSNorm has unit weights, attention is softmax-free, and the routing adds
// a per-(layer, step) pseudo-random bias to the logits so that the experts
// read change from step to step as real routing does. Host header.
#pragma once

namespace grove::bench {

// Prints ms per step (median of `reps` launches after warm-up), the weight
// bytes a step reads and their rate against `read_gbs` (the measured
// streaming-read ceiling).
void DataflowStepTable(double read_gbs, int reps);

}  // namespace grove::bench
