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
// the landed rows (a warp a chunk) and bump the stage's counter. No grid
// barrier. Beside the counters, a second protocol (each stage output word
// tagged with its step, readers spinning on the tags) and diagnostic cuts
// (no routing dependency; no dependency at all), with per-block wait
// probes; the two protocols must give the same logits bit for bit. Then the
// latency of one dependent L2 load while every SM streams HBM, with loads or
// with 1-12 bulk copies in flight a block.
//
// It measures the structure, not the model: weights are a constant pattern,
// RMSNorm has unit weights, attention is softmax-free, and the routing adds
// a pseudo-random per-(layer, step) bias to the logits so that the experts
// read change from step to step as real routing does. Host header.
#pragma once

namespace grove::bench {

// Prints ms per step for each variant (median of `reps` x 20 launches after
// warm-up), the weight bytes a step reads and their rate against `read_gbs`
// (the measured streaming-read ceiling), then the load-latency table.
void DataflowStepTable(double read_gbs, int reps);

}  // namespace grove::bench
