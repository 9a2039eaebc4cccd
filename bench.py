"""
Training-step throughput of the real model and optimizer, for a config given as to train.py:
$ python bench.py config/cifar10_diff.py --batch_size=256
Times forward + backward + AdamW step after warm-up for each setting: every attention kind, impl fused
(scaled_dot_product_attention) / explicit (the model's matmul-softmax path, same weights), compile off / on.
Prints a table and one JSON line per setting. On a CPU every setting is timed with one thread count, the cores that
other processes leave free when it starts (its header and JSON lines say which; OMP_NUM_THREADS fixes the count). With --pipeline=True it
also times whole epochs of the resident data pipeline (data.py) against a torchvision Dataset + DataLoader with
per-sample transforms, both feeding the same model.
"""

import json
import os
import sys
import time
from contextlib import nullcontext

# as in train.py: idle OpenMP threads spin 3,000,000 times before they sleep (set before torch loads OpenMP)
if 'OMP_WAIT_POLICY' not in os.environ:  # a policy the user set wins
    os.environ.setdefault('GOMP_SPINCOUNT', '3000000')
import torch
import torch.nn.functional as F

from configurator import apply_config, read_defaults
from data import DATASETS, augment_batch, batches, import_torchvision, load_dataset, normalize
from eval import model_config as run_model_config
from machine import cpu_name, cpu_reading, free_cores, keep_freed_memory, peak_memory_mb, resolve_auto
from model import ATTENTIONS, ViT, flops_per_image

keep_freed_memory()

# every train.py global (so its config files work here), then the benchmark's own
_train_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
globals().update(read_defaults(_train_script))
# -----------------------------------------------------------------------------
# benchmark
attentions = 'all'  # which attention kinds to time: 'all' (every kind of model.ATTENTIONS) or some, e.g. 'classic,diff'
impls = 'fused,explicit'  # attention paths: scaled_dot_product_attention, matmul-softmax
compiles = 'auto'  # 'auto': eager and compiled; or False / True
warmup_steps = 10
timed_steps = 30
pipeline = False  # also time whole epochs: resident pipeline vs torchvision DataLoader
pipeline_epochs = 1
num_workers = 2  # DataLoader worker processes for the torchvision pipeline
profile = False  # also print torch.profiler's table of timed_steps whole training steps on real data, per attention
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
apply_config(globals(), help_scripts=[_train_script, __file__])
if compiles not in (True, False, 'auto'):
    sys.exit(f"error: compiles={compiles!r}: must be True, False or 'auto'")
config_name = next((os.path.basename(a) for a in sys.argv[1:] if not a.startswith('--')), 'train.py defaults')
device, device_type, dtype, use_compile = resolve_auto(device, dtype, compile)  # compile: for --pipeline
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
spec = DATASETS[dataset]
# dense bf16 tensor-core peak, for MFU
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12}
# spinning OpenMP threads collapse on shared cores (results/NOTES.md, "Threads"), so the bench takes the cores that
# other processes leave free over LOAD_WINDOW_S s before it starts, and times every setting of its table with that one
# count (compile's worker processes would read as load, and compile guards on the count); OMP_NUM_THREADS fixes it
adapt_threads = device_type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ
max_threads = torch.get_num_threads()
LOAD_WINDOW_S = 1.5
cpu = cpu_name() if device_type == 'cpu' else None  # CPU timings depend on the model and its vector instructions


def model_config(kind, impl=attn_impl):
    return run_model_config(dict(globals(), attention=kind, attn_impl=impl))  # as train.py builds it


def peak_flops():
    if device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def make_step(model, optimizer):
    def step(x, y):
        with autocast:
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()


def bench_step(kind, impl, compiled):
    torch.manual_seed(0)
    model = ViT(model_config(kind, impl)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=True)
    if compiled:
        torch._dynamo.reset()  # each setting's own compile: else after 8 models dynamo falls back to eager unannounced
    net = torch.compile(model) if compiled else model
    step = make_step(net, optimizer)
    x = torch.randn(batch_size, *spec['shape'], device=device)
    y = torch.randint(0, spec['num_classes'], (batch_size,), device=device)
    if device_type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    for _ in range(warmup_steps):
        step(x, y)
    sync()
    warmup_s = time.time() - t0
    t0 = time.time()
    for _ in range(timed_steps):
        step(x, y)
    sync()
    dt = (time.time() - t0) / timed_steps
    result = dict(config=config_name, attention=kind, impl=impl, compile=compiled, device=device, dtype=dtype,
                  batch_size=batch_size, img_per_s=batch_size / dt, step_ms=1000 * dt, peak_mem_mb=peak_memory_mb(device),
                  warmup_s=warmup_s, params=model.num_params(), gflops_per_img=flops_per_image(model.config) / 1e9)
    if device_type == 'cpu':
        result.update(threads=torch.get_num_threads(), cpu=cpu)
    if peak_flops():
        result['mfu'] = result['img_per_s'] * flops_per_image(model.config) / peak_flops()
    return result


def profile_steps(kind, x_dev, y_dev):
    """torch.profiler's table, by self time, of whole training steps as train.py takes them on real data (batch
    indexing, augmentation, forward, backward, clipping, AdamW), with the first of impls and the last of compiles."""
    from torch.profiler import ProfilerActivity
    order = batches(len(x_dev), batch_size, device, torch.Generator().manual_seed(0), drop_last=True)
    torch.manual_seed(0)
    model = ViT(model_config(kind, impls.split(',')[0])).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=True)
    step = make_step(torch.compile(model) if compile_options[-1] else model, optimizer)
    for i in range(warmup_steps + timed_steps):
        if i == warmup_steps:
            sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
            profiler = torch.profiler.profile(activities=activities)
            profiler.start()
        idx = order[i % len(order)]
        step(normalize(augment_batch(x_dev[idx].float() / 255, augment), dataset), y_dev[idx])
    sync()
    profiler.stop()
    return profiler.key_averages().table(sort_by=f"self_{'cuda' if device_type == 'cuda' else 'cpu'}_time_total",
                                         row_limit=25)


