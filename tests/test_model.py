import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, train_defaults
from configurator import configure
from eval import model_config
from model import ATTENTIONS, Attention, ViT, ViTConfig, attention_focus, flops_per_image, lambda_init_fn


def model_config_of(config_path):
    return model_config({**train_defaults(), **configure(train_defaults(), [config_path])})


CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))


def test_the_configs_are_every_dataset_and_variant():
    names = {os.path.basename(p) for p in CONFIGS}
    assert names == ({f'{d}_{v}.py' for d in ('mnist', 'fashionmnist', 'cifar10', 'cifar10_small')
                      for v in ('vit', 'balanced', 'diff', 'diff2')}
                     | {'cifar10_small_diffqk.py', 'cifar10_small_vitqk.py', 'cifar10_small_vit351k.py'}
                     | {f'mnist_cluttered_{v}.py' for v in ('vit', 'diff', 'diff2')})


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_output_shapes_for_every_config(path):
    config = model_config_of(path)
    model = ViT(config).eval()
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    logits, maps = model(x, return_attn=True)
    assert logits.shape == (2, config.num_classes)
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    heads = config.n_head // 2 if config.attention == 'diff' else config.n_head
    assert len(maps) == config.n_layer
    assert all(m.shape == (2, heads, tokens, tokens) for m in maps)


def small(attention, **kwargs):
    torch.manual_seed(0)
    args = dict(image_size=16, in_channels=3, num_classes=5, patch_size=4, n_layer=3, n_head=4, n_embd=32,
                mlp_dim=64, dropout=0.0, attention=attention)
    return ViT(ViTConfig(**{**args, **kwargs}))


def randomise_lambdas(model):
    # at init λ is close to λ_init; push the λ vectors away so the tests see both softmax maps at work
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lambda' in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize('attention,qk_norm', [('classic', False), ('diff', False), ('diff2', False),
                                               ('classic', True), ('diff', True), ('diff2', True)])
def test_fused_path_equals_explicit_path(attention, qk_norm):
    model = small(attention, attn_impl='fused', qk_norm=qk_norm)
    randomise_lambdas(model)
    x = torch.randn(4, 3, 16, 16)
    fused = model(x)
    explicit, _ = model(x, return_attn=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
    grads = []
    for out in (fused, explicit):
        model.zero_grad()
        out.square().sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_attn_impl_picks_the_path(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *args: calls.append(1) or sdpa(*args))
    x = torch.randn(2, 3, 16, 16)
    for attention in ('classic', 'diff', 'diff2'):
        per_layer = 1 if attention == 'classic' else 2
        for impl, expected in (('fused', 3 * per_layer), ('explicit', 0), ('auto', 0)):  # 'auto' on the CPU: explicit
            calls.clear()
            small(attention, attn_impl=impl)(x)
            assert len(calls) == expected, (attention, impl)
        calls.clear()
        small(attention, attn_impl='fused')(x, return_attn=True)  # the maps always come from the explicit path
        assert not calls
    with pytest.raises(ValueError, match="attn_impl='flash'"):
        ViTConfig(attn_impl='flash')


def naive_attention(x, qkv, proj, n_head):
    """Textbook multi-head attention, one head at a time."""
    B, T, C = x.shape
    d = C // n_head
    q, k, v = qkv(x).split(C, dim=2)
    heads = []
    for h in range(n_head):
        s = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
        heads.append(weights @ v[..., s])
    return proj(torch.cat(heads, dim=2))


def test_classic_attention_equals_naive_reference():
    attn = small('classic').blocks[0].attn
    x = torch.randn(3, 17, 32)
    out, _ = attn(x)
    torch.testing.assert_close(out, naive_attention(x, attn.qkv, attn.proj, 4), atol=1e-5, rtol=1e-4)


def reference_diff_attention(x, attn):
    """Differential attention transcribed from the authors' code (microsoft/unilm, multihead_diffattn.py):
    2h query/key heads of width d, h value heads of width 2d, heads 2i and 2i+1 form differential head i."""
    B, T, C = x.shape
    h, d = attn.n_head, attn.head_dim
    q, k, v = attn.qkv(x).split(C, dim=2)
    q = q.view(B, T, 2 * h, d).transpose(1, 2) * d ** -0.5
    k = k.view(B, T, 2 * h, d).transpose(1, 2)
    v = v.view(B, T, h, 2 * d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    lambda_1 = torch.exp(torch.sum(attn.lambda_q1 * attn.lambda_k1, dim=-1))
    lambda_2 = torch.exp(torch.sum(attn.lambda_q2 * attn.lambda_k2, dim=-1))
    lambda_full = lambda_1 - lambda_2 + attn.lambda_init
    weights = weights.view(B, h, 2, T, T)
    weights = weights[:, :, 0] - lambda_full * weights[:, :, 1]
    out = weights @ v
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.subln.weight
    out = out * (1 - attn.lambda_init)
    return attn.proj(out.transpose(1, 2).reshape(B, T, C)), weights


def test_diff_attention_equals_authors_reference():
    model = small('diff', attn_impl='fused')
    randomise_lambdas(model)
    with torch.no_grad():
        model.blocks[1].attn.subln.weight.uniform_(0.5, 1.5)
    attn = model.blocks[1].attn
    x = torch.randn(3, 17, 32)
    expected, expected_maps = reference_diff_attention(x, attn)
    for return_attn in (False, True):
        out, maps = attn(x, return_attn)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps, expected_maps, atol=1e-6, rtol=1e-5)


def test_diff_map_rows_sum_to_one_minus_lambda():
    model = small('diff').eval()
    randomise_lambdas(model)
    _, maps = model(torch.randn(2, 3, 16, 16), return_attn=True)
    for block, m in zip(model.blocks, maps):
        lam = block.attn.lambda_full().item()
        torch.testing.assert_close(m.sum(-1), torch.full_like(m.sum(-1), 1 - lam), atol=1e-5, rtol=1e-5)
    _, maps = small('classic').eval()(torch.randn(2, 3, 16, 16), return_attn=True)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 17))


