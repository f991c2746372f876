#!/usr/bin/env python3
"""The Hugging Face `generate` baseline of grove's GPU rollout engine (issue 9:
"against HF transformers generate in bf16 on the same model and weights, at
batch 32").

Wraps grove's MoE transformer as written in PyTorch by grpo_step.py (imported,
not copied: the same parameters, norms, RoPE tables, fp32 router and expert
SwiGLUs) as a transformers PreTrainedModel + GenerationMixin with a KV cache
(DynamicCache, SDPA attention), casts its weights to bf16 (router and router
bias stay fp32, as grove routes), loads a grove safetensors checkpoint
(--checkpoint) or grove's init scheme at --seed (--random), and times greedy
`generate` of --new-tokens tokens after --prompt-len-token prompts at each
--batches size, printing tokens/s (new tokens of all sequences / wall time).

  python3 hf_generate.py --config gpu-ref.toml --random                 # batch 1, 8, 32
  python3 hf_generate.py --config gpu-ref.toml --checkpoint model.safetensors --batches 32
  python3 hf_generate.py --dry-run                                     # tiny model on the CPU, no timing

Exit 77 (with the reason) when torch or transformers is missing.
"""

import argparse
import json
import os
import statistics
import sys
import time

SKIP = 77  # ctest's SKIP_RETURN_CODE for the script's test

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    print(f"hf_generate.py: PyTorch is not installed ({e}); install torch to run the baseline", file=sys.stderr)
    sys.exit(SKIP)
try:
    import transformers
    from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:
    print(f"hf_generate.py: Hugging Face transformers (with cache_utils.DynamicCache, >= 4.38) is not installed "
          f"({e}); pip install transformers", file=sys.stderr)
    sys.exit(SKIP)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The model; needs torch, so imported after the checks above.
from grpo_step import build_model, load_toml_config, rms_norm, rope  # noqa: E402


class GroveHFConfig(PretrainedConfig):
    model_type = "grove_moe"

    def __init__(self, grove=None, **kwargs):
        self.grove = dict(grove or {})
        super().__init__(**kwargs)


class GroveForCausalLM(PreTrainedModel, GenerationMixin):
    """grove's model behind the interface `generate` drives: forward(input_ids,
    past_key_values) -> logits of the last positions and the grown cache."""

    config_class = GroveHFConfig
    main_input_name = "input_ids"
    _supports_cache_class = True
    _supports_dynamic_cache = True

    def __init__(self, config, grove_model):
        super().__init__(config)
        self.grove = grove_model
        if getattr(self, "generation_config", None) is None:
            self.generation_config = GenerationConfig()
        # Fixed-length runs: no end token, and no pad token (equal-length
        # prompts; a pad id would mask every prompt token that happens to equal it).
        self.generation_config.eos_token_id = None
        self.generation_config.pad_token_id = None

    def get_input_embeddings(self):
        return None

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        # Only the tokens the cache has not seen yet (all prompts have equal length: no padding, no mask).
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        return {"input_ids": input_ids[:, seen:], "past_key_values": past_key_values, "use_cache": True}

    def forward(self, input_ids, past_key_values=None, use_cache=True, return_dict=True, **kwargs):
        g = self.grove
        cfg = g.cfg
        if past_key_values is None:
            past_key_values = DynamicCache()
        B, T = input_ids.shape
        past = past_key_values.get_seq_length()
        if past + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens past max_seq_len {cfg.max_seq_len}")
        cos, sin = g.rope_cos[past:past + T], g.rope_sin[past:past + T]
        hd = cfg.head_dim
        x = F.embedding(input_ids, g.embed)
        for li, b in enumerate(g.blocks):
            h = rms_norm(x, b.attn_norm, cfg.norm_eps)
            q = rope(F.linear(h, b.wq).view(B, T, cfg.heads, hd), cos, sin).transpose(1, 2)
            k = rope(F.linear(h, b.wk).view(B, T, cfg.kv_heads, hd), cos, sin).transpose(1, 2)
            v = F.linear(h, b.wv).view(B, T, cfg.kv_heads, hd).transpose(1, 2)
            k, v = past_key_values.update(k, v, li)
            # Prefill (nothing cached): causal. Decode (one new token): it sees everything.
            o = F.scaled_dot_product_attention(q, k, v, is_causal=(past == 0 and T > 1), enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(B, T, cfg.heads * hd), b.wo)
            h = rms_norm(x, b.ffn_norm, cfg.norm_eps)
            if not b.moe:
                x = x + F.linear(F.silu(F.linear(h, b.w1)) * F.linear(h, b.w3), b.w2)
            else:
                y, _, _, _ = b.moe_forward(h.reshape(B * T, -1), B, T, None, h.dtype)
                x = x + y.view(B, T, -1)
        # generate reads the last position's logits only.
        logits = F.linear(rms_norm(x[:, -1:], g.norm, cfg.norm_eps), g.lm_head).float()
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)