def bench_pipeline(kind):
    """Seconds per epoch of real training data: the resident pipeline, then torchvision's, same model."""
    try:
        import_torchvision()
    except ImportError as e:  # torchvision that does not match torch: one clear line
        sys.exit(f"error: {e}")
    import torchvision.transforms.v2 as T
    from PIL import Image
    splits = load_dataset(dataset, data_dir, 'cpu')
    x_cpu, y_cpu = splits['train']
    per_sample = [T.RandomCrop(spec['shape'][1], padding=2 if augment == 'crop' else 4)] if augment != 'none' else []
    if augment == 'randaugment':
        per_sample += [T.RandomHorizontalFlip(), T.RandAugment(2, 10)]
    transform = T.Compose(per_sample + [T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                                        T.Normalize(spec['mean'], spec['std'])])

    class TorchvisionStyle(torch.utils.data.Dataset):  # what torchvision.datasets.MNIST / CIFAR10 do per sample
        def __len__(self):
            return len(x_cpu)

        def __getitem__(self, i):
            image = x_cpu[i].numpy()
            image = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
            return transform(image), int(y_cpu[i])

    loader = torch.utils.data.DataLoader(TorchvisionStyle(), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers, pin_memory=device_type == 'cuda',
                                         persistent_workers=num_workers > 0)
    x_dev, y_dev = x_cpu.to(device), y_cpu.to(device)
    results = []
    for name in ('resident', 'dataloader'):
        torch.manual_seed(0)
        model = ViT(model_config(kind)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=True)
        net = torch.compile(model) if use_compile else model
        step = make_step(net, optimizer)
        step(normalize(x_dev[:batch_size], dataset), y_dev[:batch_size])  # compile outside the timing
        sync()
        t0 = time.time()
        images = 0
        for epoch in range(pipeline_epochs):
            if name == 'resident':
                for idx in batches(len(x_dev), batch_size, device, torch.Generator().manual_seed(epoch), drop_last=True):
                    step(normalize(augment_batch(x_dev[idx].float() / 255, augment), dataset), y_dev[idx])
                    images += len(idx)
            else:
                for x, y in loader:
                    step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    images += len(y)
        sync()
        epoch_s = (time.time() - t0) / pipeline_epochs
        results.append(dict(pipeline=name, config=config_name, device=device, epoch_s=epoch_s,
                            img_per_s=images / (time.time() - t0), num_workers=num_workers if name == 'dataloader' else 0))
    return results


compile_options = [False, True] if compiles == 'auto' else [compiles]
kinds = list(ATTENTIONS) if attentions == 'all' else attentions.split(',')
unknown = [k for k in kinds if k not in ATTENTIONS]
if unknown:
    sys.exit(f"error: attentions: unknown kind {', '.join(unknown)}; known: {', '.join(ATTENTIONS)}, or all")
if adapt_threads:
    load = cpu_reading()
    time.sleep(LOAD_WINDOW_S)
    torch.set_num_threads(min(max_threads, free_cores(load, cpu_reading())))
threads = torch.get_num_threads()
where = (torch.cuda.get_device_name(device) if device_type == 'cuda'
         else f"{cpu}, {threads} thread{'s' * (threads > 1)} for every setting")
print(f"{config_name}: {dataset}, batch {batch_size}, {device} ({where}), "
      f"{dtype}, torch {torch.__version__}")
# each column as wide as its header or its widest value, so that the headers sit over the values
COLUMNS = {'attention': max(map(len, kinds)), 'impl': max(map(len, impls.split(','))), 'compile': 5,
           'img/s': 10, 'step ms': 8, 'peak MB': 8, 'MFU': 6}
widths = [max(len(name), width) for name, width in COLUMNS.items()]


def table_row(*cells):
    return ' '.join(f"{cell:>{width}}" for cell, width in zip(cells, widths))


print(table_row(*COLUMNS))
results = []
for kind in kinds:
    for impl in impls.split(','):
        for compiled in compile_options:
            r = bench_step(kind, impl, compiled)
            results.append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if 'mfu' in r else '–'
            print(table_row(kind, impl, str(compiled), f"{r['img_per_s']:,.0f}", f"{r['step_ms']:.2f}",
                            f"{r['peak_mem_mb']:.0f}", mfu), flush=True)
print(f"model FLOPs per training image (matmuls, fwd + bwd): "
      + ', '.join(f"{k} {flops_per_image(model_config(k)) / 1e6:.1f} M" for k in kinds))
for r in results:
    print(json.dumps(r))
if profile:
    train_split = load_dataset(dataset, data_dir, device)['train']
    for kind in kinds:
        print(f"profile of {timed_steps} training steps, {kind}, {impls.split(',')[0]}, compile {compile_options[-1]}:")
        print(profile_steps(kind, *train_split))
if pipeline:
    for kind in kinds:
        for r in bench_pipeline(kind):
            print(f"pipeline {r['pipeline']:>10} ({kind}): {r['epoch_s']:.1f} s/epoch, {r['img_per_s']:,.0f} img/s")
            print(json.dumps(dict(r, attention=kind)))
