"""
Trains a ViT (classic, differential or differential V2 attention) on MNIST, FashionMNIST or CIFAR-10.

Single process (writes out/mnist_diff/seed1/; python train.py --help lists every setting):
$ python train.py config/mnist_diff.py --epochs=3 --seed=1
Continue it if it was interrupted: the same config file and flags, and
$ python train.py config/mnist_diff.py --epochs=3 --seed=1 --init_from=resume
Analyse a trained run again (test, outliers, attention, noise): python eval.py out/mnist_diff/seed1
Data parallel, e.g. 4 GPUs on one node (batch_size is the global batch, split across the ranks):
$ torchrun --standalone --nproc_per_node=4 train.py config/cifar10_diff.py
"""

import atexit
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

# idle OpenMP threads spin 3,000,000 times before they sleep (GNU OpenMP's default, 300,000, cost 0-25% alone on 2
# cores), as fast as spinning forever; spinning collapses on cores that another process uses, so a CPU run only takes
# the free ones (below). Set before torch loads OpenMP.
if 'OMP_WAIT_POLICY' not in os.environ:  # a policy the user set wins
    os.environ.setdefault('GOMP_SPINCOUNT', '3000000')
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import apply_config
from data import AUGMENTATIONS, DATASETS, augment_batch, batches, load_dataset, normalize
from eval import analyse, evaluate, lambda_stats, model_config, parse_analyses, say, write_atomic
from machine import cpu_name, cpu_reading, free_cores, keep_freed_memory, peak_memory_mb, resolve_auto
from model import ViT

keep_freed_memory()

# -----------------------------------------------------------------------------
# default config values: the MNIST diff run (identical to config/mnist_diff.py)
# I/O
run_name = ''  # default: the config file's name (mnist_diff), or <dataset>_<attention> without one
out_dir = ''  # default: out/<run_name>/seed<seed> (git-ignored); the studies in the Makefile write to results/
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt): give the run's config file and flags again
overwrite = False  # True: replace the run already in out_dir; without it a run never starts over another
log_interval = 100  # steps between progress lines (and one at least every 30 s)
analyses = 'outliers,attention'  # eval.py's, after the test set and the compute: outliers, attention, noise, lambda, quant (noise and quant: minutes on CIFAR-10; the studies run all), 'all', or ''
wandb_log = False  # True: the config, progress lines, epochs and analyses to Weights & Biases too (pip install wandb)
wandb_project = 'nanodiffvision'  # the W&B project of the runs
wandb_run_name = ''  # the W&B run's name; default: <run_name>_seed<seed>
# data
dataset = 'mnist'
data_dir = 'data'
augment = 'none'  # 'none', 'flip' (horizontal), 'crop' (shifts of up to 2 pixels), 'cropflip' (4 pixels, flip), 'randaugment'
# model
patch_size = 4
n_layer = 2
n_head = 2
n_embd = 64
mlp_dim = 128
dropout = 0.0
attention = 'diff'  # 'classic', 'diff' (DIFF Transformer) or 'diff2' (DIFF Transformer V2)
qk_norm = False  # RMSNorm on every query and key head before the dot product (bounds the attention logits)
attn_impl = 'auto'  # 'fused' (scaled_dot_product_attention), 'explicit' (matmul-softmax), 'auto': fused on CUDA only
# optimizer: AdamW, linear warmup then cosine decay to min_lr, per step
epochs = 10
batch_size = 64  # global: split across the ranks under torchrun
learning_rate = 1e-3
min_lr = 1e-5
warmup_epochs = 1.0  # linear warmup, at most a tenth of the run (so that --epochs=1 of a long recipe anneals)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # 0 disables clipping
label_smoothing = 0.1
# system
seed = 0
device = 'auto'  # 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto': bfloat16 where the hardware has it (CUDA, CPUs with AVX512-BF16/AMX), else float16/32
compile = 'auto'  # True, False, or 'auto': on for CUDA; off on CPU, where 13-27 s of compiling outweigh the gain
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
cpu_load = cpu_reading()  # how busy the other processes are, measured from here until training starts
apply_config(globals())
config_files = [a for a in sys.argv[1:] if not a.startswith('--')]
run_name = run_name or (os.path.splitext(os.path.basename(config_files[-1]))[0] if config_files
                        else f'{dataset}_{attention}')