def to_bf16(model):
    """Every weight bf16 except the router and its bias (grove routes in fp32);
    the RoPE tables (buffers) stay fp32."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(".router"):
                p.data = p.data.to(torch.bfloat16)
    return model


def build(args, device):
    cfg = load_toml_config(args.config)
    ns = argparse.Namespace(impl=args.impl, checkpoint=args.checkpoint, config=args.config, seed=args.seed)
    grove_model = to_bf16(build_model(ns, cfg, device)).eval()
    hf = GroveForCausalLM(GroveHFConfig(grove=vars(cfg)), grove_model).eval()
    return cfg, hf


@torch.no_grad()
def run_generate(hf, prompts, new_tokens):
    # No end token (eos_token_id None): every sequence runs the full new_tokens.
    return hf.generate(prompts, max_new_tokens=new_tokens, do_sample=False, past_key_values=DynamicCache(),
                       use_cache=True)


def bench_batch(hf, cfg, batch, args, device):
    g = torch.Generator(device="cpu").manual_seed(args.seed + batch)
    prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=g).to(device)
    run_generate(hf, prompts, min(8, args.new_tokens))  # warm-up: kernels, allocator
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run_generate(hf, prompts, args.new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if out.shape != (batch, args.prompt_len + args.new_tokens):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}")
    best, med = min(times), statistics.median(times)
    return {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "tokens_per_s": batch * args.new_tokens / med, "best_tokens_per_s": batch * args.new_tokens / best,
            "median_s": med, "impl": args.impl}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--config", default=os.path.join(here, "..", "..", "configs", "model", "gpu-ref.toml"))
    ap.add_argument("--checkpoint", default="", help="grove safetensors weights (else --random)")
    ap.add_argument("--random", action="store_true", help="grove's init scheme at --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls per batch (median reported)")
    ap.add_argument("--impl", default="loop", choices=["loop", "grouped"],
                    help="routed experts: a loop over experts (as HF MoE models do) or torch grouped_mm")
    ap.add_argument("--results", default="", help="append one JSON line per batch here")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the tiny model on the CPU and generate 4 tokens (a test of this script)")
    args = ap.parse_args()
    if args.dry_run:
        args.config = os.path.join(here, "..", "..", "configs", "model", "tiny.toml")
        args.checkpoint, args.random = "", True
        args.batches, args.prompt_len, args.new_tokens, args.repeats = "2", 8, 4, 1
        args.impl = "loop"
    if bool(args.checkpoint) == bool(args.random):
        ap.error("give exactly one of --checkpoint and --random")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, not {args.batches!r}")
    if not batches or min(batches) < 1 or args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1:
        ap.error("batches, --prompt-len, --new-tokens and --repeats must be positive")
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        print("hf_generate.py: no CUDA device; the baseline is a GPU measurement", file=sys.stderr)
        return SKIP
    cfg, hf = build(args, device)
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        ap.error(f"--prompt-len + --new-tokens exceeds the model's max_seq_len {cfg.max_seq_len}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, {name}, bf16, greedy, "
          f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens, experts: {args.impl}")
    print("| batch | tokens/s (median) | best | s per generate |")
    print("| --- | --- | --- | --- |")
    for b in batches:
        try:
            r = bench_batch(hf, cfg, b, args, device)
        except (RuntimeError, ValueError) as e:  # one failed batch (e.g. out of memory) is a row, not the end
            r = {"batch": b, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            print(f"| {b} | failed: {r['error']} | | |")
        else:
            print(f"| {b} | {r['tokens_per_s']:.1f} | {r['best_tokens_per_s']:.1f} | {r['median_s']:.3f} |")
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps(r) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
