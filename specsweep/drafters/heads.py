"""Trained draft heads on the target's final hidden state, and their checkpoints.

Two kinds, both reading h, the target's final hidden state (its output layer's input) at the
position whose logits chose the root r, and predicting the tokens after r:

* `MedusaHeads` (Medusa-1, Cai et al. 2024): head k is a residual block, s_k = h + SiLU(W_k h + b_k),
  and predicts the token k + 1 positions after h's. The heads are independent: one batched product
  for all of them.
* `Speculator` (IBM's multi-stage MLP speculator, fms-extras; seed 002): stage k takes the previous
  stage's state (h for the first) and the embedding of the token the previous stage chose (r for the
  first), s_k = GELU(LN_k(P_k s_{k-1} + A_k e(t_{k-1}))), and predicts the next token from s_k.

Both share the target's weights where the architecture allows: the token embedding e is the target's
input embedding, and every head's output layer is the target's own (its output embedding, or the
tied input embedding where the target ties them), restricted to the ``vocab`` tokens the target
chose most often in the training data (a frequency-ranked draft vocabulary, as in FR-Spec), which
makes a head's output product several times cheaper than the target's. Only the heads' own blocks
are trained and stored.

A checkpoint holds the kind, the trained weights, the draft vocabulary, the target's fingerprint
(`target_fingerprint`), the training config and data summary; loading one for another target is
refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from specsweep.errors import SpecsweepError

KINDS = ("medusa", "speculator")
FORMAT = 1  # checkpoint layout version


def target_fingerprint(model) -> str:
    """Which target heads belong to, whatever profile loaded it: its architecture (config shapes)
    and a sample of its input embedding and final norm, rounded to bf16 (fp32 and bf16 loads agree)."""
    config = model.config
    shape = (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size,
             getattr(config, "intermediate_size", None), getattr(config, "num_attention_heads", None))
    digest = hashlib.sha256(repr(shape).encode())
    for tensor in (model.get_input_embeddings().weight, final_norm(model).weight):
        flat = tensor.detach().reshape(-1)
        digest.update(flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def final_norm(model) -> nn.Module:
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is None:
        raise SpecsweepError(f"trained heads: {type(model).__name__} has no model.norm (a Llama-like decoder is needed)")
    return norm


def output_rows(model, vocab: torch.Tensor) -> torch.Tensor:
    """The target's output-layer rows of the draft vocabulary [V', H] (a gathered copy in its dtype)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None and getattr(model.config, "tie_word_embeddings", False):
        weight = model.get_input_embeddings().weight  # prepacking released the tied output layer's alias
    if weight is None:
        raise SpecsweepError("trained heads share the target's output layer, which prepacking released: "
                             "use hardware.prepack_linear=false")
    return weight.detach()[vocab.to(weight.device)].clone()


class MedusaHeads(nn.Module):
    """K residual blocks over h -> states [..., K, H] (zero-initialised: each starts as h itself)."""

    kind = "medusa"

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, hidden, hidden))
        self.bias = nn.Parameter(torch.zeros(heads, hidden))

    @property
    def heads(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight.shape[-1]

    def states(self, h: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """h [N, H] -> [N, K, H] for the first ``heads`` heads (all by default)."""
        k = heads or self.heads
        return h[:, None] + nn.functional.silu(torch.einsum("nh,kgh->nkg", h, self.weight[:k]) + self.bias[:k])


class Speculator(nn.Module):
    """K stages; `step` runs one (batched over rows)."""

    kind = "speculator"

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.state_proj = nn.Parameter(torch.eye(hidden).repeat(heads, 1, 1))
        self.token_proj = nn.Parameter(torch.randn(heads, hidden, hidden) / math.sqrt(hidden))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(heads))

    @property
    def heads(self) -> int:
        return self.state_proj.shape[0]

    @property
    def hidden(self) -> int:
        return self.state_proj.shape[-1]

    def step(self, k: int, state: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """Stage ``k`` (0-based): previous states [N, H] and the chosen tokens' embeddings [N, H] -> [N, H]."""
        mixed = state @ self.state_proj[k].T + token_embedding @ self.token_proj[k].T
        return nn.functional.gelu(self.norms[k](mixed))


NETWORKS = {"medusa": MedusaHeads, "speculator": Speculator}


def new_heads(kind: str, hidden: int, heads: int) -> MedusaHeads | Speculator:
    if kind not in NETWORKS:
        raise SpecsweepError(f"draft heads kind={kind}: choose one of {', '.join(KINDS)}")
    return NETWORKS[kind](hidden, heads)


def save_checkpoint(path: Path, network: nn.Module, vocab: torch.Tensor, fingerprint: str, meta: dict) -> None:
    """Write a checkpoint atomically (a temp file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.loads(json.dumps(meta, default=str))  # plain types only: loading stays weights_only
    record = {"format": FORMAT, "kind": network.kind, "hidden": network.hidden, "heads": network.heads,
              "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
              "vocab": vocab.cpu(), "target_fingerprint": fingerprint, **meta}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(record, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, kind: str, fingerprint: str, target_name: str) -> tuple[nn.Module, torch.Tensor, dict]:
    """-> (network, draft vocabulary, the whole record); refused in one line when missing, of another
    kind or trained for another target."""
    path = Path(path)
    if not path.is_file():
        raise SpecsweepError(f"no trained {kind} heads for target={target_name} at {path}: run `make drafts` "
                             f"(or python -m specsweep experiment=train_heads draft={kind})")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (a truncated or foreign file)
        raise SpecsweepError(f"{path}: not a readable heads checkpoint ({type(err).__name__}: {err})") from None
    if record.get("format") != FORMAT or record.get("kind") != kind:
        raise SpecsweepError(f"{path}: a {record.get('kind')} checkpoint (format {record.get('format')}), "
                             f"not {kind} (format {FORMAT})")
    if record["target_fingerprint"] != fingerprint:
        raise SpecsweepError(f"{path}: these heads were trained for target {record.get('target', {}).get('name')} "
                             f"(fingerprint {record['target_fingerprint']}), not for target={target_name} "
                             f"(fingerprint {fingerprint}): retrain them for it")
    network = new_heads(kind, record["hidden"], record["heads"])
    network.load_state_dict(record["state_dict"])
    return network.eval(), record["vocab"], record
