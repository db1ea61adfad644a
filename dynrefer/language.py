"""The language head: region queries as a prefix to a Hugging Face LM, then the control words, then the caption.

Any encoder-decoder (T5, as the paper) or decoder-only (GPT-2, OPT, Llama) LM directory works, local or s3://.
As the official code: the control string is the control words comma-joined and ended by "|", tokenised with the
LM's EOS and embedded by the LM plus one learned vector (``control``); targets are the normalised caption with
EOS, both at most ``max_text_len`` tokens; decoding returns each caption's probability beside it.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel,
                          PreTrainedTokenizerFast)

from dynrefer import storage
from dynrefer.config import LanguageConfig

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed word list: the built-in default, which needs no download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS.values(), ",", "|", *words]:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def load_lm(cfg: LanguageConfig, storage_options: storage.StorageOptions | None = None
            ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The LM and its tokenizer: from ``cfg.path`` (safetensors only), or randomly initialised from ``cfg.arch``."""
    from transformers import AutoTokenizer

    if cfg.path:
        local = storage.local_copy(cfg.path, storage_options)
        config = AutoConfig.from_pretrained(local)
        if cfg.dense_act_fn:
            config.dense_act_fn = cfg.dense_act_fn  # LAVIS loads Flan-T5 with "gelu" in place of its "gelu_new"
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        return cls.from_pretrained(local, config=config, use_safetensors=True), AutoTokenizer.from_pretrained(local)
    if not cfg.arch:
        raise ValueError("language: give either 'path' (a Hugging Face model directory) or 'arch'")
    words = cfg.vocabulary if cfg.vocabulary is not None else _builtin_vocabulary()
    tokenizer = word_tokenizer(words)
    arch = dict(cfg.arch)
    model_type = arch.pop("model_type")
    arch.setdefault("vocab_size", len(tokenizer))
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    config = AutoConfig.for_model(model_type, **ids, **arch)
    if config.is_encoder_decoder:
        config.decoder_start_token_id = tokenizer.pad_token_id
        model = AutoModelForSeq2SeqLM.from_config(config)
        model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def _builtin_vocabulary() -> list[str]:
    from dynrefer import synth

    return synth.vocabulary()


_CAPTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def normalize_caption(caption: str, max_words: int = 50) -> str:
    """A caption as LAVIS's caption processor gives it to the model: lowercased, ``.!"()*#:;~`` replaced by
    spaces, runs of spaces collapsed, at most ``max_words`` words."""
    words = _CAPTION_PUNCTUATION.sub(" ", caption.lower()).split()
    return " ".join(words[:max_words])


def control_text(words: Sequence[str]) -> str:
    """The control string: ``",".join(words) + "|"``."""
    return ",".join(words) + "|"


def training_control_words(tags: Sequence[str], phrases: Sequence[str], drop_all: float, drop_each: float,
                           rng: random.Random) -> list[str]:
    """The official training-time control words: the set of a region's tags and caption phrases, none at all with
    probability ``drop_all``, else each kept with probability ``1 - drop_each``, the kept ones shuffled."""
    words = list(dict.fromkeys([*tags, *phrases]))
    if rng.random() < drop_all:
        return []
    kept = [w for w in words if rng.random() >= drop_each]
    rng.shuffle(kept)
    return kept