out_dir = out_dir or os.path.join('out', run_name, f'seed{seed}')
# settings that cannot change a run's result: a resumed run may change them, plot.py pools runs that differ in them
RESULT_NEUTRAL_KEYS = ('out_dir', 'data_dir', 'log_interval', 'analyses', 'init_from', 'eval_only', 'overwrite',
                       'wandb_log', 'wandb_project', 'wandb_run_name')  # eval_only: older checkpoints' setting


def fail(message):
    sys.exit(f"error: {message}")


# one clear error for each bad value, before anything slow happens
if dataset not in DATASETS:
    fail(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
if augment not in AUGMENTATIONS:
    fail(f"augment={augment!r}: must be one of {', '.join(AUGMENTATIONS)}")
if init_from not in ('scratch', 'resume'):
    fail(f"init_from={init_from!r}: must be 'scratch' or 'resume'")
for key, value, ok, rule in [('learning_rate', learning_rate, learning_rate > 0, '> 0'),
                             ('epochs', epochs, epochs >= 1, '>= 1'),
                             ('batch_size', batch_size, batch_size >= 1, '>= 1'),
                             ('warmup_epochs', warmup_epochs, warmup_epochs >= 0, '>= 0'),
                             ('min_lr', min_lr, 0 <= min_lr <= learning_rate, 'in [0, learning_rate]'),
                             ('weight_decay', weight_decay, weight_decay >= 0, '>= 0'),
                             ('grad_clip', grad_clip, grad_clip >= 0, '>= 0'),
                             ('label_smoothing', label_smoothing, 0 <= label_smoothing < 1, 'in [0, 1)'),
                             ('log_interval', log_interval, log_interval >= 1, '>= 1')]:
    if not ok:
        fail(f"{key}={value!r}: must be {rule}")
if not re.fullmatch(r'auto|cpu|cuda(:\d+)?', device):
    fail(f"device={device!r}: must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
    fail(f"dtype={dtype!r}: must be 'auto', 'float32', 'bfloat16' or 'float16'")
if compile not in (True, False, 'auto'):
    fail(f"compile={compile!r}: must be True, False or 'auto'")
if wandb_log:  # imported only when asked for, as in nanoGPT: wandb is no requirement
    try:
        import wandb
    except ImportError as e:
        fail("wandb_log=True needs the wandb package: pip install wandb" + ('' if e.name == 'wandb' else f" ({e})"))
config = {k: globals()[k] for k in config_keys}
try:
    model_args = model_config(config)
    final_analyses = ('test', 'compute') + parse_analyses(analyses)
except ValueError as e:
    fail(e)

# distributed set-up: torchrun sets RANK; each rank trains on its shard, rank 0 alone prints and writes
ddp = 'RANK' in os.environ
rank, world_size = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
device, device_type, dtype, use_compile = resolve_auto(device, dtype, compile)
if device_type == 'cuda' and not torch.cuda.is_available():
    fail(f"device={device!r} but CUDA is not available; use --device=cpu")
if ddp:
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    if device_type == 'cuda':
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
master = rank == 0
if batch_size % world_size:
    fail(f"batch_size={batch_size} must be divisible by the number of ranks ({world_size})")
local_batch_size = batch_size // world_size
torch.manual_seed(seed + rank)  # ranks share the model (DDP broadcasts it) but not their dropout/augmentation
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
autocast = (nullcontext() if dtype == 'float32'
            else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))
log = say if master else (lambda *args, **kwargs: None)

# out_dir: one run at a time (a lock file for the run's life), never over another run unless asked; all of it
# before the data loads, so a mistake costs seconds. A run that stops before it trains leaves no folder behind.
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
metrics_path = os.path.join(out_dir, 'metrics.json')
attention_path = os.path.join(out_dir, 'attention.npz')
model_path = os.path.join(out_dir, 'model.pt')
lock_path = os.path.join(out_dir, 'run.lock')


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def take_lock():
    """Creates out_dir/run.lock holding this process's pid, removed at exit. A live holder stops this run; the lock
    of a process that died (killed, machine crash) is reported and taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock_path) as f:
                    holder = f.read().strip()
            except FileNotFoundError:  # its holder released it a moment ago
                continue
            if not holder.isdigit() or process_alive(int(holder)):  # empty: its holder is writing it right now
                fail(f"{out_dir} is in use by a running process (pid {holder or '?'}, {lock_path}): wait for it to "
                     "finish, or use another --out_dir or --seed")
            log(f"note: {lock_path} was left by process {holder}, which is no longer running; taking it over")
            os.remove(lock_path)
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(str(os.getpid()))
        atexit.register(os.remove, lock_path)
        return
    fail(f"{out_dir} is in use: another run took {lock_path} over at the same moment")


def remove_if_empty(folders):
    for folder in folders:  # deepest first; stops at the first that holds something
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        else:
            return


if master:
    new_folders = []  # the folders this run creates, deepest first
    folder = os.path.abspath(out_dir)
    while not os.path.isdir(folder):
        new_folders.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(out_dir, exist_ok=True)
        atexit.register(remove_if_empty, new_folders)  # runs after take_lock's removal of the lock (atexit is LIFO)
        take_lock()
    except OSError as e:
        fail(f"cannot write to out_dir {os.path.abspath(out_dir)}: {e.strerror}")
    existing = [os.path.basename(p) for p in (metrics_path, ckpt_path) if os.path.exists(p)]
    if init_from == 'scratch' and existing and not overwrite:
        fail(f"{out_dir} already holds a run ({', '.join(existing)}): continue it with --init_from=resume, start a "
             "new one with another --out_dir or --seed, or replace it with --overwrite=True")
    if init_from == 'scratch':
        for path in (metrics_path, ckpt_path, attention_path, model_path):
            if os.path.exists(path):
                os.remove(path)

if init_from == 'resume':  # the run goes on only with the settings it was started with
    if not os.path.isfile(ckpt_path):
        fail(f"--init_from=resume: no checkpoint at {ckpt_path} (check --out_dir, --run_name and --seed)")
    try:
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    except Exception as e:
        fail(f"cannot load {ckpt_path}: it is corrupt or not a checkpoint of this project "
             f"({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(checkpoint, dict) or not {'model', 'optimizer', 'scaler', 'config', 'state', 'rng_cpu'} <= set(checkpoint):
        fail(f"{ckpt_path} is not a checkpoint of this project "
             "(it lacks model, optimizer, scaler, config, state or rng_cpu)")
    changed = [f"{k} {checkpoint['config'].get(k)!r} -> {config.get(k)!r}"
               for k in sorted(set(checkpoint['config']) | set(config))
               if k not in RESULT_NEUTRAL_KEYS and checkpoint['config'].get(k) != config.get(k)]
    if checkpoint.get('precision', dtype) != dtype:  # dtype='auto' resolves by machine; older checkpoints lack it
        changed.append(f"precision {checkpoint['precision']!r} -> {dtype!r} (dtype={config['dtype']!r} on this machine)")
    if changed:
        fail(f"{ckpt_path} was trained with other settings (checkpoint -> now: {'; '.join(changed)}): resume with "
             "the checkpoint's settings, or start a new run in another --out_dir")

try:
    splits = load_dataset(dataset, data_dir, device)
except (FileNotFoundError, ValueError) as e:
    fail(e)
x_train, y_train = splits['train']
# a fixed, un-augmented subset of the training images, measured after every epoch: whether a model fits its training
# data, which the running accuracy over augmented batches (train_acc) does not tell
splits['train_clean'] = (x_train[:5000], y_train[:5000])
log(f"{dataset}: {len(x_train):,} train / {len(splits['val'][0]):,} val / {len(splits['test'][0]):,} test images "
    f"on {device}")

model = ViT(model_args).to(device)
optim_groups = [  # weight decay on weights of 2 or more dimensions only, not on biases, norm gains or λ vectors
    {'params': [p for p in model.parameters() if p.dim() >= 2], 'weight_decay': weight_decay},
    {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=(beta1, beta2), fused=True)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
steps_per_epoch = len(x_train) // batch_size
total_steps = epochs * steps_per_epoch
# warmup takes at most a tenth of the run, so that a short run of a long recipe (--epochs=1) still anneals
warmup_steps = min(int(warmup_epochs * steps_per_epoch), total_steps // 10)

# resume: model, optimizer, position in the run and every RNG state, so the run ends as if never stopped
state = dict(epoch=0, batch=0, step=0, history=[], best_val_loss=float('inf'), elapsed=0.0, train_time=0.0,
             train_images=0, epoch_sums=[0.0, 0.0, 0.0])
failures = []  # non-finite losses this run stopped on, kept when it is resumed by hand
if init_from == 'resume':
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            failures = json.load(f).get('failures', [])
    model.load_state_dict(checkpoint['model'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    state = checkpoint['state']
    torch.set_rng_state(checkpoint['rng_cpu'])
    if device_type == 'cuda' and 'rng_cuda' in checkpoint:
        torch.cuda.set_rng_state(checkpoint['rng_cuda'])
    if state['epoch'] >= epochs:
        log(f"{out_dir} is finished ({state['epoch']} of {epochs} epochs): nothing to train; evaluating it again and "
            "rewriting its metrics.json, attention.npz and model.pt (python eval.py does that alone)")
    else:
        log(f"resuming {ckpt_path} at epoch {state['epoch'] + 1}, step {state['step']}")
if device_type == 'cpu' and state['epoch'] < epochs and (cpu := cpu_name()) not in state.setdefault('cpus', []):
    state['cpus'].append(cpu)  # the CPUs a run trained on: a run resumed on another machine pools their timings
raw_model = model
if use_compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)
log(f"{run_name} seed {seed}: {attention} ViT, {raw_model.num_params():,} parameters | device {device} "
    f"({world_size} rank{'s' * (world_size > 1)}), dtype {dtype}, compile {use_compile} | out_dir {out_dir}")
if wandb_log and master:
    try:
        wandb.init(project=wandb_project, name=wandb_run_name or f"{run_name}_seed{seed}",
                   config={**config, 'params': raw_model.num_params(), 'precision': dtype})
    except Exception as e:  # not logged in, no network: say so in one line
        fail(f"wandb.init failed ({type(e).__name__}: {' '.join(str(e).split())}): run `wandb login`, or set "
             "WANDB_MODE=offline and `wandb sync` later")
# CPU threads: OpenMP threads that wait by spinning are fastest alone (2 cores: 40% more img/s than passive waiting)
# but collapse when another process shares the cores (two at once: 4.5x the lone time each). So a CPU run takes the
# cores that other processes leave free, and looks again every 10 s: two runs on 2 cores settle at one thread each
# (results/NOTES.md, "Threads"). OMP_NUM_THREADS in the environment fixes the count instead.
adapt_threads = device_type == 'cpu' and 'OMP_NUM_THREADS' not in os.environ and cpu_load is not None
max_threads = torch.get_num_threads()


def fit_threads_to_load():
    global cpu_load
    now = cpu_reading()
    threads = min(max_threads, free_cores(cpu_load, now))
    cpu_load = now
    if threads != torch.get_num_threads():
        log(f"other processes leave {threads} of {max_threads} cores free: training with {threads} "
            f"thread{'s' * (threads > 1)}")
        torch.set_num_threads(threads)


if adapt_threads:
    fit_threads_to_load()
    adapt_threads = not use_compile  # compile guards on the thread count: each change would recompile (after 8, eager)
log(f"{epochs} epochs of {steps_per_epoch} steps, batch {batch_size}, warmup {warmup_steps} steps "
    f"({warmup_steps / steps_per_epoch:.2g} epochs), lr {learning_rate:g} -> {min_lr:g}")
# a model sized for a GPU (config/cifar10_*.py) takes days on a CPU: say so, and what CPUs run instead
gpu_sized_on_cpu = device_type == 'cpu' and raw_model.num_params() > 1_000_000
if gpu_sized_on_cpu:
    log(f"note: {raw_model.num_params() / 1e6:.1f}M parameters is a GPU config; on a CPU run "
        f"config/cifar10_small_*.py (0.3M) instead. The time this run takes follows at the first progress line")


def duration(seconds):
    """47h10m, 12m05s or 40s."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def get_lr(step):
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * progress))


