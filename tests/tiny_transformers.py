"""Tiny attention models built here from random init (nothing is downloaded), shared by the
transformer tests. Each builder returns (model, example_input); dropout is 0 so that train and
eval forwards are deterministic."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def vit():
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=16,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=10,
    )
    # torchvision starts the head at zero (every output 0): give it random weights.
    nn.init.normal_(model.heads.head.weight, std=0.2, generator=torch.Generator().manual_seed(2))
    return model, torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def swin():
    """Swin-T's block structure (patch 4, shifted windows in alternate blocks, patch merging,
    V1 attention) at small width, depth and window, on a 32x32 input (two stages: 8x8
    patches in 2x2 windows of 4x4 shifted by 2, then 4x4 patches)."""
    import torchvision

    model = torchvision.models.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=10,
    )
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def swin_v2():
    """The V2 blocks (cosine attention, log-spaced continuous position bias, no key bias)."""
    import torchvision
    from torchvision.models import swin_transformer as tvs

    model = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        stochastic_depth_prob=0.0, num_classes=10, block=tvs.SwinTransformerBlockV2,
        downsample_layer=tvs.PatchMergingV2,
    )  # fmt: skip
    with torch.no_grad():  # a nonzero key bias, which the V2 forward must ignore
        for m in model.modules():
            if isinstance(m, tvs.ShiftedWindowAttentionV2):
                m.qkv.bias.normal_(generator=torch.Generator().manual_seed(4))
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (batch_first, even heads: the fused fast path applies in eval mode
    without grad) over a linear token embedding, with a padding mask."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x, padding_mask):
        h = self.encoder(self.embed(x), src_key_padding_mask=padding_mask)
        # Mean over real tokens only: the fused path returns zeros at padded positions, the
        # unfused one does not.
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def encoder():
    x = torch.randn(4, 5, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, -1] = True
    return EncoderClassifier(), (x, mask)


def _tokens(vocab, shape=(2, 6)):
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(shape[1]).expand(shape),
    }


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config), _tokens(64)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config), _tokens(64)


class CustomAttention(nn.Module):
    """A user's own attention block: separate q/k/v projections called as modules."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = F.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, n, d))


class CustomModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.attn = CustomAttention()
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.norm(h + self.attn(h)).mean(1))


def custom():
    return CustomModel(), torch.randn(4, 5, 4, generator=torch.Generator().manual_seed(1))


BUILDERS = {
    "vit": vit,
    "swin": swin,
    "encoder": encoder,
    "gpt2": gpt2,
    "llama": llama,
    "custom": custom,
}


def logits(out):
    """The tensor a model returns (transformers' outputs carry it as .logits)."""
    return out.logits if hasattr(out, "logits") else out
