"""
Every analysis of a trained model, on any run folder: its final weights (model.pt, committed for the studies under
results/) or its checkpoint (ckpt.pt). Loads the run's settings from its metrics.json, recomputes, and writes the
results back into that metrics.json (and attention.npz), atomically. The same code ends every train.py run.
$ python eval.py results/mnist_noise/mnist_diff2/seed0
$ python eval.py out/mnist_diff/seed1 --only=noise
Analyses (--only=a,b; default all):
  test       loss and accuracy on the test set, and attention focus: the share of the CLS token's last-layer |attention|
             on the relevant patches (the ink of MNIST and FashionMNIST, the digit's box in mnist_cluttered)
  outliers   the DIFF paper's Table 5: the largest and median |value| of the attention logits and the residual stream
  attention  the CLS token's attention in every layer for the first 16 test images (attention.npz)
  noise      test accuracy under each corruption of data.CORRUPTIONS at each severity, the same for every run
  lambda     what λ learned: diff, λ of each layer; diff2, λ_t of every token and head of each layer over the test set
             (mean, 10th and 90th percentile, share below 0.1); and the positive-part attention focus (below)
  quant      the DIFF paper's quantization test (its Fig. 8): test accuracy with the attention logits, or the residual
             stream, fake-quantized at QUANT_BITS bits, no retraining (fake_quantize: the scheme)
  compute    the matmul FLOPs of one training image (model.flops_per_image), from which plot.py gives a run's training
             compute; every train.py run records it
"""

import json
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from configurator import ConfigError, configure
from data import (CORRUPTIONS, DATASETS, batches, box_patches, corrupt, foreground_patches, load_dataset, noise_draws,
                  normalize)
from machine import keep_freed_memory, resolve_auto
from model import ViT, ViTConfig, attention_focus, flops_per_image

ANALYSES = ('test', 'outliers', 'attention', 'noise', 'lambda', 'quant', 'compute')
QUANT_BITS = (8, 6, 4, 3)