def save_checkpoint():
    checkpoint = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                      model_args=asdict(model_args), config=config, precision=dtype, state=state,
                      rng_cpu=torch.get_rng_state())
    if device_type == 'cuda':
        checkpoint['rng_cuda'] = torch.cuda.get_rng_state()
    write_atomic(ckpt_path, lambda f: torch.save(checkpoint, f))


def save_metrics(test=None, **final):
    metrics = dict(run=run_name, seed=seed, dataset=dataset, config=config, params=raw_model.num_params(),
                   history=state['history'], test=test, best_val_loss=state['best_val_loss'],
                   train_time_s=state['elapsed'], images_per_s=state['train_images'] / max(state['train_time'], 1e-9),
                   device=torch.cuda.get_device_name(device) if device_type == 'cuda' else 'cpu', precision=dtype,
                   world_size=world_size, torch=torch.__version__)
    if state.get('cpus'):
        metrics['cpu'] = state['cpus']
    if failures:
        metrics['failures'] = failures
    metrics.update({k: v for k, v in final.items() if v is not None})  # attn_focus, outliers: after the last epoch
    write_atomic(metrics_path, lambda f: f.write(json.dumps(metrics, indent=1).encode()))


def stop_if_not_finite(epoch):
    step = bad_step.item()  # the first step whose loss was NaN or inf, or -1
    if step >= 0:
        failure = f"non-finite loss at epoch {epoch + 1}, step {step} (learning rate {get_lr(step):.3g})"
        if master:  # recorded, so that neither queue.sh nor plot.py lets a divergence pass unseen
            failures.append(failure)
            save_metrics()
        fail(f"{failure}; stopped, the last good checkpoint {ckpt_path} is kept and {metrics_path} records the "
             "failure. Try a lower --learning_rate or --dtype=float32")