@pytest.mark.parametrize('attention', ['classic', 'diff', 'diff2'])
def test_activations_are_the_logits_the_softmaxes_take_and_the_block_outputs(attention):
    """ViT.activations (the outlier measure) sees the same logits and residual stream as the forward pass."""
    model = small(attention).eval()
    randomise_lambdas(model)
    x = torch.randn(2, 3, 16, 16)
    _, maps = model(x, return_attn=True)
    hidden = model.embed(x)
    for block, m, (logits, out) in zip(model.blocks, maps, model.activations(x)):
        hidden_in = hidden
        hidden, _ = block(hidden)
        torch.testing.assert_close(out, hidden)
        p = torch.softmax(logits, dim=-1)
        if attention != 'classic':  # (B, 2h, T, T): every first softmax, then every second
            h = block.attn.n_head
            assert logits.shape == (2, 2 * h, 17, 17)
            lam = block.attn.lambda_full() if attention == 'diff' else block.attn.lambda_full(block.ln_1(hidden_in))
            p = p[:, :h] - lam * p[:, h:]
        torch.testing.assert_close(p, m, atol=1e-6, rtol=1e-5)


def test_lambda_init_per_layer():
    assert lambda_init_fn(0) == pytest.approx(0.2)
    model = small('diff', n_layer=4)
    for l, block in enumerate(model.blocks):
        assert block.attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * l))
    assert [round(b.attn.lambda_init, 4) for b in model.blocks] == [0.2, 0.3555, 0.4707, 0.5561]
    for block in model.blocks:  # λ starts near λ_init: exp(q·k) terms of N(0, 0.1) vectors nearly cancel
        assert abs(block.attn.lambda_full().item() - block.attn.lambda_init) < 0.2


@pytest.mark.parametrize('n_layer,n_head,n_embd', [(2, 2, 64), (3, 4, 32), (6, 8, 256)])
def test_parameter_parity_of_classic_and_diff(n_layer, n_head, n_embd):
    classic, diff = (small(a, n_layer=n_layer, n_head=n_head, n_embd=n_embd) for a in ('classic', 'diff'))
    d = n_embd // n_head
    # per layer: four λ vectors of width d and the head-wise RMSNorm gain of width 2d
    assert diff.num_params() - classic.num_params() == n_layer * (4 * d + 2 * d)
    shapes = lambda m: {n: p.shape for n, p in m.named_parameters() if 'lambda' not in n and 'subln' not in n}
    assert shapes(classic) == shapes(diff)


def test_lite_parameter_counts():
    # the old project's lite config, patch 4, embedding 64, MLP 128, 2 blocks; its code had 81.5K / 98.2K
    assert small('classic', image_size=28, in_channels=1, num_classes=10, n_layer=2, n_head=2, n_embd=64,
                 mlp_dim=128).num_params() == 72_074
    assert small('diff', image_size=28, in_channels=1, num_classes=10, n_layer=2, n_head=2, n_embd=64,
                 mlp_dim=128).num_params() == 72_458


