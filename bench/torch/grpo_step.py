#!/usr/bin/env python3
"""The PyTorch baseline of grove's GPU GRPO training step (issue 8).

Builds grove's MoE transformer (model/transformer.h, model/moe.h) in PyTorch
from the [model] section of a TOML config, loads a grove safetensors
checkpoint (ParamLayout names, F32) or initializes it at random the way grove
does, and times one GRPO training step the way a competent PyTorch user would
write it: fp32 master weights, bf16 autocast compute, SDPA attention, experts
by sorting tokens by expert and either looping over experts (gather, three
matmuls each, one index_add back) or one torch._grouped_mm per projection,
the token-level clipped GRPO loss, backward, grad-norm clip, fused AdamW and
the aux-loss-free router-bias update.

  # one timed configuration, appended as one JSON line to --results
  python3 grpo_step.py --config gpu-ref.toml --random --impl grouped --mode compile --results r.jsonl
  # the table of every line in r.jsonl
  python3 grpo_step.py --table r.jsonl
  # that this model IS grove's: compare with grove's CPU Score() (bench/torch/dump_reference)
  python3 grpo_step.py --check DIR

MFU counts FLOPs/token = 6 * N_matmul + 6 * layers * heads * head_dim * L
(N_matmul: parameters of every matrix product one token passes through,
lm_head and router included, embedding lookup excluded; the second term is
causal attention forward + backward), tokens = batch * seqlen, against
989.4 TFLOP/s (H100 SXM dense bf16) -- the same formula as grove's
bench/learner/gpu_step_bench.
"""

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time
import tomllib

import torch
import torch.nn.functional as F

PEAK_TFLOPS = 989.4
CONFIG_KEYS = {
    "vocab_size", "hidden", "layers", "heads", "kv_heads", "head_dim", "max_seq_len", "rope_base", "norm_eps",
    "dense_layers", "dense_hidden", "experts", "top_k", "shared_experts", "expert_hidden", "score_func",
    "norm_topk", "route_scale", "balance_alpha", "bias_gamma", "init_std",
}


# ----------------------------------------------------------------------------
# Config and checkpoint files


class ModelConfig:
    """grove's ModelConfig (model/config.h), read from a dict of its keys."""

    def __init__(self, d):
        unknown = set(d) - CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown [model] keys: {sorted(unknown)}")
        self.vocab_size = int(d["vocab_size"])
        self.hidden = int(d["hidden"])
        self.layers = int(d["layers"])
        self.heads = int(d["heads"])
        self.kv_heads = int(d["kv_heads"])
        self.head_dim = int(d["head_dim"])
        self.max_seq_len = int(d["max_seq_len"])
        self.rope_base = float(d.get("rope_base", 10000.0))
        self.norm_eps = float(d.get("norm_eps", 1e-6))
        self.dense_layers = int(d.get("dense_layers", 0))
        self.dense_hidden = int(d.get("dense_hidden", 0))
        self.experts = int(d.get("experts", 0))
        self.top_k = int(d.get("top_k", 0))
        self.shared_experts = int(d.get("shared_experts", 0))
        self.expert_hidden = int(d.get("expert_hidden", 0))
        self.score_func = str(d.get("score_func", "softmax"))
        self.norm_topk = bool(d.get("norm_topk", False))
        self.route_scale = float(d.get("route_scale", 1.0))
        self.balance_alpha = float(d.get("balance_alpha", 0.0))
        self.bias_gamma = float(d.get("bias_gamma", 1e-3))
        self.init_std = float(d.get("init_std", 0.02))
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be softmax or sigmoid, not {self.score_func!r}")
        if self.heads % self.kv_heads or self.head_dim % 2:
            raise ValueError("kv_heads must divide heads and head_dim must be even")
        if self.experts > 0 and not (0 < self.top_k <= self.experts):
            raise ValueError("top_k must be in [1, experts]")

    def is_moe_layer(self, layer):
        return self.experts > 0 and layer >= self.dense_layers

    def moe_layers(self):
        return self.layers - self.dense_layers if self.experts > 0 else 0

    def matmul_params_per_token(self):
        """N_matmul: weights of the matrix products one token passes through."""
        H, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        n = 0
        for layer in range(self.layers):
            n += H * (q + 2 * kv) + q * H
            if self.is_moe_layer(layer):
                n += self.experts * H  # router
                n += (self.top_k + self.shared_experts) * 3 * H * self.expert_hidden
            else:
                n += 3 * H * self.dense_hidden
        return n + self.vocab_size * H  # lm_head

    def flops_per_token(self, seqlen):
        return 6 * self.matmul_params_per_token() + 6 * self.layers * self.heads * self.head_dim * seqlen