def parse_analyses(text):
    """'all', or analyses separated by commas -> a tuple of names of ANALYSES; ValueError names an unknown one."""
    names = ANALYSES if text == 'all' else tuple(name for name in text.split(',') if name)
    unknown = [name for name in names if name not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {', '.join(unknown)}; known: {', '.join(ANALYSES)}, or all")
    return names


def model_config(config):
    """The ViTConfig of a run's settings (train.py's config globals, as metrics.json and ckpt.pt keep them)."""
    spec = DATASETS[config['dataset']]
    return ViTConfig(image_size=spec['shape'][1], in_channels=spec['shape'][0], num_classes=spec['num_classes'],
                     patch_size=config['patch_size'], n_layer=config['n_layer'], n_head=config['n_head'],
                     n_embd=config['n_embd'], mlp_dim=config['mlp_dim'], dropout=config['dropout'],
                     attention=config['attention'], qk_norm=config.get('qk_norm', False),
                     attn_impl=config.get('attn_impl', 'auto'))


def write_atomic(path, write):
    """Writes to a temporary file of this process and renames it, so a crash at any moment leaves the old file
    intact."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def eval_batches(model, x):
    """Index batches over images x for inference by model: 1000 images on a GPU; on a CPU as many as keep one layer's
    attention maps (n_head of T x T, float32) within 16 MiB of cache, a power of two: cifar10_small 64 (1.5-3x the
    speed of 1000), MNIST 512, cluttered MNIST 128 (results/NOTES.md, "Speed")."""
    if x.device.type != 'cpu':
        return batches(len(x), 1000, x.device)
    config = getattr(model, 'module', model).config  # through a DDP wrapper (a compiled model passes it on)
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    return batches(len(x), min(1000, 2 ** int(math.log2(max(1, 2 ** 24 // (config.n_head * tokens ** 2 * 4))))), x.device)


def say(*args):
    """print, best effort: a closed stdout (Ctrl-C ends the `| tee` of `python train.py ... | tee log` too) never
    stops a run before it saves. The line goes to stderr instead, or nowhere where that is closed too: stdout's
    descriptor is pointed there for good, as Python's docs advise, so that the flush at exit cannot fail either."""
    try:
        print(*args, flush=True)  # flushed: lines reach a pipe as they come, and a closed one fails here
    except OSError:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        try:
            print(*args, flush=True)
        except OSError:  # stderr is closed too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def relevant_patches(splits, split, dataset, patch_size):
    """(N, P) bool: the patches of each image of a split that attention focus counts as relevant, or None."""
    x = splits[split][0]
    if 'boxes' in splits:
        return box_patches(splits['boxes'][split], x.size(-1), patch_size)
    return foreground_patches(x, patch_size) if DATASETS[dataset]['foreground'] else None


@torch.inference_mode()
def evaluate(model, x, y, dataset, autocast, label_smoothing, relevant=None, corruption=None):
    """Loss (with the training label smoothing) and accuracy of model on uint8 images x; with relevant (N, P) also the
    mean attention focus of its last layer (model must then be the plain ViT, not a compiled or DDP wrapper); with
    corruption = (kind, severity, draws, patch_size) on the corrupted images. Returns (loss, accuracy, focus/None)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=x.device)
    for idx in eval_batches(model, x):
        images = corrupt(x, idx, *corruption, dataset) if corruption else x[idx]
        with autocast:
            if relevant is not None:
                logits, maps = model(normalize(images, dataset), return_attn=True)
                sums[2] += attention_focus(maps[-1][:, :, 0, 1:], relevant[idx]).sum()
            else:
                logits = model(normalize(images, dataset))
        sums[0] += F.cross_entropy(logits.float(), y[idx], label_smoothing=label_smoothing, reduction='sum')
        sums[1] += (logits.argmax(1) == y[idx]).sum()
    model.train(was_training)
    loss, correct, focus = sums.tolist()
    return loss / len(x), correct / len(x), focus / len(x) if relevant is not None else None


@torch.inference_mode()
def outlier_stats(model, x, dataset, autocast, bins=14_000):
    """The DIFF paper's outlier table (its Table 5) over the test set: the largest, the 10th largest and the median
    |value| of the attention logits before each softmax (QKᵀ/√d; both maps of a diff head) and of the residual stream
    (every block's output). The medians come from a histogram of log10|value| in bins of 0.001."""
    model.eval()
    top = {'attn_logits': torch.zeros(0), 'activations': torch.zeros(0)}
    histograms = {key: torch.zeros(bins, dtype=torch.float64) for key in top}
    for idx in eval_batches(model, x):
        with autocast:
            for layer in model.activations(normalize(x[idx], dataset)):
                for key, values in zip(top, layer):
                    rows = values.float().abs().flatten(0, -2)
                    # the 10 largest values lie in the 10 rows of the largest maxima: topk over those (10x faster)
                    candidates = rows[rows.amax(1).topk(min(10, len(rows))).indices].flatten()
                    top[key] = torch.cat([top[key], candidates.topk(10).values.cpu()]).topk(10).values
                    histograms[key] += torch.histc(rows.clamp_min(1e-8).log10(), bins, -8, 6).double().cpu()
    stats = {}
    for key, histogram in histograms.items():
        median_bin = torch.searchsorted(histogram.cumsum(0), histogram.sum() / 2).item()
        stats[key] = dict(top1=top[key][0].item(), top10=top[key][9].item(),
                          median=10 ** (-8 + 14 * (median_bin + 0.5) / bins))
    return stats


@torch.inference_mode()
def attention_sample(model, splits, dataset, patch_size, autocast):
    """The CLS row of every layer's attention for the first 16 test images, the same for every run of a dataset;
    with the digits' boxes where the dataset has them."""
    x, y = splits['test']
    model.eval()
    with autocast:
        _, maps = model(normalize(x[:16], dataset), return_attn=True)
    sample = dict(images=x[:16].cpu().numpy(), labels=y[:16].cpu().numpy(), patch_size=np.array(patch_size),
                  cls_attn=torch.stack([m[:, :, 0, 1:] for m in maps]).float().cpu().numpy())  # (L, 16, heads, P)
    if 'boxes' in splits:
        sample['boxes'] = splits['boxes']['test'][:16].cpu().numpy()
    return sample


def noise_accuracy(model, splits, dataset, patch_size, autocast, label_smoothing, clean_acc, log=say):
    """Test accuracy under each of the dataset's corruptions at each severity: {'clean', 'accuracy': {kind:
    {severity: acc}}, 'mean'}, mean over every (kind, severity)."""
    x, y = splits['test']
    draws = noise_draws(y, tuple(x.shape[1:]), patch_size)
    accuracy = {}
    for kind in DATASETS[dataset]['corruptions']:
        accuracy[kind] = {str(severity): evaluate(model, x, y, dataset, autocast, label_smoothing,
                                                  corruption=(kind, severity, draws, patch_size))[1]
                          for severity in CORRUPTIONS[kind]}
        log(f"noise {kind}: " + ', '.join(f"{s} {100 * a:.2f}%" for s, a in accuracy[kind].items()))
    cells = [a for by_severity in accuracy.values() for a in by_severity.values()]
    return dict(clean=clean_acc, accuracy=accuracy, mean=sum(cells) / len(cells))


@torch.inference_mode()
def lambda_stats(model, x, dataset, autocast):
    """What λ learned, per layer, or None for classic attention. diff: {'layers': λ of each layer}; λ ≤ 0 means the
    layer adds its two maps instead of subtracting them. diff2: λ_t of every token and head of images x, per layer:
    {'layers': mean, 'p10', 'p90': 10th and 90th percentile, 'below_0.1': share of λ_t < 0.1}."""
    kind = model.config.attention
    if kind == 'diff':
        return {'layers': [block.attn.lambda_full().item() for block in model.blocks]}
    if kind != 'diff2':
        return None
    was_training = model.training
    model.eval()
    values = [[] for _ in model.blocks]
    for idx in eval_batches(model, x):
        with autocast:
            h = model.embed(normalize(x[idx], dataset))
            for block, layer in zip(model.blocks, values):
                layer.append(block.attn.lambda_full(block.ln_1(h)).flatten().cpu())
                h, _ = block(h)
    model.train(was_training)
    values = [torch.cat(layer).numpy() for layer in values]
    return {'layers': [float(v.mean()) for v in values], 'p10': [float(np.percentile(v, 10)) for v in values],
            'p90': [float(np.percentile(v, 90)) for v in values],
            'below_0.1': [float((v < 0.1).mean()) for v in values]}


@torch.inference_mode()
def positive_focus(model, x, relevant, dataset, autocast):
    """Attention focus (model.attention_focus) of the positive part max(A, 0) of the last layer's CLS attention: a
    signed diff map's |A| also counts what the layer subtracts, and where λ < 0 it is att1 + |λ| att2, so only the
    positive part compares with a classic map (for which it is the focus itself)."""
    model.eval()
    total = 0.0
    for idx in eval_batches(model, x):
        with autocast:
            _, maps = model(normalize(x[idx], dataset), return_attn=True)
        total += attention_focus(maps[-1][:, :, 0, 1:].clamp_min(0), relevant[idx]).sum().item()
    return total / len(x)


def fake_quantize(x, bits):
    """Dynamic symmetric absmax quantization, as the DIFF paper's Fig. 8 applies it, rounded back to float32: one scale
    per image (dim 0) over all the rest, max |x| / (2^(bits-1) - 1), and every value rounded to the nearest of the
    2^(bits-1) - 1 levels each side of zero (or zero). For the attention logits the rest is every head and both maps
    of a diff head / both queries of a diff2 head of one layer; for the residual stream, one block's output."""
    x = x.float()
    levels = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-30) / levels
    return torch.round(x / scale) * scale


def quantized_accuracy(model, x, y, dataset, autocast, label_smoothing, bits=QUANT_BITS):
    """Test accuracy with the attention logits before every softmax ('logits') or every block's output on the residual
    stream ('residual') fake-quantized at each of bits: {'logits': {bits: acc}, 'residual': {bits: acc}}."""
    results = {'logits': {}, 'residual': {}}
    for where, by_bits in results.items():
        for b in bits:
            quantize = lambda t, b=b: fake_quantize(t, b)
            handles = []
            for block in model.blocks:
                if where == 'logits':
                    block.attn.quantize_logits = quantize  # the layer then takes its explicit path
                else:  # Block.forward returns (x, att): the output x quantized, what the next block reads
                    handles.append(block.register_forward_hook(
                        lambda module, args, out: (quantize(out[0]).type_as(out[0]), out[1])))
            try:
                by_bits[str(b)] = evaluate(model, x, y, dataset, autocast, label_smoothing)[1]
            finally:
                for block in model.blocks:
                    block.attn.quantize_logits = None
                for handle in handles:
                    handle.remove()
    return results


def analyse(model, splits, dataset, patch_size, autocast, label_smoothing, only=ANALYSES, log=say):
    """The analyses named in only, on the plain model: (what they add to metrics.json, the attention sample or None)."""
    results, sample = {}, None
    if 'test' in only or 'noise' in only:
        test_loss, test_acc, focus = evaluate(model, *splits['test'], dataset, autocast, label_smoothing,
                                              relevant_patches(splits, 'test', dataset, patch_size))
        log(f"test loss {test_loss:.4f} acc {test_acc:.4f}"
            + (f" | attention focus {focus:.4f}" if focus is not None else ""))
    if 'test' in only:
        results['test'] = dict(loss=test_loss, acc=test_acc)
        if focus is not None:
            results['attn_focus'] = focus
    if 'outliers' in only:
        results['outliers'] = outlier_stats(model, splits['test'][0], dataset, autocast)
        log("outliers (top-1 / top-10 / median of |x|): " + ', '.join(
            f"{key} {o['top1']:.1f} / {o['top10']:.1f} / {o['median']:.3f}" for key, o in results['outliers'].items()))
    if 'attention' in only:
        sample = attention_sample(model, splits, dataset, patch_size, autocast)
    if 'noise' in only:
        results['noise'] = noise_accuracy(model, splits, dataset, patch_size, autocast, label_smoothing, test_acc, log)
        log(f"noise: mean accuracy {100 * results['noise']['mean']:.2f}% over every corruption "
            f"(clean {100 * test_acc:.2f}%)")
    if 'lambda' in only and model.config.attention != 'classic':
        results['lambda'] = lambda_stats(model, splits['test'][0], dataset, autocast)
        log("lambda per layer: " + ', '.join(f"{v:.3f}" for v in results['lambda']['layers']))
        relevant = relevant_patches(splits, 'test', dataset, patch_size)
        if relevant is not None:
            results['attn_focus_pos'] = positive_focus(model, splits['test'][0], relevant, dataset, autocast)
            log(f"attention focus, positive part: {results['attn_focus_pos']:.4f}")
    if 'quant' in only:
        results['quant'] = quantized_accuracy(model, *splits['test'], dataset, autocast, label_smoothing)
        log("quantized test accuracy (bits: %): " + '; '.join(
            f"{where} " + ', '.join(f"{b} {100 * a:.2f}" for b, a in accs.items())
            for where, accs in results['quant'].items()))
    if 'compute' in only:
        results['flops_per_image'] = flops_per_image(model.config)
    return results, sample


def fail(message):
    sys.exit(f"error: {message}")


def load_weights(run_dir):
    """The run's final weights (model.pt), else the model in its checkpoint (ckpt.pt): (state_dict, path)."""
    for name in ('model.pt', 'ckpt.pt'):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            weights = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            fail(f"cannot load {path}: it is corrupt or not a model of this project "
                 f"({type(e).__name__}: {str(e).splitlines()[0]})")
        if name == 'ckpt.pt':
            weights = weights.get('model') if isinstance(weights, dict) else None
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            fail(f"{path} is not a model of this project (a state_dict of tensors)")
        return weights, path
    fail(f"{run_dir} has no model.pt or ckpt.pt: train the run first, or point at its folder")


def main(run_dir, only, data_dir, device):
    metrics_path = os.path.join(run_dir, 'metrics.json')
    try:
        with open(metrics_path) as f:
            metrics = json.load(f)
        config = metrics['config']
    except FileNotFoundError:
        fail(f"{metrics_path} not found: give a run folder (one that holds metrics.json and model.pt or ckpt.pt)")
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{metrics_path} is not a metrics.json of this project ({type(e).__name__}: {e})")
    weights, weights_path = load_weights(run_dir)
    try:
        model = ViT(model_config(config))
        model.load_state_dict(weights)
    except (ValueError, KeyError, RuntimeError) as e:
        fail(f"{weights_path} does not fit the model of {metrics_path}: {' '.join(str(e).split())[:400]}")
    # the run's own precision ('auto' as it resolved where the run trained), so that test accuracy reproduces
    precision = metrics.get('precision') or config.get('dtype', 'auto')
    device, device_type, precision, _ = resolve_auto(device, precision, False)
    if device_type == 'cuda' and not torch.cuda.is_available():
        fail(f"device={device!r} but CUDA is not available; use --device=cpu")
    autocast = nullcontext() if precision == 'float32' else torch.autocast(device_type, dtype=getattr(torch, precision))
    try:
        splits = load_dataset(config['dataset'], data_dir, device)
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    model.to(device)
    say(f"{run_dir}: {config['attention']} ViT, {model.num_params():,} parameters, {weights_path}, "
          f"{precision} on {device}")
    results, sample = analyse(model, splits, config['dataset'], config['patch_size'], autocast,
                              config['label_smoothing'], only)
    if metrics.get('test') is None and len(metrics.get('history', [])) < config['epochs']:
        say(f"{run_dir} has not finished ({len(metrics.get('history', []))} of {config['epochs']} epochs): "
              f"{metrics_path} is left as it is, so that the run can go on")
        return
    if sample is not None:
        write_atomic(os.path.join(run_dir, 'attention.npz'), lambda f: np.savez_compressed(f, **sample))
    metrics.update(results)
    write_atomic(metrics_path, lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    say(f"wrote {metrics_path}" + (f", {os.path.join(run_dir, 'attention.npz')}" if sample is not None else ""))


if __name__ == '__main__':
    usage = f"usage: python eval.py <run folder> [--only={','.join(ANALYSES)}] [--data_dir=data] [--device=auto]"
    args = sys.argv[1:]
    if '--help' in args or '-h' in args:
        print(__doc__.strip() + '\n\n' + usage)
        sys.exit(0)
    folders = [a for a in args if not a.startswith('--')]
    if len(folders) != 1 or not os.path.isdir(folders[0]):
        fail(f"{folders[0]} is not a folder; {usage}" if len(folders) == 1 else usage)
    defaults = dict(only='all', data_dir='data', device='auto')
    try:
        options = {**defaults, **configure(defaults, [a for a in args if a.startswith('--')])}
    except ConfigError as e:
        fail(e)
    try:
        only = parse_analyses(options['only'])
    except ValueError as e:
        fail(f"--only: {e}")
    keep_freed_memory()
    main(folders[0], only, options['data_dir'], options['device'])
