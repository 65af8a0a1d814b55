import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("EVOMERGE_COMPILE", "off")  # compiled kernels are tested on their own (test_fused), once
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # bounded memory on many-core machines too

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def make_llama_family(
    root: Path, n_sources: int = 3, seed: int = 0, scale: float = 0.02, layers: int = 2
) -> tuple[Path, list[Path]]:
    """A tiny random Llama base and `n_sources` fine-tunes (base + small noise), as HF directories."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 +-=?")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    dirs = []
    for i in range(n_sources):
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        ft = LlamaForCausalLM(cfg)
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        d = root / f"ft{i}"
        ft.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    return base_dir, dirs


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return make_llama_family(root)


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory):
    """The reduced zoo build (tiny model, few steps) — what CI can afford."""
    from evomerge.zoo.build import SMALL, build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "zoo", SMALL)
