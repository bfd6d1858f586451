"""Lean KV-cache decoder for the Llama / Qwen2 family (rollout fast path).

`KVDecoder` snapshots a transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
into a few fused matrices and runs

* ``prefill``: the whole (left-padded) prompt once per prompt, writes the KV
  cache and expands it to ``P * repeats`` rows (rows of a group contiguous:
  ``row = p * repeats + g``), returning the last-position logits;
* ``decode``: one token per row per call, against a preallocated cache, with
  no per-step Python work except a loop over layers;
* ``keep_rows``: compacts the active batch so finished rows cost nothing.

On CUDA the decode step is captured in CUDA graphs (``cuda_graphs``, on by
default there) and replayed, so one step costs one graph launch instead of
~30 kernel launches per layer (3.2x-4.6x faster at Q05 on an H200). A graph
needs fixed shapes and addresses, so the captured step is the *static* form
of the same computation: the token ids come through a fixed buffer, the
generated keys are read up to a bucket length (a multiple of
``graph_bucket``) with the positions past the current step masked to -inf,
and the new K/V are written at a slot held in a device tensor. One graph is
captured per (active rows, bucket length), all into one memory pool, made
anew whenever prefill and ``keep_rows`` drop the graphs (they reallocate the
prompt cache). The static form runs eagerly too (``static_decode=True``),
which is how the CPU tests check it against the transformers forward.
``compile_step`` fuses its element-wise chains with ``torch.compile`` before
capture (off by default: 1.02x at Q05, see ``step_functions``).

Numerics mirror transformers (checked against the installed 5.x source):
RMSNorm in fp32 then cast, RoPE cos/sin taken from the model's own
``rotary_emb`` module (so ``rope_theta`` / ``rope_parameters`` / llama3 / linear
scaling and ``attention_scaling`` are exactly the model's), GQA head ``h`` uses
kv head ``h // (heads / kv_heads)`` as ``repeat_kv`` does, attention softmax in
fp32. Positions are ``cumsum(attention_mask) - 1`` as the trainer passes them
to the forward when recomputing log-probs.

Speed notes: every projection is one GEMM (``qkv`` and ``gate_up`` fused,
residual adds fused into the ``o`` / ``down`` GEMMs); in fp32 the RMSNorm
weights are folded into the following GEMM weights, and on CPU all GEMM
weights are prepacked for oneDNN (``torch.ops.mkldnn._linear_pointwise``;
~2x faster than MKL sgemm for these skinny shapes on the machine this was
first measured on; on an AMD EPYC, one thread, within 20% of MKL either way,
faster for the LM head), and the RMSNorm is four small ops instead of the dozen
of ``F.rms_norm``'s CPU kernel (``rms_norm``). The prompt's K/V are kept
once per prompt, not per sample: single-query attention is one GEMM of the
``repeats x heads_per_kv`` queries of a (prompt, kv head) against the shared
prompt keys plus a batched GEMM of each row against its own generated keys,
one softmax over both, and the same two GEMMs with V; GQA never repeats K/V
in decoding. Prefill attention is ``F.scaled_dot_product_attention`` with a
boolean causal + padding mask (memory-efficient kernels on GPUs, so the
[S, S] scores are never stored; 2x faster than explicit matmuls on CPU at
C0); its K/V heads are expanded to the query heads, once per prompt. RoPE
cos/sin are tabulated for all positions once, with the sign of
``rotate_half`` folded into ``sin``. Nothing loops over rows or tokens.

Snapshot semantics: fused / folded / packed matrices are copies, taken at
construction; the embedding table and (when present) unfused biases are
shared with the model unless ``dtype`` asks for another precision (e.g. a
bf16 decoder over fp32 master weights), in which case everything is cast.
The model must not be updated while a decoder is in use (one decoder per
rollout).

Typical use (the sampler in ``engine/rollout.py``)::

    dec = KVDecoder(model, max_batch_size=P * G, max_total_length=S + T)
    logits = dec.prefill(input_ids, attention_mask, repeats=G)   # [P*G, V] fp32
    for _ in range(T):
        tok = sample(logits)
        ...
        logits = dec.decode(tok)                                  # [B, V] fp32
        # optional: alive = (~done).nonzero().squeeze(1); dec.keep_rows(alive)
        # after which decode takes / returns only the kept rows, in that order.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KVDecoder", "unsupported_reason"]

# rope types whose cos/sin depend only on the position (not on the sequence
# length); for these the model's rotary module gives an exact, static table.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_type(config) -> str | None:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None)
    if params is None:
        return "default"
    if not isinstance(params, dict):
        return None
    # transformers 5 may store per-layer-type dicts ({"full_attention": {...}})
    if "rope_type" not in params and "type" not in params and params:
        vals = list(params.values())
        if all(isinstance(v, dict) for v in vals):
            types = {v.get("rope_type", v.get("type", "default")) for v in vals}
            return types.pop() if len(types) == 1 else None
    return params.get("rope_type", params.get("type", "default"))


def _onednn_available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except Exception:  # pragma: no cover - exotic builds
        return False


def unsupported_reason(model) -> str | None:
    """Why `KVDecoder` cannot snapshot `model` (None: it can). Subclasses of the transformers
    Llama / Qwen2 causal LMs count (FSDP2's `fully_shard` makes one)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    config = getattr(model, "config", None)
    if not isinstance(model, (LlamaForCausalLM, Qwen2ForCausalLM)) or config is None:
        return f"{type(model).__name__} is not a Llama / Qwen2 causal LM"
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "its weights are sharded (FSDP2); gather them into a full copy first"
    if _rope_type(config) not in _STATIC_ROPE_TYPES:
        return f"rope type {_rope_type(config)!r} is not one of {_STATIC_ROPE_TYPES}"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "it has sliding-window layers"
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False) \
            and getattr(config, "sliding_window", None) is not None:
        return "it uses sliding-window attention"
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return f"activation {getattr(config, 'hidden_act', None)!r} is not silu"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "it lacks the usual model.layers / model.rotary_emb structure"
    eps = {float(norm.variance_epsilon) for layer in inner.layers
           for norm in (layer.input_layernorm, layer.post_attention_layernorm)}
    if len(eps) > 1:
        return f"its layers' RMSNorm eps differ ({sorted(eps)})"
    return None


