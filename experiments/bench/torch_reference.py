"""LocFT-BF written the straightforward way in PyTorch + transformers: the speed and parity reference.

Same algorithm as ``locft_jax.engine.edit``, written independently of it: a transformers model
with every parameter frozen except one ``down_proj``; right-padded batches; HF-style labels
(-100 outside the target span), masked cross-entropy averaged per sample, then over the batch;
``torch.optim.Adam``. Only the token ids (``locft_jax.tokens``) and the batch order
(``epoch_order``/``batches``) are shared, so both implementations see identical inputs.
The full model runs forward and the LM head scores every position, as the reference code does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from locft_jax.engine.dataset import batches, epoch_order
from locft_jax.requests import EditRequest
from locft_jax.tokens import encode_pair

IGNORE = -100
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_torch_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> transformers.PreTrainedModel:
    """The transformers model from the same checkpoint (a ``.gguf`` file or an HF directory)."""
    path = Path(path)
    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[dtype]}
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device).eval()


def torch_model_from_params(
    config, params, dtype: str = "float32", device: str = "cpu"
) -> transformers.PreTrainedModel:
    """A transformers model holding our (HF-named, HF-layout) ``params``: for random-shape runs.

    Built on ``device`` and filled through DLPack, so an 8B model goes device to device with no
    float32 host copy (single-device arrays; ``copy_`` casts where the dtypes differ).
    """
    from locft_jax.params import flatten

    hf = config.to_hf_config()
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=TORCH_DTYPES[dtype])
    state = model.state_dict()
    with torch.no_grad():
        for name, value in flatten(params).items():
            state[name].copy_(torch.from_dlpack(value))
    return model.eval()


@dataclasses.dataclass
class Encoded:
    """Each request as token ids plus where its target starts (prompt tokens are never scored)."""

    ids: list[list[int]]
    prompt_len: list[int]


def encode(tokenizer: Any, requests: Sequence[EditRequest]) -> Encoded:
    ids, prompt_len = [], []
    for req in requests:
        prompt, target = encode_pair(tokenizer, req.prompt, req.target_new)
        ids.append(prompt + target)
        prompt_len.append(len(prompt))
    return Encoded(ids, prompt_len)


def collate(enc: Encoded, rows: Sequence[int], pad_id: int, device: str) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (target tokens only)."""
    width = max(len(enc.ids[r]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        seq, p = enc.ids[r], enc.prompt_len[r]
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        labels[b, p : len(seq)] = torch.tensor(seq[p:])
    return ids.to(device), mask.to(device), labels.to(device)


def masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target tokens: mean within each sample, then mean over the batch."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    counted = (labels != IGNORE).float()
    return ((token * counted).sum(-1) / counted.sum(-1).clamp(min=1.0)).mean()


def down_proj(model: transformers.PreTrainedModel, layer: int) -> torch.nn.Parameter:
    return model.model.layers[layer].mlp.down_proj.weight


@dataclasses.dataclass
class TorchRun:
    seconds: float  # encoding + training (model load excluded)
    epoch_seconds: list[float]
    losses: list[float]
    weight: np.ndarray  # the trained down_proj, float32


def train(
    model: transformers.PreTrainedModel,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    skip_step_loss: float = 0.0,
    early_stop_loss: float = 0.0,
) -> TorchRun:
    """LocFT-BF on ``model`` in place: ``down_proj`` of ``layer`` trains, all else is frozen."""
    t0 = time.perf_counter()
    device = str(next(model.parameters()).device)
    enc = encode(tokenizer, requests)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for p in model.parameters():
        p.requires_grad_(False)
    weight = down_proj(model, layer)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    epoch_seconds, losses = [], []
    for epoch in range(epochs):
        e0 = time.perf_counter()
        epoch_losses = []
        for rows in batches(epoch_order(len(enc.ids), seed, epoch), batch_size):
            ids, mask, labels = collate(enc, rows.tolist(), pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = masked_loss(logits, labels)
            epoch_losses.append(loss.item())
            if epoch_losses[-1] < skip_step_loss:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epoch_seconds.append(time.perf_counter() - e0)
        losses.append(float(np.mean(epoch_losses)))
        if losses[-1] < early_stop_loss:
            break
    weight.requires_grad_(False)
    trained = weight.detach().float().cpu().numpy().copy()
    return TorchRun(time.perf_counter() - t0, epoch_seconds, losses, trained)