# SIGINT / SIGTERM: finish the current step, save, and say how to go on
stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signum


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)
# -----------------------------------------------------------------------------
# training loop: losses, accuracies and the first non-finite step stay on the device, read once per log line
start = time.time() - state['elapsed']
# this rank's loss * n, correct predictions and n of the epoch so far (a resumed partial epoch keeps rank 0's)
epoch_sums = torch.tensor(state['epoch_sums'] if master else [0.0, 0.0, 0.0], device=device)
bad_step = torch.tensor(-1, device=device)
while state['epoch'] < epochs:
    epoch = state['epoch']
    order = batches(len(x_train), local_batch_size, device, torch.Generator().manual_seed(seed * 100_003 + epoch),
                    rank, world_size, drop_last=True)
    model.train()
    t_epoch, t_log, images_since_log, first_batch = time.time(), time.time(), 0, state['batch']
    for i in range(first_batch, steps_per_epoch):
        if adapt_threads and time.time() - cpu_load[0] >= 10:
            fit_threads_to_load()
        idx = order[i]
        step = state['step']
        lr = get_lr(step)
        for group in optimizer.param_groups:
            group['lr'] = lr
        x = normalize(augment_batch(x_train[idx].float() / 255, augment), dataset)
        y = y_train[idx]
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        epoch_sums[:2] += torch.stack([loss * len(y), (logits.argmax(1) == y).sum()])
        epoch_sums[2] += len(y)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
        state['step'], state['batch'] = step + 1, i + 1
        images_since_log += len(y) * world_size
        # a progress line every log_interval steps, or 30 s, whichever comes first
        if (step + 1) % log_interval == 0 or time.time() - t_log >= 30 or stop_signal is not None:
            stop_if_not_finite(epoch)
            dt = time.time() - t_log
            seconds_per_step = dt / images_since_log * batch_size
            log(f"epoch {epoch + 1}/{epochs} | step {step + 1}/{total_steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                f"{images_since_log / dt:,.0f} img/s | ETA {duration((total_steps - step - 1) * seconds_per_step)}")
            if wandb_log and master:
                wandb.log({'loss': loss.item(), 'lr': lr, 'img_per_s': images_since_log / dt}, step=step + 1)
            if gpu_sized_on_cpu:
                log(f"note: at this rate all {epochs} epochs take {duration(total_steps * seconds_per_step)} on this CPU")
                gpu_sized_on_cpu = False
            t_log, images_since_log = time.time(), 0
        if stop_signal is not None:
            state['epoch_sums'] = epoch_sums.tolist()
            state['elapsed'] = time.time() - start
            if master:
                save_checkpoint()
            args = ' '.join(a for a in sys.argv[1:] if not a.startswith('--init_from'))
            log(f"interrupted ({signal.Signals(stop_signal).name}) at epoch {epoch + 1}, step {step + 1}; saved "
                f"{ckpt_path}. Resume with: python train.py {args} --init_from=resume")
            sys.exit(128 + stop_signal)
    if ddp:
        dist.all_reduce(epoch_sums)
    stop_if_not_finite(epoch)
    train_loss_sum, train_correct, n = epoch_sums.tolist()
    state['train_time'] += time.time() - t_epoch
    state['train_images'] += (steps_per_epoch - first_batch) * batch_size
    val_loss, val_acc, _ = evaluate(model, *splits['val'], dataset, autocast, label_smoothing)
    _, train_clean_acc, _ = evaluate(model, *splits['train_clean'], dataset, autocast, label_smoothing)
    state['elapsed'] = time.time() - start
    # λ per layer (diff2: mean λ_t over the first 1,000 validation images), so that a study sees when λ crosses zero
    lam = lambda_stats(raw_model, splits['val'][0][:1000], dataset, autocast)
    epoch_row = dict(epoch=epoch + 1, step=state['step'], lr=get_lr(state['step'] - 1), train_loss=train_loss_sum / n,
                     train_acc=train_correct / n, train_clean_acc=train_clean_acc, val_loss=val_loss, val_acc=val_acc,
                     time_s=state['elapsed'], peak_mem_mb=peak_memory_mb(device),
                     **({'lambda': lam['layers']} if lam else {}))
    state['history'].append(epoch_row)
    state['best_val_loss'] = min(state['best_val_loss'], val_loss)
    state.update(epoch=epoch + 1, batch=0, epoch_sums=[0.0, 0.0, 0.0])
    epoch_sums.zero_()
    log(f"epoch {epoch + 1}/{epochs} done | train loss {train_loss_sum / n:.4f} acc {train_correct / n:.4f} | "
        f"clean train acc {train_clean_acc:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f} | {state['elapsed']:.0f}s | peak memory {epoch_row['peak_mem_mb']:,.0f} MB")
    if master:
        save_checkpoint()
        save_metrics()
        if wandb_log:
            wandb.log(epoch_row, step=state['step'])

if master:  # the analyses of eval.py: test, and those in analyses
    log(f"trained {state['elapsed']:.0f}s, {state['train_images'] / max(state['train_time'], 1e-9):,.0f} img/s")
    results, sample = analyse(raw_model, splits, dataset, patch_size, autocast, label_smoothing, final_analyses, log)
    if sample is not None:
        write_atomic(attention_path, lambda f: np.savez_compressed(f, **sample))
    # the final weights alone, float32, for eval.py and anyone's new analysis; the optimizer stays in ckpt.pt
    weights = {k: v.detach().float().cpu() for k, v in raw_model.state_dict().items()}
    write_atomic(model_path, lambda f: torch.save(weights, f))
    save_metrics(**results)
    log(f"wrote {metrics_path}, {attention_path + ', ' if sample is not None else ''}{model_path}, {ckpt_path}")
    if wandb_log:
        wandb.summary.update(results)
        wandb.finish()
if ddp:
    dist.destroy_process_group()
