"""eval.py and what it stands on: the test-time corruptions, cluttered MNIST and its digit boxes, and the analyses of a
trained run, reproducible from its committed weights alone."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, one_line_error, run_forked, run_train_fast, synthetic_images, train_env
from data import (CORRUPTIONS, DATASETS, box_patches, cluttered_mnist, corrupt, load_dataset, noise_draws,
                  patch_mask)
from eval import QUANT_BITS, evaluate, fake_quantize, lambda_stats, model_config, quantized_accuracy
from model import ViT, ViTConfig, flops_per_image, lambda_init_fn


def grey_test_set(n=200, shape=(3, 32, 32), seed=0):
    """Images with mid-range pixels (no clipping at small noise) and labels of 10 classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(60, 200, (n, *shape), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_corruptions_are_fixed_per_image_whatever_the_batches():
    x, y = grey_test_set()
    draws, again = noise_draws(y, (3, 32, 32), 4), noise_draws(y, (3, 32, 32), 4)
    assert all(torch.equal(draws[k], again[k]) for k in draws)
    for kind, severities in CORRUPTIONS.items():
        whole = corrupt(x, torch.arange(200), kind, severities[-1], draws, 4, 'cifar10')
        halves = torch.cat([corrupt(x, torch.arange(0, 70), kind, severities[-1], draws, 4, 'cifar10'),
                            corrupt(x, torch.arange(70, 200), kind, severities[-1], draws, 4, 'cifar10')])
        assert torch.equal(whole, halves), kind
        assert whole.min() >= 0 and whole.max() <= 1 and not torch.equal(whole, x.float() / 255), kind


@pytest.mark.parametrize('share', CORRUPTIONS['occlusion'])
def test_occlusion_and_distractors_hit_their_share_of_patches(share):
    x, y = grey_test_set()
    draws = noise_draws(y, (3, 32, 32), 4)
    clean = x.float() / 255
    idx = torch.arange(200)
    patches = lambda images: images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(200, 64, -1)
    occluded = patches(corrupt(x, idx, 'occlusion', share, draws, 4, 'cifar10'))
    mean = torch.tensor(DATASETS['cifar10']['mean']).repeat_interleave(16)
    blank = (occluded == mean).all(dim=2)
    assert (blank.sum(1) == round(share * 64)).all()  # grey images never equal the mean colour by chance
    replaced = patches(corrupt(x, idx, 'distractors', share, draws, 4, 'cifar10'))
    changed = (replaced != patches(clean)).any(dim=2)
    assert torch.equal(changed, blank)  # the same patches, and each one comes from its source image
    source = draws['source']
    assert torch.equal(replaced[changed], patches(clean)[source[changed], changed.nonzero()[:, 1]])
    assert not (y[source] == y[:, None]).any()  # from images of other classes only
    if share > 0.1:  # the shares nest: the 10% are among the 25% and the 50%
        assert (patch_mask(draws['rank'], 0.1, 4, 32) <= patch_mask(draws['rank'], share, 4, 32)).all()


def test_gaussian_blur_and_contrast_have_their_strength():
    x, y = grey_test_set()
    draws = noise_draws(y, (3, 32, 32), 4)
    clean, idx = x.float() / 255, torch.arange(200)
    for sigma in CORRUPTIONS['gaussian'][:2]:  # no clipping yet at 0.05 and 0.1 on pixels in [0.23, 0.78]
        added = corrupt(x, idx, 'gaussian', sigma, draws, 4, 'cifar10') - clean
        assert added.std().item() == pytest.approx(sigma, rel=0.01)
    for factor in CORRUPTIONS['contrast']:
        out = corrupt(x, idx, 'contrast', factor, draws, 4, 'cifar10')
        assert torch.allclose(out.std(dim=(1, 2, 3)), factor * clean.std(dim=(1, 2, 3)), rtol=1e-4)
        assert torch.allclose(out.mean(dim=(1, 2, 3)), clean.mean(dim=(1, 2, 3)), atol=1e-5)
    spreads = [corrupt(x, idx, 'blur', s, draws, 4, 'cifar10').std().item() for s in CORRUPTIONS['blur']]
    assert clean.std().item() > spreads[0] > spreads[1] > spreads[2]  # blurrier, flatter
    # a blurred constant image stays constant (the taps sum to one, the padding reflects)
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    assert torch.allclose(corrupt(flat, torch.arange(1), 'blur', 1.5, draws, 4, 'cifar10'), flat.float() / 255)


def test_cluttered_mnist_places_each_digit_in_its_box():
    digits = torch.zeros(300, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 6:22, 9:17] = 255  # every digit's ink: rows 6-21, columns 9-16
    canvases, boxes = cluttered_mnist(digits, 0)
    again, boxes_again = cluttered_mnist(digits, 0)
    assert torch.equal(canvases, again) and torch.equal(boxes, boxes_again)
    assert not torch.equal(boxes, cluttered_mnist(digits, 1)[1])  # the test file's canvases are others
    assert canvases.shape == (300, 1, 40, 40) and canvases.dtype == torch.uint8
    assert ((boxes[:, 2] - boxes[:, 0]) == 16).all() and ((boxes[:, 3] - boxes[:, 1]) == 8).all()
    assert (boxes[:, :2] >= 6).all() and (boxes[:, 0] <= 18).all() and (boxes[:, 3] <= 40).all()
    for canvas, (top, left, bottom, right) in zip(canvases[:, 0], boxes.tolist()):
        assert (canvas[top:bottom, left:right] == 255).all()  # the digit is where its box says
        outside = canvas.clone()
        outside[top:bottom, left:right] = 0
        assert outside.any()  # and there is clutter beside it


def test_box_patches_are_the_patches_whose_centre_is_inside():
    boxes = torch.tensor([[0, 0, 8, 8], [4, 8, 6, 40], [0, 0, 40, 40]])
    mask = box_patches(boxes, 40, 4).view(3, 10, 10)
    assert mask[0].sum() == 4 and mask[0, :2, :2].all()
    assert mask[1].sum() == 8 and mask[1, 1, 2:].all()  # rows 4-5 hold the centre (5.5) of patch row 1
    assert mask[2].all()


@pytest.mark.parametrize('name,size', [('mnist_cluttered', 40), ('mnist_cluttered56', 56), ('mnist_cluttered80', 80)])
def test_cluttered_dataset_loads_with_boxes(data_dir, name, size):
    splits = load_dataset(name, data_dir)
    for split in ('train', 'val', 'test'):
        x, y = splits[split]
        assert x.shape[1:] == (1, size, size) and len(splits['boxes'][split]) == len(x) == len(y)
        assert (splits['boxes'][split][:, 2:] <= size).all()
    mnist = load_dataset('mnist', data_dir)
    assert torch.equal(splits['test'][1], mnist['test'][1]) and torch.equal(splits['val'][1], mnist['val'][1])


def test_a_larger_canvas_keeps_the_clutter_per_area():
    """56 x 56 with 8-16 fragments and 80 x 80 with 16-32 against 40 x 40 with 4-8: about as much clutter ink per
    pixel (196 and 400 patches against 100)."""
    digits = torch.zeros(2000, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 4:24, 4:24] = 255  # fragments come from the centre: all ink
    clutter = []  # the share of the pixels outside the digit's box that fragments cover
    for canvas, fragments in ((40, (4, 8)), (56, (8, 16)), (80, (16, 32))):
        x, boxes = cluttered_mnist(digits, 0, canvas=canvas, fragments=fragments)
        outside = torch.ones_like(x[:, 0], dtype=torch.bool)
        for mask, (top, left, bottom, right) in zip(outside, boxes.tolist()):
            mask[top:bottom, left:right] = False
        clutter.append((x[:, 0] == 255)[outside].float().mean().item())
    assert clutter[1] == pytest.approx(clutter[0], rel=0.15)  # 0.18 and 0.21: the 40 canvas loses more to overlaps
    assert clutter[2] == pytest.approx(clutter[1], rel=0.05)  # 0.21


@pytest.fixture(scope='module')
def trained(small_data_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp('eval_run')
    run_train_fast('config/mnist_diff.py', f'--data_dir={small_data_dir}', f'--out_dir={out_dir}', '--epochs=1',
                   '--analyses=all', *TINY)
    return out_dir


def read(folder):
    with open(folder / 'metrics.json') as f:
        return json.load(f)


def test_eval_reproduces_a_run_from_its_weights_alone(small_data_dir, trained, tmp_path):
    """The committed form of a run, model.pt and metrics.json: eval.py gives its test result again, exactly, and the
    same noise analyses on every run of it."""
    for name in ('model.pt', 'metrics.json'):
        shutil.copy(trained / name, tmp_path / name)
    trained_metrics = read(trained)
    assert set(trained_metrics['noise']['accuracy']) == set(DATASETS['mnist']['corruptions'])
    run_forked('eval.py', tmp_path, f'--data_dir={small_data_dir}')
    first = read(tmp_path)
    assert first['test'] == trained_metrics['test'] and first['attn_focus'] == trained_metrics['attn_focus']
    assert first['outliers'] == trained_metrics['outliers'] and first['noise'] == trained_metrics['noise']
    noise = first['noise']
    assert noise['clean'] == first['test']['acc']
    assert {k: list(v) for k, v in noise['accuracy'].items()} == {
        k: [str(s) for s in CORRUPTIONS[k]] for k in DATASETS['mnist']['corruptions']}
    cells = [a for by_severity in noise['accuracy'].values() for a in by_severity.values()]
    assert noise['mean'] == pytest.approx(np.mean(cells)) and all(0 <= a <= 1 for a in cells)
    assert np.load(tmp_path / 'attention.npz')['cls_attn'].shape == (1, 16, 1, 49)
    assert len(first['lambda']['layers']) == 1 and 0 <= first['attn_focus_pos'] <= 1
    assert all(len(h['lambda']) == 1 for h in first['history'])  # train.py records λ every epoch
    assert first['history'][-1]['lambda'] == first['lambda']['layers']
    assert {k: list(v) for k, v in first['quant'].items()} == {k: [str(b) for b in QUANT_BITS]
                                                               for k in ('logits', 'residual')}
    assert first['flops_per_image'] == trained_metrics['flops_per_image'] == flops_per_image(
        model_config(first['config']))  # train.py records it too
    run_forked('eval.py', tmp_path, f'--data_dir={small_data_dir}', '--only=noise')
    assert read(tmp_path) == first


def test_eval_refuses_bad_weights_and_folders(small_data_dir, trained, tmp_path):
    shutil.copy(trained / 'metrics.json', tmp_path / 'metrics.json')
    proc = run_forked('eval.py', tmp_path, f'--data_dir={small_data_dir}', check=False)
    one_line_error(proc, 'has no model.pt or ckpt.pt')
    (tmp_path / 'model.pt').write_bytes((trained / 'model.pt').read_bytes()[:5000])
    one_line_error(run_forked('eval.py', tmp_path, check=False), 'cannot load', 'corrupt')
    weights = torch.load(trained / 'model.pt', weights_only=True)
    weights['head.weight'] = torch.zeros(3, 3)
    torch.save(weights, tmp_path / 'model.pt')
    one_line_error(run_forked('eval.py', tmp_path, check=False), 'does not fit the model of', 'head.weight')
    one_line_error(run_forked('eval.py', tmp_path, '--only=noise,speed', check=False), 'unknown analysis speed')
    one_line_error(run_forked('eval.py', tmp_path / 'nowhere', check=False), 'is not a folder')
    metrics = read(tmp_path)
    assert metrics == read(trained)  # nothing written by a refused command


def test_eval_leaves_an_unfinished_run_to_go_on(small_data_dir, tmp_path):
    run_train_fast('config/mnist_vit.py', f'--data_dir={small_data_dir}', f'--out_dir={tmp_path}', '--epochs=1', *TINY)
    metrics = read(tmp_path)
    metrics['test'], metrics['config']['epochs'] = None, 2
    (tmp_path / 'metrics.json').write_text(json.dumps(metrics))
    (tmp_path / 'model.pt').unlink()
    proc = run_forked('eval.py', tmp_path, f'--data_dir={small_data_dir}', '--only=test')
    assert 'has not finished' in proc.stdout and 'test loss' in proc.stdout
    assert read(tmp_path) == metrics


def test_fake_quantize_maps_a_known_tensor_to_its_levels():
    """3 bits: 3 levels each side of zero, one absmax scale per image (dim 0) over all its other dims."""
    x = torch.tensor([[[0.9, -0.6], [0.26, 0.1]], [[2.0, 0.9], [-3.0, 0.4]]])
    s0, s1 = 0.9 / 3, 3.0 / 3
    expected = torch.tensor([[[3 * s0, -2 * s0], [1 * s0, 0.0]], [[2 * s1, 1 * s1], [-3 * s1, 0.0]]])
    assert torch.allclose(fake_quantize(x, 3), expected)
    assert fake_quantize(x, 8).unique().numel() <= 2 * 127 + 1
    assert torch.equal(fake_quantize(torch.zeros(2, 3), 4), torch.zeros(2, 3))  # no scale to divide by


@pytest.mark.parametrize('attention', ['classic', 'diff', 'diff2'])
def test_every_attention_applies_the_logit_quantizer_to_all_its_maps_at_once(attention):
    torch.manual_seed(0)
    model = ViT(ViTConfig(attention=attention, n_head=2, n_layer=2)).eval()
    x = torch.randn(4, 1, 28, 28)
    seen = []

    def quantize(logits):
        seen.append(logits.shape)
        return fake_quantize(logits, 16)
    with torch.no_grad():
        clean = model(x)
        for block in model.blocks:
            block.attn.quantize_logits = quantize
        fine = model(x)
        for block in model.blocks:
            block.attn.quantize_logits = lambda logits: fake_quantize(logits, 2)
        coarse = model(x)
    maps = 2 if attention == 'classic' else 2 * (1 if attention == 'diff' else 2)  # every head, both maps of each
    assert seen == [(4, maps, 50, 50)] * 2
    assert torch.allclose(fine, clean, atol=1e-3) and not torch.allclose(coarse, clean, atol=1e-3)


def test_quantized_accuracy_at_16_bits_is_the_clean_accuracy(small_data_dir, trained):
    """On a trained model: 16 bits change no prediction, 2 bits do, in both settings; the hooks leave no trace."""
    model = ViT(model_config(read(trained)['config']))
    model.load_state_dict(torch.load(trained / 'model.pt', weights_only=True))
    x, y = load_dataset('mnist', small_data_dir)['test']
    args = ('mnist', torch.autocast('cpu', enabled=False), 0.1)
    clean = evaluate(model, x, y, *args)[1]
    quant = quantized_accuracy(model, x, y, *args, bits=(16, 2))
    assert quant['logits']['16'] == quant['residual']['16'] == clean
    assert quant['logits']['2'] != clean and quant['residual']['2'] != clean
    assert evaluate(model, x, y, *args)[1] == clean
    assert all(block.attn.quantize_logits is None and not block._forward_hooks for block in model.blocks)


def test_lambda_of_diff_is_read_from_its_vectors():
    """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, set by hand: e^(ln 2) − e^(ln 3) + λ_init, then λ_init alone."""
    model = ViT(ViTConfig(attention='diff', n_head=2, n_layer=3))
    with torch.no_grad():
        for block in model.blocks:
            for name, value in (('q1', 1.0), ('k1', np.log(2)), ('q2', 1.0), ('k2', np.log(3))):
                vector = getattr(block.attn, f'lambda_{name}')
                vector.zero_()
                vector[0] = value
    expected = [2 - 3 + lambda_init_fn(i) for i in range(3)]
    assert lambda_stats(model, None, 'mnist', torch.autocast('cpu', enabled=False))['layers'] == pytest.approx(expected)
    assert max(expected) < 0  # 2 − 3 + λ_init: every layer adds its two maps
    with torch.no_grad():
        model.blocks[1].attn.lambda_q1.zero_()
        model.blocks[1].attn.lambda_q2.zero_()
    layers = lambda_stats(model, None, 'mnist', torch.autocast('cpu', enabled=False))['layers']
    assert layers[1] == pytest.approx(lambda_init_fn(1)) and layers[0] == pytest.approx(expected[0])


def test_lambda_of_diff2_is_read_per_token_and_head():
    """λ_t = sigmoid(x_t Wλ): with ln_1 giving every token the same vector c (gain 0, bias c), Wλ set by hand makes head
    0's λ_t sigmoid(−5) and head 1's 0.5 on every token: mean 0.2534, 10th percentile 0.0067, 90th 0.5, half below
    0.1; classic attention has no λ."""
    model = ViT(ViTConfig(attention='diff2', n_head=2, n_layer=2, n_embd=32, mlp_dim=64))
    with torch.no_grad():
        for block in model.blocks:
            block.ln_1.weight.zero_()
            block.ln_1.bias.fill_(0.5)
            block.attn.lambda_proj.weight.copy_(torch.tensor([[-5.0], [0.0]]) / (32 * 0.5))
    x = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    stats = lambda_stats(model, x, 'mnist', torch.autocast('cpu', enabled=False))
    low = 1 / (1 + np.exp(5))
    assert stats['layers'] == pytest.approx([(low + 0.5) / 2] * 2, abs=1e-6)
    assert stats['p10'] == pytest.approx([low] * 2, abs=1e-6) and stats['p90'] == pytest.approx([0.5] * 2, abs=1e-6)
    assert stats['below_0.1'] == [0.5, 0.5]
    assert lambda_stats(ViT(ViTConfig(attention='classic')), x, 'mnist', None) is None


def test_eval_with_a_closed_stdout_still_writes_its_results(small_data_dir, trained, tmp_path):
    """`python eval.py RUN | head -1`: the reader gone before eval.py prints; it analyses and writes all the same,
    and its lines go to stderr."""
    for name in ('model.pt', 'metrics.json'):
        shutil.copy(trained / name, tmp_path / name)
    metrics = read(trained)
    (tmp_path / 'metrics.json').write_text(json.dumps({k: v for k, v in metrics.items() if k != 'noise'}))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, 'eval.py', tmp_path, f'--data_dir={small_data_dir}', '--only=noise'],
                              cwd=ROOT, env=train_env(), stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    assert 'noise: mean accuracy' in proc.stderr and f"wrote {tmp_path / 'metrics.json'}" in proc.stderr
    assert read(tmp_path) == metrics
