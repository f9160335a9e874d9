"""PyTorch reference of cde-small-v2's two stages, written from docs/model.md §3-5 on top of
`transformers.ModernBertModel` (the second stage: `embeddings(input_ids)` then the
`inputs_embeds` call). Loads a released-layout dir with `safetensors.torch` (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer


def hf_config(backbone_json: dict, attn_implementation: str = "eager"):
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "norm_eps", "norm_bias", "attention_bias", "mlp_bias",
            "global_attn_every_n_layers", "local_attention", "global_rope_theta",
            "local_rope_theta", "hidden_activation", "pad_token_id", "cls_token_id",
            "sep_token_id", "max_position_embeddings")
    kw = {k: backbone_json[k] for k in keys if k in backbone_json}
    for k in ("bos_token_id", "eos_token_id"):
        kw[k] = None
    cfg = transformers.ModernBertConfig(**kw)
    cfg._attn_implementation = attn_implementation
    return cfg


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _head(state: dict, prefix: str, act: torch.nn.Module) -> torch.nn.Sequential:
    w0, w2 = state[f"{prefix}.0.weight"], state[f"{prefix}.2.weight"]
    seq = torch.nn.Sequential(torch.nn.Linear(w0.shape[1], w0.shape[0]), act,
                              torch.nn.Linear(w2.shape[1], w2.shape[0]))
    seq.load_state_dict(_sub(state, prefix + "."), strict=True)
    return seq.eval()


class TorchCde:
    def __init__(self, ckpt_dir: str | Path, attn_implementation: str = "eager"):
        ckpt_dir = Path(ckpt_dir)
        self.config = json.loads((ckpt_dir / "config.json").read_text())
        backbone_json = json.loads((ckpt_dir / "modernbert_config.json").read_text())
        state = load_file(str(ckpt_dir / "model.safetensors"))
        cfg = hf_config(backbone_json, attn_implementation)
        self.embedder = transformers.ModernBertModel(cfg).eval()
        self.embedder.load_state_dict(_sub(state, "first_stage_model.embedder."), strict=True)
        self.backbone = transformers.ModernBertModel(cfg).eval()
        self.backbone.load_state_dict(_sub(state, "second_stage_model.backbone."), strict=True)
        self.mlp = _head(state, "first_stage_model.mlp", torch.nn.GELU())
        self.prompt_projection = _head(state, "second_stage_model.prompt_projection",
                                       torch.nn.ReLU())
        self.output_projection = _head(state, "second_stage_model.output_projection",
                                       torch.nn.ReLU())
        self.null_embedding = state.get("second_stage_model.sequence_dropout_null_embedding")
        self.hidden = cfg.hidden_size
        tok = Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
        self.colon_id = tok.encode(": ", add_special_tokens=False).ids[0]
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def to(self, device, dtype=None) -> TorchCde:
        """Moves every module (e.g. to "cuda", torch.bfloat16 for the GPU benchmark)."""
        self.device, self.dtype = torch.device(device), dtype or self.dtype
        for module in (self.embedder, self.backbone, self.mlp, self.prompt_projection,
                       self.output_projection):
            module.to(self.device, self.dtype)
        if self.null_embedding is not None:
            self.null_embedding = self.null_embedding.to(self.device, self.dtype)
        return self

    def _ids_mask(self, input_ids, attention_mask):
        return (torch.as_tensor(input_ids, device=self.device).long(),
                torch.as_tensor(attention_mask, device=self.device).long())

    @staticmethod
    def mean_pool(hidden, mask):
        mask = mask.to(hidden.dtype)
        return (hidden * mask[..., None]).sum(1) / (mask.sum(1)[:, None] + 1e-20)

    def named_parameters(self):
        """(released tensor name, parameter) for every trainable tensor of both stages."""
        modules = {"first_stage_model.embedder": self.embedder,
                   "first_stage_model.mlp": self.mlp,
                   "second_stage_model.backbone": self.backbone,
                   "second_stage_model.prompt_projection": self.prompt_projection,
                   "second_stage_model.output_projection": self.output_projection}
        for prefix, module in modules.items():
            for name, param in module.named_parameters():
                yield f"{prefix}.{name}", param

    @torch.no_grad()
    def first_stage(self, input_ids, attention_mask):
        return self.first_stage_tensor(input_ids, attention_mask).float().cpu().numpy()

    def first_stage_tensor(self, input_ids, attention_mask):
        """`first_stage` as a tensor: differentiable unless called under no_grad."""
        ids, mask = self._ids_mask(input_ids, attention_mask)
        hidden = self.embedder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.mlp(self.mean_pool(hidden, mask))

    @torch.no_grad()
    def second_stage(self, input_ids, attention_mask, dataset_embeddings, null_dataset=False):
        return self.second_stage_tensor(input_ids, attention_mask, dataset_embeddings,
                                        null_dataset).float().cpu().numpy()

    def second_stage_tensor(self, input_ids, attention_mask, dataset_embeddings,
                            null_dataset=False):
        """`second_stage` as a tensor: differentiable (also w.r.t. a dataset-embeddings
        tensor) unless called under no_grad."""
        ids, mask = self._ids_mask(input_ids, attention_mask)
        dev, b = self.device, ids.shape[0]
        n_max = self.config["transductive_corpus_size"]
        if null_dataset:
            dataset = self.null_embedding[None].expand(n_max, -1)
        else:
            dataset = torch.as_tensor(dataset_embeddings).to(dev, self.dtype).reshape(
                -1, self.hidden)[:n_max]
        soft = self.prompt_projection(torch.ones(1, self.hidden, device=dev, dtype=self.dtype)
                                      ).reshape(-1, self.hidden)
        prefix = torch.cat([dataset, soft])[None].expand(b, -1, -1)
        p = prefix.shape[1]
        embeds = torch.cat([prefix, self.backbone.embeddings(ids)], dim=1)
        full_mask = torch.cat([torch.ones(b, p, dtype=torch.long, device=dev), mask], dim=1)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
        pool_mask = mask.clone()
        if self.config.get("pool_ignore_instruction_tokens", False):
            pos = torch.arange(ids.shape[1], device=dev)[None]
            hit = (ids == self.colon_id) & mask.bool() & (pos > 0)
            end = hit.int().argmax(1)
            instruction = (pos <= end[:, None]) & (end > 0)[:, None]
            pool_mask = mask * (~instruction).long()
        if self.config.get("pool_ignore_contextual_tokens", True):
            hidden = hidden[:, p:]
        else:
            pool_mask = torch.cat([torch.ones(b, p, dtype=torch.long, device=dev), pool_mask],
                                  dim=1)
        pooled = self.mean_pool(hidden, pool_mask)
        return self.output_projection(pooled) + pooled