class LanguageHead(nn.Module):
    def __init__(self, cfg: LanguageConfig, region_dim: int, storage_options: storage.StorageOptions | None = None):
        super().__init__()
        self.cfg = cfg
        self.lm, self.tokenizer = load_lm(cfg, storage_options)
        dim = self.lm.get_input_embeddings().embedding_dim
        self.proj = nn.Linear(region_dim, dim)
        self.control = nn.Parameter(torch.zeros(dim))
        self.is_encoder_decoder = bool(self.lm.config.is_encoder_decoder)
        if cfg.freeze:
            self.lm.requires_grad_(False)
            self.lm.eval()

    def train(self, mode: bool = True) -> "LanguageHead":
        super().train(mode)
        if self.cfg.freeze:
            self.lm.eval()
        return self

    def control_words(self, tags: list[list[str]], captions: list[str]) -> list[list[str]]:
        """Training-time control words per region (:func:`training_control_words`), from its tags and the noun and
        adjective phrases of its caption."""
        from dynrefer.tags import parse_phrases

        c = self.cfg
        return [training_control_words(t, parse_phrases(cap), c.drop_all_tags, c.drop_each_tag, random)
                for t, cap in zip(tags, captions)]

    def _ids(self, texts: Sequence[str], eos: bool) -> list[list[int]]:
        """Token ids of each text, ended by EOS when asked, at most ``max_text_len`` ids in all (EOS kept)."""
        limit = self.cfg.max_text_len - int(eos)
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]
        return [x + [self.tokenizer.eos_token_id] if eos else x for x in ids]

    def _controls(self, words: list[list[str]]) -> list[list[int]]:
        if not self.cfg.control_words:
            return [[] for _ in words]
        return self._ids([control_text(w) for w in words], eos=self.is_encoder_decoder)

    def _embed(self, ids: list[int], control: bool) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.control.device))
        return emb + self.control if control else emb  # (L, D)

    def _pad(self, seqs: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack (L_i, D) sequences into (B, L, D) with an attention mask, padding with the pad embedding."""
        length = max(s.shape[0] for s in seqs)
        pad = self._embed([self.tokenizer.pad_token_id], control=False)
        out, mask = [], torch.zeros(len(seqs), length, dtype=torch.long, device=pad.device)
        for i, s in enumerate(seqs):
            fill = pad.expand(length - s.shape[0], -1)
            out.append(torch.cat([fill, s]) if left else torch.cat([s, fill]))
            if left:
                mask[i, length - s.shape[0]:] = 1
            else:
                mask[i, : s.shape[0]] = 1
        return torch.stack(out), mask

    def loss(self, regions: torch.Tensor, tags: list[list[str]], captions: list[str]) -> torch.Tensor:
        """regions: (B, Q, H); captioning cross-entropy given the prefix and control words."""
        prefix = self.proj(regions)  # (B, Q, D)
        controls = self._controls(tags)
        targets = self._ids(captions, eos=True)
        if self.is_encoder_decoder:
            inputs, mask = self._pad([torch.cat([p, self._embed(c, True)]) for p, c in zip(prefix, controls)], False)
            labels = torch.full((len(targets), max(map(len, targets))), -100, device=prefix.device)
            for i, y in enumerate(targets):
                labels[i, : len(y)] = torch.tensor(y, device=prefix.device)
            return self.lm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        seqs = [torch.cat([p, self._embed(c, True), self._embed(y, False)]) for p, c, y in zip(prefix, controls, targets)]
        inputs, mask = self._pad(seqs, left=False)
        labels = torch.full(mask.shape, -100, device=prefix.device)
        for i, (c, y) in enumerate(zip(controls, targets)):
            start = prefix.shape[1] + len(c)
            labels[i, start - 1: start - 1 + len(y)] = torch.tensor(y, device=prefix.device)
        logits = self.lm(inputs_embeds=inputs, attention_mask=mask).logits  # (B, L, V)
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(self, regions: torch.Tensor, words: list[list[str]]) -> tuple[list[str], list[float]]:
        """Captions for (B, Q, H) region queries with the official decoding settings, and each caption's
        probability ``exp(sequences_scores)`` (the beam's summed log-probability with ``length_penalty`` 0)."""
        sequences, log_probs = self.generate_ids(regions, words)
        captions = [s.strip() for s in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        return captions, log_probs.float().exp().tolist()

    @torch.no_grad()
    def generate_ids(self, regions: torch.Tensor, words: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The generated token ids (B, T) and each sequence's log-probability (B,)."""
        c = self.cfg
        prefix = self.proj(regions)
        seqs = [torch.cat([p, self._embed(ids, True)]) for p, ids in zip(prefix, self._controls(words))]
        inputs, mask = self._pad(seqs, left=not self.is_encoder_decoder)
        out = self.lm.generate(
            inputs_embeds=inputs, attention_mask=mask, num_beams=c.num_beams, max_new_tokens=c.max_new_tokens,
            min_length=c.min_length, length_penalty=c.length_penalty, repetition_penalty=c.repetition_penalty,
            do_sample=False, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            output_scores=True, return_dict_in_generate=True,
        )
        if c.num_beams > 1:
            log_probs = out.sequences_scores  # (B,)
        else:
            steps = self.lm.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # (B, T)
            log_probs = steps.masked_fill(~torch.isfinite(steps), 0.0).sum(-1)
        return out.sequences, log_probs