@pytest.mark.parametrize('name,params', [('cifar10_small_vit', 311_338), ('cifar10_small_diff2', 351_658),
                                         ('cifar10_small_vit351k', 351_482), ('mnist_cluttered_vit', 75_338),
                                         ('mnist_cluttered_diff', 75_722), ('mnist_cluttered_diff2', 83_914)])
def test_config_parameter_counts(name, params):
    # the README's table; vit351k is the classic control with diff2's parameters (within 0.05%)
    assert ViT(model_config_of(os.path.join(ROOT, 'config', f'{name}.py'))).num_params() == params


@pytest.mark.parametrize('kwargs,message', [
    (dict(attention='diff', n_head=3, n_embd=33), 'odd'),
    (dict(n_embd=30), 'not divisible by n_head'),
    (dict(image_size=18), 'not divisible by patch_size'),
    (dict(attention='linear'), "attention='linear': must be one of classic, diff, diff2"),
    (dict(dropout=1.0), 'dropout'),
])
def test_bad_model_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(kwargs.pop('attention', 'classic'), **kwargs)


def test_one_table_names_the_attention_kinds(monkeypatch):
    """A kind added to model.ATTENTIONS alone is built by every block and accepted by ViTConfig, whose error lists it."""
    class Toy(Attention):
        pass
    monkeypatch.setitem(ATTENTIONS, 'toy', Toy)
    assert all(type(block.attn) is Toy for block in small('toy').blocks)
    with pytest.raises(ValueError, match="must be one of classic, diff, diff2, toy$"):
        small('linear')


def test_attention_focus_known_answer():
    # 2 images, 4 patches; image 0 puts all its mass on foreground, image 1 a quarter of its |mass|
    cls_attn = torch.tensor([[[0.5, 0.5, 0.0, 0.0]],
                             [[0.25, -0.25, 0.5, 0.0]]])
    foreground = torch.tensor([[True, True, False, False], [True, False, False, False]])
    torch.testing.assert_close(attention_focus(cls_attn, foreground), torch.tensor([1.0, 0.25]))
    # averaged over heads: head 0 all on background, head 1 all on foreground -> one half
    two_heads = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    torch.testing.assert_close(attention_focus(two_heads, torch.tensor([[True, False]])), torch.tensor([0.5]))


def reference_diff_v2_attention(x, attn):
    """Differential attention V2 transcribed from the authors' code (microsoft/unilm, Diff-Transformer-V2,
    multihead_flashdiffv2.py) without rotary embeddings, not causal, SDPA with grouped-query heads for flash_attn:
    2h query heads of width d on h key/value heads; query heads 2i and 2i+1 share key/value head i."""
    B, T, C = x.shape
    h, d = attn.n_head, attn.head_dim
    q = attn.q(x).view(B, T, 2 * h, d)
    k, v = attn.kv(x).split(C, dim=2)
    k, v = k.view(B, T, h, d), v.view(B, T, h, d)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, dim=1),
                                         v.transpose(1, 2).repeat_interleave(2, dim=1)).transpose(1, 2)
    lambda_val = attn.lambda_proj(x)
    attn1, attn2 = out[:, :, 0::2], out[:, :, 1::2]
    out = attn1 - torch.sigmoid(lambda_val).unsqueeze(-1) * attn2
    return attn.proj(out.reshape(B, T, h * d))


def test_diff_v2_attention_equals_authors_reference():
    attn = small('diff2', attn_impl='fused').blocks[1].attn
    with torch.no_grad():
        attn.lambda_proj.weight.normal_(0, 0.5)  # λ far from 0.5 and different for every token
    x = torch.randn(3, 17, 32)
    expected = reference_diff_v2_attention(x, attn)
    for return_attn in (False, True):
        out, _ = attn(x, return_attn)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_diff_v2_map_rows_sum_to_one_minus_a_lambda_per_token():
    model = small('diff2').eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.lambda_proj.weight.normal_(0, 0.5)
    x = torch.randn(2, 3, 16, 16)
    _, maps = model(x, return_attn=True)
    hidden = model.embed(x)
    for block, m in zip(model.blocks, maps):
        lam = block.attn.lambda_full(block.ln_1(hidden)).squeeze(-1)  # (B, h, T)
        assert m.shape == (2, 4, 17, 17) and lam.shape == (2, 4, 17)
        assert lam.std() > 0.05  # λ varies by token (and head)
        torch.testing.assert_close(m.sum(-1), 1 - lam, atol=1e-5, rtol=1e-5)
        hidden, _ = block(hidden)