# --------------------------------------------------------------------------- the layer math
# Module-level so that the eager step, the static (graph-shaped) step and its torch.compile'd
# form run the same source; `sum_form` / `packed` pick the CPU fp32 variants (see the docstring).
def rms_norm(x: Tensor, weight: Tensor | None, eps: float, sum_form: bool) -> Tensor:
    """transformers' RMSNorm: x * rsqrt(mean(x^2) + eps) computed in fp32, rounded to
    x's dtype, then times weight; None = weight folded into the next GEMM (fp32).
    `F.rms_norm` without a weight does exactly the fp32-then-round part (it computes
    in fp32 for bf16 / fp16 input), in one fused kernel on GPUs where the
    spelled-out formula takes seven. On CPU in fp32 its kernel is a dozen small ops;
    `sum_form`: x * rsqrt(sum(x^2) + d eps) = rms_norm(x) / sqrt(d) takes four (the
    folded weights carry the sqrt(d))."""
    if sum_form:
        return x * (x * x).sum(-1, keepdim=True).add_(x.shape[-1] * eps).rsqrt_()
    normalized = F.rms_norm(x, (x.shape[-1],), eps=eps)
    return normalized if weight is None else weight * normalized


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., n, D] -> x * cos + rotate_half(x) * sin; cos / sin [..., 1, D] (sin's first half negated)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


def linear(a: Tensor, weight: Tensor, bias: Tensor | None, packed: bool) -> Tensor:
    """a @ weight.T (+ bias); `packed`: weight prepacked for oneDNN (CPU fp32)."""
    if packed:
        return torch.ops.mkldnn._linear_pointwise(a, weight, bias, "none", [], "")
    return F.linear(a, weight, bias)


def residual_linear(x: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None, packed: bool) -> Tensor:
    """x + a @ weight.T (+ bias), the residual add fused into the GEMM."""
    if packed:
        return torch.ops.mkldnn._linear_pointwise.binary(a, x, weight, bias, "add")
    out = torch.addmm(x.flatten(0, -2), a.flatten(0, -2), weight.t()).view(x.shape)
    return out if bias is None else out.add_(bias)


class StepFunctions(NamedTuple):
    """A decode step's math between the K/V cache writes, per layer: `attention_inputs` (RMSNorm,
    the qkv GEMM, RoPE, q scaled), `attention_and_mlp` (attention over the cache, the o GEMM,
    `mlp_residual`); then `logits` (final RMSNorm, LM head)."""

    attention_inputs: Callable
    attention_and_mlp: Callable
    mlp_residual: Callable
    logits: Callable


@functools.lru_cache(maxsize=None)
def step_functions(heads: int, kv_heads: int, scaling: float, intermediate: int, layer_eps: float, norm_eps: float,
                   sum_form: bool, packed: bool, backend: str | None) -> StepFunctions:
    """The decode step's functions for one model shape. `backend` (e.g. "inductor") compiles the
    element-wise chains between the matrix products (RMSNorm and its weight; RoPE, the q scale and
    the K/V split; SiLU times up) with `torch.compile(dynamic=True)`, one fused kernel each where
    eager runs two to seven. The products, their bias / residual epilogues and the attention stay
    cuBLAS calls: compiling the whole layer was measured slower on an H200 (0.91x; inductor split
    the GEMM epilogues and the softmax into extra kernels and layout copies). One compilation
    serves every layer, batch size and key length, and every decoder of this shape in the process
    (hence the cache)."""
    group = heads // kv_heads

    def normalize(x: Tensor, weight: Tensor | None) -> Tensor:
        return rms_norm(x, weight, layer_eps, sum_form)

    def normalize_final(x: Tensor, weight: Tensor | None) -> Tensor:
        return rms_norm(x, weight, norm_eps, sum_form)

    def rotate_and_split(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """qkv [P, R, (H+2KV)*D]; cos / sin [P, R, 1, D] -> q [P*KV, R*G, D] (scaled; rows in (prompt, kv head,
        sample, head) order, the order the shared prompt keys are read in) and new_kv [2, P, KV, R, D]."""
        P, R, _ = qkv.shape
        qkv = qkv.view(P, R, heads + 2 * kv_heads, -1)                            # [P, R, H+2KV, D]
        D = qkv.shape[-1]
        qk = rope(qkv[:, :, : heads + kv_heads], cos, sin)                        # [P, R, H+KV, D]
        q = qk[:, :, :heads].reshape(P, R, kv_heads, group, D).transpose(1, 2)    # [P, KV, R, G, D]
        q = (q * scaling).reshape(P * kv_heads, R * group, D)
        new_kv = torch.stack((qk[:, :, heads:], qkv[:, :, heads + kv_heads:]))   # [2, P, R, KV, D]
        return q, new_kv.transpose(2, 3)                                          # [2, P, KV, R, D]

    def gated_activation(gate_and_up: Tensor) -> Tensor:
        """silu(gate) * up, gate and up the two halves of one GEMM's output."""
        gate, up = gate_and_up[..., :intermediate], gate_and_up[..., intermediate:]
        if backend is None:
            return F.silu(gate, inplace=True).mul_(up)  # eager: in place, no new tensor
        return F.silu(gate) * up  # compiled: one kernel; in place it would also write the input back

    if backend is not None:
        compile_ = functools.partial(torch.compile, backend=backend, dynamic=True, fullgraph=True)
        normalize, normalize_final = compile_(normalize), compile_(normalize_final)
        rotate_and_split, gated_activation = compile_(rotate_and_split), compile_(gated_activation)

    def attention_inputs(x: Tensor, norm_weight: Tensor | None, qkv_weight: Tensor, qkv_bias: Tensor | None,
                         cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x [P, R, hidden] -> q [P*KV, R*G, D], new_kv [2, P, KV, R, D] (see rotate_and_split)."""
        return rotate_and_split(linear(normalize(x, norm_weight), qkv_weight, qkv_bias, packed), cos, sin)

    def mlp_residual(x: Tensor, norm_weight: Tensor | None, gate_up: Tensor, gate_up_bias: Tensor | None,
                     down: Tensor, down_bias: Tensor | None) -> Tensor:
        """x + down(silu(gate(h)) * up(h)), h = RMSNorm(x); gate and up are one GEMM."""
        act = gated_activation(linear(normalize(x, norm_weight), gate_up, gate_up_bias, packed))
        return residual_linear(x, act, down, down_bias, packed)

    def attention_and_mlp(x: Tensor, q: Tensor, prompt_bias: Tensor, prompt_keys: Tensor, prompt_values: Tensor,
                          generated_keys: Tensor, generated_values: Tensor, generated_bias: Tensor | None,
                          o_weight: Tensor, o_bias: Tensor | None, norm_weight: Tensor | None, gate_up: Tensor,
                          gate_up_bias: Tensor | None, down: Tensor, down_bias: Tensor | None) -> Tensor:
        """x [P, R, hidden]; q [P*KV, R*G, D]; prompt_keys / values [P*KV, S, D] (shared by a prompt's
        samples), prompt_bias [P*KV, 1, S] (-inf at padding); generated_keys / values [P*KV*R, L, D],
        generated_bias [L] (-inf at slots not yet written; None: all L are written) -> x [P, R, hidden]."""
        P, R, _ = x.shape
        S, D = prompt_keys.shape[1], prompt_keys.shape[2]
        rows = P * kv_heads * R                                                   # one per (prompt, kv, sample)
        # scores: shared prompt keys (one GEMM per prompt x kv head) ++ the row's own generated keys
        prompt_scores = torch.baddbmm(prompt_bias, q, prompt_keys.transpose(1, 2))     # [P*KV, R*G, S]
        q_rows = q.view(rows, group, D)
        if generated_bias is None:
            generated_scores = torch.bmm(q_rows, generated_keys.transpose(1, 2))        # [P*KV*R, G, L]
        else:
            generated_scores = torch.baddbmm(generated_bias, q_rows, generated_keys.transpose(1, 2))
        scores = torch.cat((prompt_scores.view(rows, group, S), generated_scores), dim=-1)  # [P*KV*R, G, S+L]
        if scores.dtype == torch.float32:
            probs = torch.softmax(scores, dim=-1)
        else:  # low precision: softmax in fp32 as transformers' eager attention
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        out = torch.bmm(probs.view(P * kv_heads, R * group, -1)[:, :, :S], prompt_values)  # [P*KV, R*G, D]
        out = out.view(rows, group, D).baddbmm_(probs[:, :, S:], generated_values)
        out = out.view(P, kv_heads, R, group, D).transpose(1, 2).reshape(P, R, heads * D)
        x = residual_linear(x, out, o_weight, o_bias, packed)
        return mlp_residual(x, norm_weight, gate_up, gate_up_bias, down, down_bias)

    def logits(x: Tensor, norm_weight: Tensor | None, head: Tensor, head_bias: Tensor | None) -> Tensor:
        """x [B, hidden] -> logits [B, V] in fp32."""
        return linear(normalize_final(x, norm_weight), head, head_bias, packed).float()

    return StepFunctions(attention_inputs, attention_and_mlp, mlp_residual, logits)


class KVDecoder:
    """Lean prefill + single-token decode forward for the Llama/Qwen2 family, built from a transformers model's weights."""

    # ------------------------------------------------------------------ setup
    @staticmethod
    def supports(model) -> bool:
        return unsupported_reason(model) is None

    def __init__(self, model, max_batch_size: int, max_total_length: int, pack_weights: bool | None = None,
                 dtype: torch.dtype | None = None, cuda_graphs: bool | None = None, static_decode: bool = False,
                 graph_bucket: int = 64, compile_step: bool | str = False):
        """Snapshot ``model``'s current weights; preallocate the cache for up to
        ``max_batch_size`` rows (= prompts x repeats) and ``max_total_length``
        positions (padded prompt length + new tokens).

        ``pack_weights``: prepack GEMM weights for oneDNN; default (None) = on
        for fp32 on CPU, and it is never used elsewhere. ``dtype``: precision
        of the snapshot and the cache (None = the model's). ``cuda_graphs``:
        capture the decode step (None = on when the model is on CUDA).
        ``static_decode``: run the graph-shaped step eagerly (for tests).
        ``graph_bucket``: generated-key length granularity of the captured
        steps. ``compile_step``: fuse the static step's element-wise chains with
        ``torch.compile`` (True = inductor, which needs Triton; a string = that
        backend); the graphs then replay the fused kernels. Off by default: on an
        H200 at Q05 it gave 1.02x, the step being bound by its small matrix
        products (`step_functions`), and the first decoder of a model shape in a
        process pays the compilation (~20 s there).
        Cost: a few cats/copies of the weights (~10 ms at C0)."""
        if not self.supports(model):
            raise ValueError(f"KVDecoder cannot sample {type(model).__name__}: {unsupported_reason(model)}")
        inner = model.model
        config = model.config
        attn0 = inner.layers[0].self_attn
        w0 = attn0.q_proj.weight
        self.device = w0.device
        self.dtype = w0.dtype if dtype is None else dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"KVDecoder dtype must be a floating-point dtype, got {self.dtype}")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if graph_bucket < 1:
            raise ValueError(f"graph_bucket must be >= 1, got {graph_bucket}")
        self.cuda_graphs = bool(cuda_graphs)
        self.static_decode = bool(static_decode) or self.cuda_graphs
        if compile_step and not self.static_decode:
            raise ValueError("compile_step compiles the static decode step: turn on cuda_graphs or static_decode")
        self.compile_backend = ("inductor" if compile_step is True else compile_step) if compile_step else None
        self.graph_bucket = int(graph_bucket)
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = attn0.head_dim
        self.group = self.n_heads // self.n_kv
        self.scaling = float(attn0.scaling)
        self.hidden = config.hidden_size
        self.max_batch = int(max_batch_size)
        self.max_len = int(max_total_length)

        # ---- weights (detached snapshot; fused matrices are fresh copies)
        def snap(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.detach().to(self.dtype)

        with torch.no_grad():
            self.embed = snap(inner.embed_tokens.weight)
            self.layers = []
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                qkv_b = None
                if a.q_proj.bias is not None:
                    qkv_b = snap(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
                gu_b = None
                if m.gate_proj.bias is not None:
                    gu_b = snap(torch.cat([m.gate_proj.bias, m.up_proj.bias]))
                self.layers.append(dict(
                    ln1=snap(layer.input_layernorm.weight),
                    qkv=snap(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                    qkv_b=qkv_b,
                    o=snap(a.o_proj.weight),
                    o_b=snap(a.o_proj.bias),
                    ln2=snap(layer.post_attention_layernorm.weight),
                    gu=snap(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                    gu_b=gu_b,
                    down=snap(m.down_proj.weight),
                    down_b=snap(m.down_proj.bias),
                ))
            self.norm_w = snap(inner.norm.weight)
            self.norm_eps = float(inner.norm.variance_epsilon)
            self.layer_eps = float(inner.layers[0].input_layernorm.variance_epsilon)  # the same in every layer
            self.lm_head = snap(model.lm_head.weight)
            self.lm_head_b = snap(getattr(model.lm_head, "bias", None))
            self.intermediate = self.layers[0]["gu"].shape[0] // 2

            # ---- fp32: fold the RMSNorm weights into the following GEMM
            # (W @ (w * h) == (W * w) @ h up to rounding), leaving the norm a
            # bare x * rsqrt(mean(x^2) + eps). Low precision keeps transformers'
            # exact order of roundings instead.
            # On CPU the norm is x * rsqrt(sum(x^2) + hidden * eps), a factor
            # sqrt(hidden) off, which the folded weights absorb (`rms_norm`).
            self.fold_norms = self.dtype == torch.float32
            self.sum_norm = self.fold_norms and self.device.type == "cpu"
            scale = self.hidden ** 0.5 if self.sum_norm else 1.0
            if self.fold_norms:
                for lw in self.layers:
                    lw["qkv"] = lw["qkv"] * (lw["ln1"] * scale)
                    lw["gu"] = lw["gu"] * (lw["ln2"] * scale)
                    lw["ln1"] = lw["ln2"] = None
                self.lm_head = self.lm_head * (self.norm_w * scale)
                self.norm_w = None

            # ---- CPU fp32: prepack every GEMM weight for oneDNN (see the module
            # docstring's speed notes). Packed copies replace the plain ones.
            if pack_weights is None:
                pack_weights = self.device.type == "cpu" and self.dtype == torch.float32
            self.packed = (bool(pack_weights) and self.device.type == "cpu"
                           and self.dtype == torch.float32 and _onednn_available())
            if self.packed and self.compile_backend is not None:
                raise ValueError("compile_step cannot compile oneDNN-packed weights: pass pack_weights=False")
            if self.packed:
                pack = lambda w: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), self.max_batch)
                for lw in self.layers:
                    for key in ("qkv", "o", "gu", "down"):
                        lw[key] = pack(lw[key])
                self.lm_head = pack(self.lm_head)

            # ---- RoPE table from the model's own rotary module (exact mirror)
            pos = torch.arange(self.max_len, device=self.device).unsqueeze(0)
            probe = torch.empty(1, device=self.device, dtype=self.dtype)
            cos, sin = inner.rotary_emb(probe, pos)
            cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [L, D]
            half = self.head_dim // 2
            # rotate_half(x) * sin == swap_halves(x) * sin_signed
            sin_signed = sin.clone()
            sin_signed[:, :half].neg_()
            self.cos = cos.contiguous()
            self.sin = sin_signed.contiguous()

        # ---- caches and per-row state
        # The prompt part of the KV cache is stored once per prompt
        # ([layers, P, kv, S, D], allocated by prefill); the generated part is
        # per row, batch-ordered (prompt, kv_head, sample) so that the single
        # query of all `repeats` samples x `heads_per_kv` heads of a prompt and
        # kv head is one GEMM against the shared prompt keys, and the scores of
        # the two parts concatenate without a transpose.
        n_layers = len(self.layers)
        shape = (n_layers, self.max_batch * self.n_kv, self.max_len, self.head_dim)
        # the static step reads slots not yet written (masked): they must hold finite values
        allocate = torch.zeros if self.static_decode else torch.empty
        self.generated_kv = allocate((n_layers, 2, *shape[1:]), device=self.device, dtype=self.dtype)
        self.gk, self.gv = self.generated_kv[:, 0], self.generated_kv[:, 1]  # views: [layers, rows*KV, Lmax, D]
        self.pk = self.pv = self.pbias = None
        self.positions = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self.P = self.R = 0  # active rows = P * R, row = p * R + r
        self.S = 0           # prompt length (padded)
        self.t = 0           # generated tokens in the cache (same for all rows)
        # static decode: the step index also lives on the device, token ids come
        # through a fixed buffer, and captured graphs are kept per shape.
        self.step_index = torch.zeros((), dtype=torch.long, device=self.device)        # == self.t
        self.generated_slots = torch.arange(self.max_len, device=self.device)          # [Lmax]
        self.token_buffer = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.graph_pool = None  # one memory pool for the graphs captured since the last drop
        self.captures, self.capture_seconds = 0, 0.0  # graphs captured, and the host time spent on it

        # the step's math (module functions above); the static step runs it compiled when asked
        constants = (self.n_heads, self.n_kv, self.scaling, self.intermediate, self.layer_eps, self.norm_eps,
                     self.sum_norm, self.packed)
        self.eager_steps = step_functions(*constants, backend=None)
        self.static_steps = step_functions(*constants, backend=self.compile_backend)

    @property
    def n_rows(self) -> int:
        return self.P * self.R

    # ------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor, repeats: int) -> Tensor:
        self._drop_graphs()
        P, S = input_ids.shape
        R = int(repeats)
        B = P * R
        if B > self.max_batch:
            raise ValueError(f"P*repeats={B} > max_batch_size={self.max_batch}")
        if S >= self.max_len:
            raise ValueError(f"prompt length {S} leaves no room in max_total_length={self.max_len}")
        H, KV, D, G = self.n_heads, self.n_kv, self.head_dim, self.group
        dev = self.device
        input_ids = input_ids.to(dev)
        mask = attention_mask.to(dev).bool()
        n_real = mask.sum(-1)                               # [P]
        pos = (mask.long().cumsum(-1) - 1).clamp_(min=0)    # [P, S]
        cos = self.cos[pos].unsqueeze(1)                    # [P, 1, S, D]
        sin = self.sin[pos].unsqueeze(1)

        # attention mask [P, 1, S, S] (True = attend): causal & key is real; the
        # diagonal is always allowed so that pad queries never see an all-masked row.
        ar = torch.arange(S, device=dev)
        causal = ar[None, :] <= ar[:, None]
        allowed = causal[None] & (mask[:, None, :] | torch.eye(S, dtype=torch.bool, device=dev)[None])
        allowed = allowed[:, None]

        n_layers = len(self.layers)
        self.pk = torch.empty(n_layers, P * KV, S, D, device=dev, dtype=self.dtype)
        self.pv = torch.empty(n_layers, P * KV, S, D, device=dev, dtype=self.dtype)

        x = F.embedding(input_ids, self.embed)              # [P, S, hidden]
        for li, lw in enumerate(self.layers):
            h = rms_norm(x, lw["ln1"], self.layer_eps, self.sum_norm)
            qkv = linear(h, lw["qkv"], lw["qkv_b"], self.packed)  # [P, S, (H+2KV)*D]
            qkv = qkv.view(P, S, H + 2 * KV, D).transpose(1, 2)  # [P, H+2KV, S, D]
            qk = rope(qkv[:, : H + KV], cos, sin)           # [P, H+KV, S, D]
            k = self.pk[li].view(P, KV, S, D)
            v = self.pv[li].view(P, KV, S, D)
            k.copy_(qk[:, H:])
            v.copy_(qkv[:, H + KV:])
            # SDPA (flash / memory-efficient kernels: the [S, S] scores are never
            # stored on GPUs); GQA by expanding each kv head to its G query heads
            k_heads = k[:, :, None].expand(P, KV, G, S, D).reshape(P, H, S, D)
            v_heads = v[:, :, None].expand(P, KV, G, S, D).reshape(P, H, S, D)
            o = F.scaled_dot_product_attention(qk[:, :H], k_heads, v_heads, attn_mask=allowed,
                                               scale=self.scaling)                # [P, H, S, D]
            o = o.transpose(1, 2).reshape(P, S, H * D)
            x = residual_linear(x, o, lw["o"], lw["o_b"], self.packed)
            x = self.eager_steps.mlp_residual(x, lw["ln2"], lw["gu"], lw["gu_b"], lw["down"], lw["down_b"])

        logits = self.eager_steps.logits(x[:, -1], self.norm_w, self.lm_head, self.lm_head_b)  # [P, V]

        # per-row decode state
        self.P, self.R, self.S, self.t = P, R, S, 0
        self.step_index.zero_()
        pbias = torch.zeros(P, KV, 1, S, device=dev, dtype=self.dtype)
        self.pbias = pbias.masked_fill_(~mask[:, None, None, :], float("-inf")).view(P * KV, 1, S)
        self.positions[:B].copy_(n_real.repeat_interleave(R))
        return logits.repeat_interleave(R, dim=0)

    # -------------------------------------------------------------- decode
    @torch.inference_mode()
    def decode(self, token_ids: Tensor) -> Tensor:
        """Logits [B, V] (fp32) of the next token after ``token_ids`` [B], one per active row.

        With CUDA graphs the returned tensor is the graph's output buffer: it is
        overwritten by the next ``decode``, so use it before calling again."""
        B = token_ids.shape[0]
        if B != self.n_rows:
            raise ValueError(f"decode got {B} rows, {self.n_rows} are active (see keep_rows)")
        if self.S + self.t >= self.max_len:
            raise ValueError(f"KV cache full (max_total_length={self.max_len})")
        if not self.static_decode:
            logits = self._decode_step(token_ids.to(self.device), self.t + 1, static=False)
        else:
            # generated keys are read up to the next multiple of graph_bucket
            buckets = -(-(self.t + 1) // self.graph_bucket)
            kv_length = min(buckets * self.graph_bucket, self.max_len - self.S)
            self.token_buffer[:B].copy_(token_ids)
            if self.cuda_graphs:
                logits = self._replay(B, kv_length)
            else:
                logits = self._decode_step(self.token_buffer[:B], kv_length, static=True)
            self.step_index.add_(1)
        self.t += 1
        self.positions[:B].add_(1)
        return logits

    def _decode_step(self, token_ids: Tensor, kv_length: int, static: bool) -> Tensor:
        """One decode forward for the B active rows; writes their K/V at generated slot t.

        ``kv_length``: how many generated slots attention reads. Eager (static
        False): exactly t + 1, and t is a Python int. Static: a bucket length
        >= t + 1, slots after t masked to -inf, and t read from
        ``self.step_index`` on the device, so the same kernels serve every step
        of a bucket (what a CUDA graph needs); the static step runs the compiled
        functions when ``compile_step`` is on. Neither form changes any state
        other than the K/V at slot t, so re-running a step is harmless."""
        P, R, S, t = self.P, self.R, self.S, self.t
        B, KV, D, L = P * R, self.n_kv, self.head_dim, kv_length
        positions = self.positions[:B]
        cos = self.cos.index_select(0, positions).view(P, R, 1, D)             # [P, R, 1, D]
        sin = self.sin.index_select(0, positions).view(P, R, 1, D)
        steps = self.static_steps if static else self.eager_steps
        generated_bias = None
        if static:
            slot = self.step_index.view(1)                                       # [1] = t
            future = self.generated_slots[:L] > self.step_index                  # [L] slots after t
            generated_bias = torch.zeros(L, device=self.device, dtype=self.dtype).masked_fill_(future, float("-inf"))

        x = F.embedding(token_ids, self.embed).view(P, R, self.hidden)          # [P, R, hidden]
        for li, lw in enumerate(self.layers):
            q, new_kv = steps.attention_inputs(x, lw["ln1"], lw["qkv"], lw["qkv_b"], cos, sin)
            generated_kv = self.generated_kv[li, :, : B * KV]                    # [2, B*KV, Lmax, D]
            if static:
                generated_kv.view(2, P, KV, R, -1, D).index_copy_(4, slot, new_kv.unsqueeze(4))
            else:
                generated_kv[:, :, t].view(2, P, KV, R, D).copy_(new_kv)
            x = steps.attention_and_mlp(
                x, q, self.pbias, self.pk[li], self.pv[li], generated_kv[0, :, :L], generated_kv[1, :, :L],
                generated_bias, lw["o"], lw["o_b"], lw["ln2"], lw["gu"], lw["gu_b"], lw["down"], lw["down_b"])
        return steps.logits(x.view(B, self.hidden), self.norm_w, self.lm_head, self.lm_head_b)  # [B, V] fp32

    def _replay(self, B: int, kv_length: int) -> Tensor:
        """Run the static step for (B rows, kv_length) as a CUDA graph, capturing it on first use.

        The graphs captured since the last `_drop_graphs` share one memory pool (safe: they are
        replayed one at a time, and each one's logits stay allocated while it is kept)."""
        key = (B, kv_length)
        if key not in self.graphs:
            start = time.perf_counter()
            tokens = self.token_buffer[:B]
            # warm-up on a side stream (lazy cuBLAS / allocator set-up, and the first call of a
            # compiled step, must not happen during capture); the step is idempotent, so this is harmless
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._decode_step(tokens, kv_length, static=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = self._decode_step(tokens, kv_length, static=True)
            self.graphs[key] = (graph, logits)
            self.captures += 1
            self.capture_seconds += time.perf_counter() - start
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def _drop_graphs(self) -> None:
        """Forget the captured graphs (they point at the prompt cache, which is about to be replaced)
        and their pool. A pool's handle must not be reused once every graph captured into it is
        gone: the allocator then marks the pool free (use count 0) but keeps it until its blocks
        are released, and a new capture into it fails PyTorch's CUDA caching allocator's internal
        assertion `use_count > 0` (seen in torch 2.11). Hence a fresh pool after each drop."""
        self.graphs.clear()
        self.graph_pool = None

    # ----------------------------------------------------------- compaction
    @torch.inference_mode()
    def keep_rows(self, row_indices: Tensor) -> None:
        """Keep only ``row_indices`` (indices into the current active rows, in
        the order given); afterwards ``decode`` takes and returns
        ``len(row_indices)`` rows in that order.

        Cost: copies the kept rows' generated cache and gives each kept row
        its own copy of its prompt's cache (the decoder then runs with
        ``repeats = 1``, i.e. prompt keys are no longer shared within a group,
        which costs a little attention time per row). Worth calling when a
        sizeable fraction of rows has finished, not every step."""
        self._drop_graphs()
        idx = row_indices.to(self.device, torch.long)
        n = idx.shape[0]
        P, R, S, t, KV = self.P, self.R, self.S, self.t, self.n_kv
        n_layers = len(self.layers)
        prompt_of = torch.div(idx, R, rounding_mode="floor")
        D, Lm = self.head_dim, self.max_len
        self.pk = self.pk.view(n_layers, P, KV, S, D).index_select(1, prompt_of).view(n_layers, n * KV, S, D)
        self.pv = self.pv.view(n_layers, P, KV, S, D).index_select(1, prompt_of).view(n_layers, n * KV, S, D)
        self.pbias = self.pbias.view(P, KV, 1, S).index_select(0, prompt_of).view(n * KV, 1, S)
        for cache in (self.gk, self.gv):
            rows = cache[:, : P * R * KV].view(n_layers, P, KV, R, Lm, D)[:, :, :, :, :t]
            rows = rows.transpose(2, 3).reshape(n_layers, P * R, KV, t, D).index_select(1, idx)
            cache[:, : n * KV].view(n_layers, n, KV, Lm, D)[:, :, :, :t].copy_(rows)
        self.positions[:n] = self.positions.index_select(0, idx)
        self.P, self.R = n, 1