def load_toml_config(path):
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    if "model" not in doc:
        raise ValueError(f"{path}: no [model] section")
    return ModelConfig(doc["model"])


def read_safetensors(path):
    """grove's safetensors files (model/safetensors.h): F32 tensors only."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: shorter than its header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} past the end of the file")
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, e in header.items():
        if e["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {name} is {e['dtype']}, grove writes F32")
        b, end = e["data_offsets"]
        shape = e["shape"]
        if end - b != 4 * math.prod(shape) or end > len(data):
            raise ValueError(f"{path}: tensor {name} has bad data_offsets {b}..{end}")
        tensors[name] = torch.frombuffer(bytearray(data[b:end]), dtype=torch.float32).reshape(shape)
    return metadata, tensors


# ----------------------------------------------------------------------------
# The model


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)


def rope(x, cos, sin):
    """x [B, T, nh, hd]; pairs (i, i + hd/2) rotated by cos/sin [T, hd/2]."""
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


def grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


@torch.compiler.disable
def experts_loop(xs, counts, w1, w3, w2):
    """Rows of xs sorted by expert, counts[e] of them for expert e: one
    SwiGLU per expert with rows (data-dependent sizes: kept out of compile)."""
    # unbind, not w1[e]: the backward of 64 separate selects would add 64
    # full-size zero-padded gradients of the stacked weight; unbind's is one stack.
    w1, w3, w2 = w1.unbind(0), w3.unbind(0), w2.unbind(0)
    ys = []
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            continue
        xe = xs[start:start + c]
        ys.append(F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e]))
        start += c
    return torch.cat(ys)


def experts_grouped(xs, counts, w1, w3, w2):
    """The same with one grouped GEMM per projection over all experts."""
    gmm = grouped_mm_fn()
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    a = gmm(xs, w1.transpose(-2, -1), offs=offs)
    b = gmm(xs, w3.transpose(-2, -1), offs=offs)
    return gmm(F.silu(a) * b, w2.transpose(-2, -1), offs=offs)


class Block(torch.nn.Module):
    def __init__(self, cfg, moe, impl):
        super().__init__()
        H, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        P = torch.nn.Parameter
        self.cfg, self.moe, self.impl = cfg, moe, impl
        self.attn_norm = P(torch.ones(H))
        self.wq, self.wk, self.wv = P(torch.empty(q, H)), P(torch.empty(kv, H)), P(torch.empty(kv, H))
        self.wo = P(torch.empty(H, q))
        self.ffn_norm = P(torch.ones(H))
        if not moe:
            Fd = cfg.dense_hidden
            self.w1, self.w3, self.w2 = P(torch.empty(Fd, H)), P(torch.empty(Fd, H)), P(torch.empty(H, Fd))
            return
        E, Fe, S = cfg.experts, cfg.expert_hidden, cfg.shared_experts * cfg.expert_hidden
        self.router = P(torch.empty(E, H))
        self.register_buffer("router_bias", torch.zeros(E))  # steers selection only; not trained
        self.e_w1, self.e_w3, self.e_w2 = P(torch.empty(E, Fe, H)), P(torch.empty(E, Fe, H)), P(torch.empty(E, H, Fe))
        if S > 0:
            self.s_w1, self.s_w3, self.s_w2 = P(torch.empty(S, H)), P(torch.empty(S, H)), P(torch.empty(H, S))

    def forward(self, x, cos, sin, replay_ids=None):
        """x [B, T, H] residual stream. Returns (x, balance loss, routed ids
        [B*T, k] or None, tokens per expert [E] or None)."""
        cfg = self.cfg
        B, T, H = x.shape
        hd = cfg.head_dim
        h = rms_norm(x, self.attn_norm, cfg.norm_eps)
        q = rope(F.linear(h, self.wq).view(B, T, cfg.heads, hd), cos, sin)
        k = rope(F.linear(h, self.wk).view(B, T, cfg.kv_heads, hd), cos, sin)
        v = F.linear(h, self.wv).view(B, T, cfg.kv_heads, hd)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        x = x + F.linear(o.transpose(1, 2).reshape(B, T, cfg.heads * hd), self.wo)
        h = rms_norm(x, self.ffn_norm, cfg.norm_eps)
        if not self.moe:
            return x + F.linear(F.silu(F.linear(h, self.w1)) * F.linear(h, self.w3), self.w2), None, None, None
        # o's dtype is the compute dtype: bf16 under autocast, else fp32.
        y, bal, ids, counts = self.moe_forward(h.reshape(B * T, H), B, T, replay_ids, o.dtype)
        return x + y.view(B, T, H), bal, ids, counts

    def moe_forward(self, h, B, T, replay_ids, dt):
        cfg = self.cfg
        N, H = h.shape
        E, K = cfg.experts, cfg.top_k
        # Routing in fp32 (as grove does): a bf16 router flips near-tie selections.
        with torch.autocast("cuda", enabled=False):
            logits = F.linear(h.float(), self.router)
        scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        if replay_ids is None:
            ids = torch.topk(scores.detach() + self.router_bias, K, dim=-1).indices
        else:
            ids = replay_ids
        gates = scores.gather(1, ids)
        if cfg.norm_topk:
            gates = gates / gates.sum(-1, keepdim=True)
        gates = gates * cfg.route_scale
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // K
        counts = torch.zeros(E, dtype=torch.int64, device=h.device).scatter_add_(0, flat, torch.ones_like(flat))
        xs = h.to(dt)[token]
        w1, w3, w2 = self.e_w1.to(dt), self.e_w3.to(dt), self.e_w2.to(dt)
        if self.impl == "grouped":
            ys = experts_grouped(xs, counts, w1, w3, w2)
        else:
            ys = experts_loop(xs, counts, w1, w3, w2)
        # Gate in the compute dtype (an fp32 product would be saved for backward:
        # 4 bytes x rows x H per layer), accumulate the k contributions in fp32.
        weighted = ys * gates.reshape(-1)[order, None].to(ys.dtype)
        routed = torch.zeros(N, H, dtype=torch.float32, device=h.device).index_add(0, token, weighted.float())
        if cfg.shared_experts > 0:
            routed = routed + F.linear(F.silu(F.linear(h, self.s_w1)) * F.linear(h, self.s_w3), self.s_w2)
        bal = None
        if cfg.balance_alpha > 0:
            # DeepSeek-V3 sequence-wise balance loss, summed over sequences (grove's balance_loss).
            p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)
            f = torch.zeros(B, E, device=h.device).scatter_add_(
                1, ids.view(B, T * K), torch.ones(B, T * K, device=h.device)) * (E / (K * T))
            bal = cfg.balance_alpha * (f * p).sum()
        return routed.to(h.dtype), bal, ids, counts


class GroveMoE(torch.nn.Module):
    def __init__(self, cfg, impl="loop"):
        super().__init__()
        self.cfg = cfg
        P = torch.nn.Parameter
        self.embed = P(torch.empty(cfg.vocab_size, cfg.hidden))
        self.blocks = torch.nn.ModuleList(Block(cfg, cfg.is_moe_layer(l), impl) for l in range(cfg.layers))
        self.norm = P(torch.ones(cfg.hidden))
        self.lm_head = P(torch.empty(cfg.vocab_size, cfg.hidden))
        # grove's RopeTables: angles in double, tables in fp32.
        half = cfg.head_dim // 2
        inv = cfg.rope_base ** (-2.0 * torch.arange(half, dtype=torch.float64) / cfg.head_dim)
        ang = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("rope_cos", ang.cos().float(), persistent=False)
        self.register_buffer("rope_sin", ang.sin().float(), persistent=False)
        self.head = self.logprob_head

    def set_impl(self, impl):
        for b in self.blocks:
            b.impl = impl

    # grove name -> (tensor, expert index or None)
    def grove_tensors(self):
        cfg = self.cfg
        out = {"embed": (self.embed, None), "norm": (self.norm, None), "lm_head": (self.lm_head, None)}
        for l, b in enumerate(self.blocks):
            p = f"layers.{l}."
            for n in ("attn_norm", "ffn_norm"):
                out[p + n] = (getattr(b, n), None)
            for n in ("wq", "wk", "wv", "wo"):
                out[p + "attn." + n] = (getattr(b, n), None)
            if not b.moe:
                for n in ("w1", "w3", "w2"):
                    out[p + "mlp." + n] = (getattr(b, n), None)
                continue
            out[p + "moe.router"] = (b.router, None)
            out[p + "moe.router_bias"] = (b.router_bias, None)
            for e in range(cfg.experts):
                for n in ("w1", "w3", "w2"):
                    out[p + f"moe.experts.{e}.{n}"] = (getattr(b, "e_" + n), e)
            if cfg.shared_experts > 0:
                for n in ("w1", "w3", "w2"):
                    out[p + "moe.shared." + n] = (getattr(b, "s_" + n), None)
        return out

    @torch.no_grad()
    def load_grove(self, tensors):
        want = self.grove_tensors()
        missing, extra = set(want) - set(tensors), set(tensors) - set(want)
        if missing or extra:
            raise ValueError(f"checkpoint does not match the config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        for name, (dst, e) in want.items():
            src = tensors[name]
            target = dst if e is None else dst[e]
            if tuple(src.shape) != tuple(target.shape):
                raise ValueError(f"{name}: shape {tuple(src.shape)} in the file, {tuple(target.shape)} in the model")
            target.copy_(src)

    @torch.no_grad()
    def init_random(self, seed):
        """grove's init scheme (Transformer::Create): N(0, init_std), wo and w2
        scaled by 1/sqrt(2 layers), norms 1, router bias 0. Not grove's numbers
        (different generator): for timing only."""
        g = torch.Generator(device=self.embed.device).manual_seed(seed)
        out_std = self.cfg.init_std / math.sqrt(2.0 * self.cfg.layers)
        seen = set()
        for name, (t, _) in self.grove_tensors().items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            if name.endswith("norm"):
                t.fill_(1.0)
            elif name.endswith("router_bias"):
                t.zero_()
            else:
                std = out_std if name.endswith("wo") or name.endswith("w2") else self.cfg.init_std
                t.normal_(0.0, std, generator=g)

    def logprob_head(self, x, targets):
        """Final norm, lm_head and log p(target) of the scored rows x [B, C, H]."""
        logits = F.linear(rms_norm(x, self.norm, self.cfg.norm_eps), self.lm_head).float()
        return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    def forward(self, tokens, score_from, replay=None):
        """tokens [B, L]; log-probs of tokens[:, score_from:] [B, L - score_from],
        the balance loss, routes per MoE layer ([B*(L-1), k]) and loads ([E])."""
        B, L = tokens.shape
        T = L - 1
        x = F.embedding(tokens[:, :T], self.embed)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        bal = torch.zeros((), device=tokens.device)
        routes, loads = [], []
        mi = 0
        for b in self.blocks:
            rep = None
            if b.moe and replay is not None:
                rep = replay[mi]
            x, lb, ids, counts = b(x, cos, sin, rep)
            if b.moe:
                routes.append(ids)
                loads.append(counts)
                mi += 1
            if lb is not None:
                bal = bal + lb
        lp = self.head(x[:, score_from - 1:], tokens[:, score_from:])
        return lp, bal, routes, loads


def grpo_loss(lp, old_lp, adv, clip=0.2):
    """Token-level clipped GRPO loss (learner/grpo_loss.h, kToken, beta 0),
    every completion token counted, seq-mean-token-mean."""
    ratio = torch.exp(lp - old_lp)
    per_token = -torch.minimum(ratio * adv[:, None], ratio.clamp(1 - clip, 1 + clip) * adv[:, None])
    return per_token.mean(-1).mean()


# ----------------------------------------------------------------------------
# --check: the model against grove's CPU Score()


def run_check(folder, device):
    with open(os.path.join(folder, "reference.json")) as f:
        ref = json.load(f)
    meta, tensors = read_safetensors(os.path.join(folder, "model.safetensors"))
    cfg = ModelConfig(json.loads(meta["config"]))
    if json.loads(meta["config"]) != ref["config"]:
        raise ValueError("reference.json and model.safetensors disagree on the config")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    model = GroveMoE(cfg, impl="loop").to(device)
    model.load_grove(tensors)
    model.eval()
    M, K = cfg.moe_layers(), cfg.top_k
    # fp32 tolerance: log-probs are O(log vocab) ~ 4-6 nats; every value is a
    # few hundred fp32 products and sums deep (unit roundoff 6e-8, different
    # summation orders than OpenBLAS), so agreement to ~1e-5 is expected and
    # 1e-4 leaves 10x headroom. bf16: one rounding (2^-8 relative) of every
    # matmul operand; logits of size O(1) shift by ~1e-2, and the loop and the
    # grouped GEMM round the same operands, differing only in accumulation order.
    tol_fp32, tol_bf16_impls = 1e-4, 2e-2
    worst_own = worst_replay = worst_impls = worst_bf16_vs_fp32 = 0.0
    route_rows = route_diff = 0
    gmm_ok = grouped_mm_fn() is not None and device.type == "cuda"
    with torch.no_grad():
        for i, s in enumerate(ref["sequences"]):
            tokens = torch.tensor(s["tokens"], device=device)[None, :]
            sf = int(s["score_from"])
            want = torch.tensor(s["logprobs"], dtype=torch.float64, device=device)
            L = tokens.shape[1]
            ref_routes = torch.tensor(s["routes"], dtype=torch.int64, device=device).view(L - 1, max(M, 1), K)
            replay = [ref_routes[:, m, :].contiguous() for m in range(M)]
            lp, _, routes, _ = model(tokens, sf)
            d_own = (lp[0].double() - want).abs().max().item()
            for m in range(M):
                mine = routes[m].sort(-1).values
                theirs = ref_routes[:, m, :].sort(-1).values
                route_diff += int((mine != theirs).any(-1).sum().item())
                route_rows += L - 1
            lp_r, _, _, _ = model(tokens, sf, replay)
            d_rep = (lp_r[0].double() - want).abs().max().item()
            worst_own, worst_replay = max(worst_own, d_own), max(worst_replay, d_rep)
            line = f"  seq {i}: L={L} score_from={sf} max|dlogp| own routes {d_own:.2e}, replayed {d_rep:.2e}"
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    lp_loop, _, _, _ = model(tokens, sf, replay)
                    d16 = (lp_loop[0].double() - want).abs().max().item()
                    worst_bf16_vs_fp32 = max(worst_bf16_vs_fp32, d16)
                    line += f"; bf16 loop vs grove fp32 {d16:.2e}"
                    if gmm_ok:
                        model.set_impl("grouped")
                        lp_g, _, _, _ = model(tokens, sf, replay)
                        model.set_impl("loop")
                        di = (lp_g[0] - lp_loop[0]).abs().max().item()
                        worst_impls = max(worst_impls, di)
                        line += f", bf16 grouped vs loop {di:.2e}"
            print(line)
    ok = worst_replay <= tol_fp32 and worst_own <= tol_fp32 and route_diff == 0 and worst_impls <= tol_bf16_impls
    print(f"check {folder}: fp32 max|dlogp| {worst_own:.3e} (own routing), {worst_replay:.3e} (grove's routes "
          f"replayed), tolerance {tol_fp32:g}; routes differ in {route_diff}/{route_rows} (token, layer) rows; "
          f"bf16 loop vs grove fp32 {worst_bf16_vs_fp32:.3e} (reported); bf16 grouped vs loop "
          f"{worst_impls:.3e} (tolerance {tol_bf16_impls:g}{'' if gmm_ok else ', grouped GEMM not available'}): "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


# ----------------------------------------------------------------------------
# The timed GRPO step


def build_model(args, cfg, device):
    model = GroveMoE(cfg, impl=args.impl)
    if args.checkpoint:
        meta, tensors = read_safetensors(args.checkpoint)
        file_cfg = ModelConfig(json.loads(meta["config"]))
        if vars(file_cfg) != vars(cfg):
            raise ValueError(f"{args.checkpoint}: its config differs from {args.config}")
        model.load_grove(tensors)
        model = model.to(device)
    else:
        model = model.to(device)
        model.init_random(args.seed)
    return model


def make_optimizer(model, lr):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # grove's NoDecayRanges: vectors, norms and the embedding are not decayed.
        (no_decay if p.dim() < 2 or name == "embed" or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def bench(args):
    device = torch.device("cuda")
    cfg = load_toml_config(args.config)
    B, L, P = args.batch, args.seqlen, args.prompt
    if not (1 <= P < L <= cfg.max_seq_len):
        raise ValueError(f"need 1 <= prompt < seqlen <= max_seq_len ({cfg.max_seq_len})")
    if args.impl == "grouped" and grouped_mm_fn() is None:
        raise RuntimeError("this torch has no grouped_mm / _grouped_mm")
    torch.manual_seed(args.seed)
    model = build_model(args, cfg, device)
    if args.mode != "eager":
        dyn = torch._dynamo.config  # room for one graph per block kind and routing variant
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(dyn, limit):
                setattr(dyn, limit, max(64, getattr(dyn, limit)))
        kw = {} if args.mode == "compile" else {"mode": args.mode}
        for b in model.blocks:  # per block, as torchtitan does: identical blocks share one compiled graph
            b.compile(**kw)
        model.head = torch.compile(model.logprob_head, **kw)
    opt = make_optimizer(model, args.lr)
    params = [p for p in model.parameters()]
    tokens = torch.randint(0, cfg.vocab_size, (B, L), device=device)
    adv = torch.where(torch.rand(B, device=device) < 0.5, -1.0, 1.0)
    replay = None
    if args.replay:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            _, _, replay, _ = model(tokens, P)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp, bal, _, loads = model(tokens, P, replay)
            loss = grpo_loss(lp, lp.detach(), adv) + bal
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        with torch.no_grad():  # aux-loss-free balancing (grove's UpdateBias)
            moe_blocks = [b for b in model.blocks if b.moe]
            for b, load in zip(moe_blocks, loads):
                lf = load.float()
                b.router_bias.add_(cfg.bias_gamma * torch.sign(lf.mean() - lf))
        return loss

    t0 = time.time()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        loss = step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    ms = statistics.median(times)
    tokens_per_step = B * L
    tflops = cfg.flops_per_token(L) * tokens_per_step / (ms / 1e3) / 1e12
    return {
        "mode": args.mode, "impl": args.impl, "replay": bool(args.replay), "batch": B, "seqlen": L, "prompt": P,
        "weights": args.checkpoint or "random", "step_ms_median": ms, "step_ms_min": min(times),
        "step_ms_max": max(times), "steps": args.steps, "warmup_s": warm_s,
        "tokens_per_s": tokens_per_step / (ms / 1e3), "tflops": tflops, "mfu": tflops / PEAK_TFLOPS,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss.detach()),
        "flops_per_token": cfg.flops_per_token(L), "n_matmul": cfg.matmul_params_per_token(),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": args.config,
    }


def print_table(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    ok = [r for r in rows if "error" not in r]
    if ok:
        r0 = ok[0]
        print(f"GRPO step, {r0['config']}, B={r0['batch']} x L={r0['seqlen']} (prompt {r0['prompt']}), "
              f"weights {r0['weights']}, {r0['gpu']}, torch {r0['torch']}; FLOPs/token {r0['flops_per_token']/1e9:.3f} G "
              f"(N_matmul {r0['n_matmul']/1e6:.1f} M), MFU against {PEAK_TFLOPS} TFLOP/s")
    print("| mode | experts | replay | batch | tokens/s | step ms (median; min-max) | TFLOP/s | MFU | peak mem GiB | warm-up s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['impl']} | {r.get('replay', False)} | {r.get('batch', '')} | failed: "
                  f"{r['error'][:120]} | | | | | |")
            continue
        print(f"| {r['mode']} | {r['impl']} | {r['replay']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | {r['tflops']:.1f} | "
              f"{100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.1f} | {r['warmup_s']:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/model/gpu-ref.toml")
    ap.add_argument("--checkpoint", default="", help="grove safetensors weights (else --random)")
    ap.add_argument("--random", action="store_true", help="random init (grove's scheme, not its numbers)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens; the rest is the scored completion")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mode", default="eager", choices=["eager", "compile", "max-autotune-no-cudagraphs"])
    ap.add_argument("--impl", default="grouped", choices=["loop", "grouped"], help="routed experts")
    ap.add_argument("--replay", action="store_true", help="replay the routes of a first forward every step")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="", help="append the result as one JSON line here")
    ap.add_argument("--check", default="", help="folder written by dump_reference: compare and exit")
    ap.add_argument("--table", default="", help="print the table of a --results file and exit")
    args = ap.parse_args()
    if args.table:
        print_table(args.table)
        return 0
    if args.check:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0 if run_check(args.check, device) else 1
    if bool(args.checkpoint) == bool(args.random):
        ap.error("give exactly one of --checkpoint and --random")
    try:
        r = bench(args)
    except Exception as e:  # noqa: BLE001 -- one failed configuration is a row of the table, not the end
        r = {"mode": args.mode, "impl": args.impl, "replay": bool(args.replay), "batch": args.batch,
             "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(f"FAILED {args.mode}/{args.impl}: {e}", file=sys.stderr)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(r) + "\n")
    print(json.dumps(r))
    return 0 if "error" not in r else 1


if __name__ == "__main__":
    sys.exit(main())
