"""Transformers teacher: batched `generate` (or one forward pass over given completions), top-k of the
log-softmax of the raw (unprocessed) logits.

This is the CPU path and the parity reference for the vLLM backends: logprobs are the teacher's
distribution at temperature 1 before any sampling processor (docs/design.md, `logprobs_mode: raw`).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import HFTeacherConfig
from pipeline.dataset.schema import Generation
from pipeline.models import eos_ids, load_causal_lm, load_tokenizer, output_head
from pipeline.teachers.base import SamplingSpec, TeacherInfo


class HFTeacher:
    """A transformers causal LM behind the Teacher protocol."""

    def __init__(self, cfg: HFTeacherConfig):
        import transformers

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        self.model = load_causal_lm(
            cfg.model,
            revision=cfg.revision,
            dtype=cfg.dtype,
            device=cfg.device,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.eos = eos_ids(self.tokenizer, self.model)
        self.info = TeacherInfo(
            model=cfg.model,
            backend="hf",
            revision=cfg.revision,
            versions={"transformers": transformers.__version__, "torch": torch.__version__},
            vocab_size=int(self.model.get_output_embeddings().weight.shape[0]),
            tokenizer_size=len(self.tokenizer),
            eos_token_ids=tuple(self.eos),
        )

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[Generation]]:
        out: list[list[Generation]] = []
        bs = max(1, self.cfg.batch_size // spec.n)
        for start in range(0, len(prompts), bs):
            torch.manual_seed(seed * 1_000_003 + start)
            batch = [p for p in prompts[start : start + bs] for _ in range(spec.n)]
            gens = self._generate_batch(batch, spec)
            out.extend(gens[i : i + spec.n] for i in range(0, len(gens), spec.n))
        return out

    def _generate_batch(self, batch: list[list[int]], spec: SamplingSpec) -> list[Generation]:
        from transformers import GenerationConfig

        device = self.model.device
        width = max(len(p) for p in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        sample = spec.temperature > 0
        gen_cfg = GenerationConfig(  # explicit values; load_causal_lm already blanked the model's own defaults
            do_sample=sample,
            temperature=spec.temperature if sample else None,
            top_p=spec.top_p if sample else None,
            top_k=0 if sample else None,
            max_new_tokens=spec.max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
        res = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg)
        new = res.sequences[:, width:]
        topk_ids, topk_lp, tok_lp = [], [], []
        for step, logits in enumerate(res.logits):  # one [B, V] step at a time: no B x S x V tensor
            logp = torch.log_softmax(logits.float(), dim=-1)
            values, ids = logp.topk(spec.k, dim=-1)
            topk_ids.append(ids)
            topk_lp.append(values)
            tok_lp.append(logp.gather(-1, new[:, step : step + 1]).squeeze(-1))
        ids_all = torch.stack(topk_ids, 1).cpu().numpy().astype(np.int32)
        lp_all = torch.stack(topk_lp, 1).cpu().numpy().astype(np.float32)
        tok_all = torch.stack(tok_lp, 1).cpu().numpy().astype(np.float32)
        seqs = new.cpu().numpy().astype(np.int32)
        gens = []
        for b in range(len(batch)):
            stops = np.nonzero(np.isin(seqs[b], self.eos))[0]
            length = int(stops[0]) + 1 if len(stops) else seqs.shape[1]
            gens.append(
                Generation(
                    completion_token_ids=seqs[b, :length].copy(),
                    token_logprobs=tok_all[b, :length].copy(),
                    topk_token_ids=ids_all[b, :length].copy(),
                    topk_logprobs=lp_all[b, :length].copy(),
                    finish_reason="stop" if len(stops) else "length",
                )
            )
        return gens

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> list[Generation]:
        out: list[Generation] = []
        for lo in range(0, len(prompts), self.cfg.batch_size):
            hi = lo + self.cfg.batch_size
            out += self._score_batch(prompts[lo:hi], completions[lo:hi], k)
        return out

    def _score_batch(self, prompts: list[list[int]], completions: list[list[int]], k: int) -> list[Generation]:
        """One forward over prompt + completion (right-padded); the LM head runs only at the positions that predict
        completion tokens, a chunk at a time, so no [batch x length x vocab] tensor is made."""
        device, pad = self.model.device, self.tokenizer.pad_token_id
        seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
        width = max(map(len, seqs))
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        trunk = getattr(self.model, self.model.base_model_prefix)
        hidden = trunk(input_ids=input_ids, attention_mask=attention).last_hidden_state
        rows = torch.cat([torch.full((len(c),), b) for b, c in enumerate(completions)])
        cols = torch.cat([torch.arange(len(p) - 1, len(p) + len(c) - 1) for p, c in zip(prompts, completions)])
        targets = torch.tensor([t for c in completions for t in c], device=device)
        positions = hidden[rows.to(device), cols.to(device)]
        head = output_head(self.model)
        top_lp, top_ids, tok_lp = [], [], []
        for lo in range(0, len(positions), 1024):
            logits = head(positions[lo : lo + 1024]).float()
            logp = torch.log_softmax(logits, dim=-1)
            values, ids = logp.topk(k, dim=-1)
            top_lp.append(values)
            top_ids.append(ids)
            tok_lp.append(logp.gather(-1, targets[lo : lo + 1024, None]).squeeze(-1))
        lp_all = torch.cat(top_lp).cpu().numpy().astype(np.float32)
        ids_all = torch.cat(top_ids).cpu().numpy().astype(np.int32)
        tok_all = torch.cat(tok_lp).cpu().numpy().astype(np.float32)
        gens, lo = [], 0
        for c in completions:
            hi = lo + len(c)
            gens.append(Generation(np.asarray(c, np.int32), tok_all[lo:hi], ids_all[lo:hi], lp_all[lo:hi], "given"))
            lo = hi
        return gens

    def close(self) -> None:
        self.model = None