def test_diff_v2_parameters_are_reported_not_hidden():
    classic, v2 = small('classic'), small('diff2')
    C, h, L = 32, 4, 3
    # per layer: the second queries (C x C and a bias of C) and the λ projection (C x h, no bias)
    assert v2.num_params() - classic.num_params() == L * (C * C + C + C * h)
    assert small('diff2', image_size=28, in_channels=1, num_classes=10, n_layer=2, n_head=2, n_embd=64,
                 mlp_dim=128).num_params() == 80_650


@pytest.mark.parametrize('attention', ['classic', 'diff', 'diff2'])
def test_qk_norm_normalises_every_query_and_key_head(attention):
    """With qk_norm every query and key head (diff: Q1, Q2, K1, K2) has RMS 1 times the learned gain before the dot
    product, so scaling the projection weights cannot grow the logits; without it they grow with the weights."""
    x = torch.randn(2, 17, 32)
    for qk_norm in (False, True):
        attn = small(attention, qk_norm=qk_norm).blocks[0].attn
        logits = attn.logits(x)
        with torch.no_grad():
            for name, p in attn.named_parameters():
                if name.split('.')[0] in ('qkv', 'q', 'kv'):
                    p.mul_(10)
        grown = attn.logits(x)
        if qk_norm:
            torch.testing.assert_close(grown, logits, atol=1e-4, rtol=1e-3)
            q = attn.split_heads(x)[0]
            torch.testing.assert_close(q.pow(2).mean(-1), torch.ones_like(q[..., 0]), atol=1e-3, rtol=1e-3)
            with torch.no_grad():
                attn.q_norm.weight.fill_(2.0)
            torch.testing.assert_close(attn.logits(x), 2 * grown, atol=1e-4, rtol=1e-3)  # the gain is learned
        else:
            torch.testing.assert_close(grown, 100 * logits, atol=1e-3, rtol=1e-3)
    assert sum(p.numel() for n, p in attn.named_parameters() if 'norm' in n and 'subln' not in n) == 2 * 8


@pytest.mark.parametrize('attention', ['classic', 'diff', 'diff2'])
def test_quantize_logits_acts_on_every_map_of_a_layer_before_the_softmax(attention):
    """eval.py's quantization hook: it receives a layer's logits as logits() gives them, all maps at once, and what it
    returns is what the softmax takes, on the fused setting too."""
    model = small(attention, attn_impl='fused').eval()
    randomise_lambdas(model)
    x = torch.randn(2, 3, 16, 16)
    seen = []
    for block in model.blocks:
        block.attn.quantize_logits = lambda logits: seen.append(logits) or logits
    plain, maps = model(x, return_attn=True)
    hidden = model.embed(x)
    for block, logits in zip(model.blocks, seen):
        torch.testing.assert_close(logits, block.attn.logits(block.ln_1(hidden)))
        hidden, _ = block(hidden)
    for block in model.blocks:  # every logit 0: every softmax map uniform over the 17 tokens
        block.attn.quantize_logits = torch.zeros_like
    _, maps = model(x, return_attn=True)
    for block, m in zip(model.blocks, maps):
        if attention == 'classic':
            torch.testing.assert_close(m, torch.full_like(m, 1 / 17))
        elif attention == 'diff':  # softmax1 − λ softmax2, both uniform
            torch.testing.assert_close(m, torch.full_like(m, (1 - block.attn.lambda_full().item()) / 17))
    assert not torch.allclose(model(x), plain)


@pytest.mark.parametrize('attention', ['classic', 'diff'])
def test_flops_per_image_counts_a_block_by_hand_and_keeps_the_random_state(attention):
    """A block of width d, MLP m and T tokens: forward T (8 d² + 4 d m) for the projections and the MLP, 4 T² d for QKᵀ
    and AV (diff's two half-width maps count as classic's one), the backward twice that. d 16, m 32, T 5: 66,240."""
    def config(n_layer):
        return ViTConfig(image_size=8, in_channels=1, num_classes=10, patch_size=4, n_layer=n_layer, n_head=2,
                         n_embd=16, mlp_dim=32, dropout=0.0, attention=attention)
    d, m, T = 16, 32, (8 // 4) ** 2 + 1
    torch.manual_seed(0)
    block = flops_per_image(config(2)) - flops_per_image(config(1))
    assert block == 3 * (T * (8 * d * d + 4 * d * m) + 4 * T * T * d) == 66_240
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # a training run's random stream does not move
