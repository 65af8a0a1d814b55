"""Tiny random models of the architectures people merge, built from transformers configs (nothing downloaded),
with what a test knows of each independently of evomerge: which tensor names belong to which role."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers as T

LAYERS = 3  # decoder / text / encoder depth; the second tower of a two-tower model has 2

# architecture → (config, class, expected roles: (regex over checkpoint names, role, part) tried in order)
_ATTN_MLP_NORM = [
    (r"norm|ln_\d|ln_f|layernorm|LayerNorm|layer_norm", "norm", None),
    (r"experts", "mlp", "experts"),
    (r"(block_sparse_moe|mlp)\.gate\.", "mlp", "router"),
    (r"attn|attention|Attention", "attn", None),
    (r"mlp|intermediate|\.output\.dense|DenseReluDense|fc1|fc2", "mlp", None),
    (r"lm_head|embed_out|classifier|score|cls\.|head\.", "head", None),
    (r"embed|wte|wpe|shared|cls_token|class_embedding|patch|position_embedding", "embed", None),
    (r"final_logits_bias", "other", None),  # a tensor of the whole model: where it acts, its tree does not say
]


def _text(**extra):
    return dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        **extra,
    )


def _vision(**extra):
    return {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, **extra}


def configs(vocab: int) -> dict[str, tuple[T.PretrainedConfig, str]]:
    ids = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama": (T.LlamaConfig(**_text(), **ids), "LlamaForCausalLM"),
        "qwen3": (T.Qwen3Config(**_text(), **ids), "Qwen3ForCausalLM"),
        "qwen3_moe": (
            T.Qwen3MoeConfig(**_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8), **ids),
            "Qwen3MoeForCausalLM",
        ),
        "mixtral": (T.MixtralConfig(**_text(num_local_experts=4, num_experts_per_tok=2), **ids), "MixtralForCausalLM"),
        "gemma3_text": (T.Gemma3TextConfig(**_text(), **ids), "Gemma3ForCausalLM"),
        "gemma3": (
            T.Gemma3Config(
                text_config=dict(_text(), **ids),
                vision_config=_vision(image_size=16, patch_size=8),
                mm_tokens_per_image=4,
                image_token_index=vocab - 1,
                boi_token_index=vocab - 2,
                eoi_token_index=vocab - 3,
                **ids,
            ),
            "Gemma3ForConditionalGeneration",
        ),
        "phi3": (T.Phi3Config(**_text(), **ids), "Phi3ForCausalLM"),
        "gpt2": (T.GPT2Config(n_embd=16, n_layer=LAYERS, n_head=2, n_positions=64, **ids), "GPT2LMHeadModel"),
        "gpt_neox": (
            T.GPTNeoXConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, **ids
            ),
            "GPTNeoXForCausalLM",
        ),
        "falcon": (
            T.FalconConfig(hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, **ids),
            "FalconForCausalLM",
        ),
        "t5": (
            T.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=LAYERS, num_decoder_layers=2, num_heads=2, **ids),
            "T5ForConditionalGeneration",
        ),
        "bart": (
            T.BartConfig(
                d_model=16,
                encoder_layers=LAYERS,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                max_position_embeddings=64,
                **ids,
            ),
            "BartForConditionalGeneration",
        ),
        "bert": (
            T.BertConfig(**_vision(num_hidden_layers=LAYERS), max_position_embeddings=64, **ids),
            "BertForMaskedLM",
        ),
        "roberta": (
            T.RobertaConfig(**_vision(num_hidden_layers=LAYERS), max_position_embeddings=64, num_labels=3, **ids),
            "RobertaForSequenceClassification",
        ),
        "vit": (T.ViTConfig(**_vision(image_size=16, patch_size=8), num_labels=3), "ViTForImageClassification"),
        "clip_vision": (T.CLIPVisionConfig(**_vision(image_size=16, patch_size=8)), "CLIPVisionModel"),
    }


CAUSAL = ("llama", "qwen3", "qwen3_moe", "mixtral", "gemma3_text", "gemma3", "phi3", "gpt2", "gpt_neox", "falcon")
ARCHS = (*CAUSAL, "t5", "bart", "bert", "roberta", "vit", "clip_vision")
# the towers each model has (None: one) and their depths
TOWERS = {
    "gemma3": {"text": LAYERS, "vision": 2},
    "t5": {"encoder": LAYERS, "decoder": 2},
    "bart": {"encoder": LAYERS, "decoder": 2},
    "vit": {None: 2},
    "clip_vision": {None: 2},
}
_TOWER_OF = [
    (r"vision", "vision"),
    (r"language_model", "text"),
    (r"(^|\.)encoder\.", "encoder"),
    (r"(^|\.)decoder\.", "decoder"),
]


def expected(arch: str, name: str) -> tuple[str | None, int | None, str, str | None]:
    """(tower, layer, role, part) of a checkpoint tensor, as a reader of the model's code would place it."""
    towers = TOWERS.get(arch, {None: LAYERS})
    tower = None
    if len(towers) > 1:
        tower = next((t for pattern, t in _TOWER_OF if re.search(pattern, name) and t in towers), None)
    m = re.search(r"\.(?:layers|h|block|layer)\.(\d+)\.", name)
    layer = int(m.group(1)) if m else None
    if arch == "gemma3" and "multi_modal_projector" in name:  # between the towers: neither embed nor head
        return None, None, "norm" if "norm" in name else "other", None
    for pattern, role, part in _ATTN_MLP_NORM:
        if re.search(pattern, name):
            if layer is None and role in ("attn", "mlp"):  # a pooling head's attention and MLP are the head
                role = "head"
            if layer is not None and role == "embed":  # T5's relative position bias sits in the attention
                role = "attn"
            return tower, layer, role, part
    raise AssertionError(f"{arch}: the test does not know where {name} belongs")


def make_family(root: Path, arch: str, tokenizer, n_sources: int = 2, scale: float = 0.05) -> tuple[Path, list[Path]]:
    """A base and `n_sources` fine-tunes (base + noise) of `arch`, saved with `tokenizer`."""
    cfg, cls_name = configs(len(tokenizer))[arch]
    cfg.architectures = [cls_name]
    cls = getattr(T, cls_name)
    torch.manual_seed(0)
    base = cls(cfg).eval()
    dirs = []
    for i in range(n_sources + 1):
        d = root / ("base" if i == 0 else f"ft{i}")
        model = base
        if i:
            model = cls(cfg).eval()
            model.load_state_dict(base.state_dict())
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * scale)
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
    return dirs[0], dirs[1:]
