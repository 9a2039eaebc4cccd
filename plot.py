"""
Figures and the results tables from every run under a results folder:
$ python plot.py results/
Reads each <run_name>/seed<seed>/metrics.json (and attention.npz beside it), groups the runs by study, dataset and
run_name, aggregates the seeds (mean ± std) and writes, per study and dataset, <dataset>_val_loss.png,
<dataset>_val_acc.png, <dataset>_attention.png (with the digit's box on each image where attention.npz has `boxes`)
and, where runs were evaluated under corruptions (metrics.json's "noise", from eval.py), <dataset>_noise.png, plus
README.md with the results tables, which it also prints.
A study is the folder that holds the <run_name> folders: the results folder itself, or a subfolder of it such as
results/gpu_NVIDIA_H200/, whose runs get their own tables and figures (in that subfolder) and are never pooled with
the others. A learning-rate sweep is one study whose runs lie in lr<rate>/ folders (<study>/lr1e-3/<run_name>/seed0/):
per run_name it tables and plots (<dataset>_lr_sweep.png) the final validation accuracy at each rate and chooses the
rate of the highest mean over the seeds that every rate has (never on test accuracy); everything else of the study
is made from each run_name's runs at its chosen rate. The seeds of one run_name in one study (at one rate) must share
every result-changing setting, compared as it resolved on the run's machine (device, dtype, compile and attn_impl
'auto' equal what they became), and a run of unknown precision never pools with one of known precision; runs that
differ, and a copy of a run (the same seed twice), are an error, never mixed. A run that stopped on a non-finite
loss (metrics.json's "failures", its "test" null) is counted on its row, never dropped; an unfinished run is skipped.
Comparisons: a study's *_vit runs (classic attention, no qk_norm) are its baselines; every other run is compared with
them, and a run whose attention is not classic also with *_balanced and with a classic run of its parameter count
(within 1%), where the two runs' settings agree apart from
ATTENTION_KEYS and RECIPE_KEYS (the recipe keys in which they differ are named on the line; any other difference is
named instead of a test). Each: the difference with its Welch 95% CI and Welch's t-test, p Holm-corrected within its
family of the study and dataset: test accuracy (the primary family, with a ±1-point TOST equivalence) or the rest.
Where runs have eval.py's lambda and quant: <dataset>_lambda.png (λ per layer) and <dataset>_quant.png (accuracy
against bits), and their tables.
Precision and epochs are named on every row and legend where the runs of a study and dataset differ in them, else
once under the heading. Only the repository's own results/ folder gets the old project's published table beside ours.
"""

import glob
import json
import math
import os
import re
import sys
from collections import defaultdict

import numpy as np
import matplotlib
matplotlib.use('Agg')
import matplotlib.colors
import matplotlib.patches
import matplotlib.pyplot as plt
import matplotlib.ticker

# run_name = <dataset>_<variant>. The colours of the known variants, in the order of tables and legends: classic,
# classic with twice the heads, differential, Differential Transformer V2, and differential / classic with qk_norm;
# any other variant gets one of the tab10 colours these leave free
COLORS = {'vit': 'tab:blue', 'balanced': 'tab:green', 'diff': 'tab:red', 'diff2': 'tab:purple', 'diffqk': 'tab:orange',
          'vitqk': 'tab:cyan'}
# settings in which two runs may differ and still be compared: the attention itself, and the recipe a study may choose
# per variant (each comparison line names these where they differ)
ATTENTION_KEYS = ('attention', 'n_head', 'qk_norm', 'attn_impl')
RECIPE_KEYS = ('learning_rate', 'min_lr', 'mlp_dim')
RATE_FOLDER = re.compile(r'lr(\d+(?:\.\d+)?(?:e[-+]?\d+)?)')  # a sweep's folder of one learning rate, e.g. lr4e-3
REQUIRED = ('run', 'seed', 'dataset', 'config', 'params', 'history', 'test', 'images_per_s', 'device')
# config keys that cannot change a result (train.py's RESULT_NEUTRAL_KEYS) and the seed: the seeds of one run may differ there
POOLED_KEYS = ('seed', 'out_dir', 'data_dir', 'log_interval', 'analyses', 'init_from', 'eval_only', 'overwrite',
               'wandb_log', 'wandb_project', 'wandb_run_name')
CLASS_NAMES = {
    'fashionmnist': ('T-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'boot'),
    'cifar10': ('plane', 'car', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'),
}
# validation accuracies whose time to reach the table reports (a budget question only where they take a while)
VAL_ACC_MARKS = {'cifar10': (0.7, 0.8)}
# the numbers a comparison tests: (stat key, scale, name)
TESTS = (('test_acc', 100, 'test acc (points)'), ('test_loss', 1, 'test loss'), ('val_loss', 1, 'val loss'),
         ('attn_focus', 1, 'attention focus'), ('attn_logits.top1', 1, 'largest |attention logit|'),
         ('activations.top1', 1, 'largest |activation|'), ('noise_mean', 100, 'mean noise acc (points)'),
         ('robustness', 1, 'chance-corrected robustness'), ('robust.distractors', 1, 'distractor robustness'),
         ('quant.logits.4', 100, 'test acc, 4-bit logits (points)'))
# the primary family: its tests, Holm-corrected among themselves, are what the verdict rests on; every other test of a
# section forms a secondary family (they are correlated with each other and with test accuracy)
PRIMARY = 'test_acc'
# "matches" in test accuracy only within ±EQUIVALENCE points: both one-sided Welch tests at 0.05 (TOST), that is the
# 90% confidence interval inside the margin
EQUIVALENCE = 1.0
# chance accuracy, the floor of chance-corrected robustness: every dataset of data.DATASETS has 10 classes
CHANCE = 0.1
# the figures of a section, in the report's order, and their alt texts
FIGURES = {'lr_sweep': 'learning-rate sweep', 'val_loss': 'validation loss', 'val_acc': 'validation accuracy',
           'attention': 'attention maps', 'noise': 'accuracy under noise', 'lambda': 'λ per layer',
           'quant': 'accuracy against bits'}
# the studies of "when would diff win?": one figure each of test accuracy against an axis, x label, x of a run, and its
# panels: (the axis study, the study holding each variant's default setting, e.g. lr_sweep's cifar10_small_vit at
# n_head 8 with its chosen rate). The pixels a side of each dataset's images, for the number of tokens
IMAGE_SIZE = {'mnist': 28, 'fashionmnist': 28, 'cifar10': 32, 'mnist_cluttered': 40, 'mnist_cluttered56': 56,
              'mnist_cluttered80': 80}
AXES = {
    'head_width': ('head width (n_embd / n_head)', lambda m: m['config']['n_embd'] // m['config']['n_head'],
                   (('cifar10_small_heads', 'lr_sweep'),)),
    'size': ('parameters', lambda m: m['params'], (('cifar10_small_size', 'lr_sweep'),)),
    'tokens': ('tokens (patches)', lambda m: (IMAGE_SIZE[m['dataset']] // m['config']['patch_size']) ** 2,
               (('cifar10_small_tokens', 'lr_sweep'), ('mnist_cluttered56', 'mnist_cluttered_sweep'))),
}
# the variants the axes follow (at the default setting also where an axis study lacks them: diff on the size axis)
AXIS_VARIANTS = ('vit', 'diff', 'diff2')
# the repository's own results folder: the only one whose README gets the old project's table
OWN_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
# the project NanoDiffVision replaces, as it published them: single seeds, and its parameter counts were wrong
# (its lite ViT has 81.5K parameters and its diff variant 98.2K)
OLD_TABLE = {
    'mnist': [('ViT', '33.8K', 0.638, 0.626, 0.9551), ('ViT balanced (4 heads)', '55.6K', 0.633, 0.624, 0.9553),
              ('ViT diff', '38.1K', 0.624, 0.618, 0.9575)],
    'fashionmnist': [('ViT', '33.8K', 0.813, 0.826, 0.8586), ('ViT balanced', '33.8K', 0.792, 0.798, 0.8679),
                     ('ViT diff', '38.1K', 0.788, 0.796, 0.8726)],
}


def fail(message):
    sys.exit(f"error: {message}")


def load_runs(folder):
    """{(study, dataset): {run_name: [metrics of each run, by learning rate and seed]}} for the finished and the failed
    runs under folder; study is the path from folder to the folder holding <run_name>/seed<seed>/ (or a sweep's
    lr<rate>/ folders), '.' for folder itself. Each metrics dict gets 'path' (its folder) and 'sweep' (whether it lies
    in an lr<rate>/ folder)."""
    paths = sorted(glob.glob(os.path.join(folder, '**', 'metrics.json'), recursive=True))
    if not paths:
        fail(f"no metrics.json under {folder}/: train some runs first, e.g. python train.py config/mnist_diff.py")
    runs = defaultdict(lambda: defaultdict(list))
    for path in paths:
        try:
            with open(path) as f:
                m = json.load(f)
            missing = [k for k in REQUIRED if k not in m]
            if missing:
                raise ValueError(f"missing keys {missing}")
        except (ValueError, OSError) as e:
            fail(f"{path} is not a valid metrics.json ({e})")
        if m['test'] is None and not m.get('failures'):
            print(f"skipping {path}: the run has not finished")
            continue
        m['path'] = os.path.dirname(path)
        parts = os.path.relpath(m['path'], folder).split(os.sep)
        rate_folder = RATE_FOLDER.fullmatch(parts[-3]) if len(parts) > 2 else None
        if rate_folder and not math.isclose(float(rate_folder[1]), rate(m)):
            fail(f"{path} lies in {parts[-3]}/ but its learning_rate is {rate(m)!r}: move it to the folder of its rate")
        m['sweep'] = rate_folder is not None
        study = os.path.normpath(os.path.join('.', *parts[:-3 if m['sweep'] else -2]))
        runs[study, m['dataset']][m['run']].append(m)
    if not runs:
        fail(f"no finished run under {folder}/")
    runs = {k: dict(by_run) for k, by_run in runs.items()}
    for by_run in runs.values():
        sweep = is_sweep(by_run)
        for run, ms in by_run.items():
            ms.sort(key=lambda m: (rate(m), m['seed']))
            for a, b in zip(ms, ms[1:]):
                if (rate(a), a['seed']) == (rate(b), b['seed']):
                    fail(f"{run} seed {a['seed']} is in both {a['path']} and {b['path']}: a copy of a run is not "
                         "another seed; move one away")
            first = settings(ms[0])
            for m in ms[1:]:
                other = settings(m)
                # an unknown precision beside a known one: the check below says what to do about it; a sweep's runs
                # of one run_name differ in their learning rate
                diffs = {k: v for k, v in differences(first, other).items()
                         if not (k == 'precision' and None in v) and not (sweep and k == 'learning_rate')}
                if diffs:
                    fail(f"the runs of {run} in {ms[0]['path']} and {m['path']} differ in {described(diffs)}: "
                         "move one away or give it another run_name")
            known, unknown = [m for m in ms if precision(m)], [m for m in ms if not precision(m)]
            if known and unknown:
                fail(f"the runs of {run} in {known[0]['path']} ({precision(known[0])}) and {unknown[0]['path']} "
                     "(precision unknown: dtype 'auto', from before metrics.json recorded what it resolved to) cannot "
                     "pool: add \"precision\" to its metrics.json where it is documented, or move one away")
    return runs


def is_sweep(by_run):
    return any(m['sweep'] for ms in by_run.values() for m in ms)


def finished(ms):
    return [m for m in ms if m['test'] is not None]


def rate(m):
    return m['config']['learning_rate']


def rate_name(lr):
    """4e-3 for 0.004, as a sweep's folders name it."""
    mantissa, exponent = f"{lr:e}".split('e')
    return f"{float(mantissa):g}e{int(exponent)}"


def precision(m):
    """What dtype resolved to: recorded by train.py; None for an older run with dtype 'auto'."""
    dtype = m['config'].get('dtype', 'auto')
    return m.get('precision') or (dtype if dtype != 'auto' else None)


def settings(m):
    """The config without POOLED_KEYS, each 'auto' replaced by what it resolved to on the run's machine (train.py's
    resolve_auto; metrics.json's device is 'cpu' or a CUDA card's name), so that 'auto' equals its value."""
    config = m['config']
    cuda = m['device'] != 'cpu'
    s = {k: v for k, v in config.items() if k not in POOLED_KEYS and k != 'dtype'}
    s['device'] = 'cuda' if cuda else 'cpu'
    s['precision'] = precision(m)
    s['compile'] = cuda if config.get('compile', 'auto') == 'auto' else config['compile']
    s['attn_impl'] = config.get('attn_impl', 'auto')
    if s['attn_impl'] == 'auto':
        s['attn_impl'] = 'fused' if cuda else 'explicit'  # model.py's use_explicit
    s['qk_norm'] = config.get('qk_norm', False)  # runs from before qk_norm existed had none
    return s


def differences(a, b):
    """{key: (a's value, b's value)} for the keys in which two settings differ."""
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def described(diffs):
    return ', '.join(f"{k} ({x!r} vs {y!r})" for k, (x, y) in diffs.items())


def variant(run_name):
    return run_name.rsplit('_', 1)[-1]


def ordered(runs):
    """Run names in the order of COLORS' variants, then any other; by name, numbers by value (e48 before e144)."""
    order = list(COLORS)
    return sorted(runs, key=lambda r: (order.index(variant(r)) if variant(r) in order else len(order),
                                       [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', r)]))


def colours(runs):
    """{run: colour}: COLORS' by variant, and the tab10 colours those leave free, in turn, for the others by name."""
    free = [c for c in matplotlib.colors.TABLEAU_COLORS if c not in COLORS.values()]
    others = sorted(r for r in runs if variant(r) not in COLORS)
    return {r: COLORS[variant(r)] if variant(r) in COLORS else free[others.index(r) % len(free)] for r in runs}


def setup(m):
    """(precision, epochs) of a run, as tables, legends and headings name them."""
    return precision(m) or 'precision unknown', len(m['history'])


def run_tags(by_run):
    """{run: [precision, epochs]} where the runs of one study and dataset differ in either (main names them once
    under the heading where they agree: then every run's tags are [])."""
    setups = {r: setup(ms[0]) for r, ms in by_run.items()}
    mixed = len(set(setups.values())) > 1
    return {r: [p, f"{epochs} ep"] if mixed else [] for r, (p, epochs) in setups.items()}


def label(run, tags, *more):
    parts = tags.get(run, []) + list(more)
    return f"{run} ({', '.join(parts)})" if parts else run


def seeds(n):
    return f"{n} seed{'s' * (n != 1)}"


def mean_std(values, digits):
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"  # one seed: no spread to report
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def cell(values, digits):
    """mean_std, or '–' where a run lacks the number (NaN)."""
    return '–' if np.isnan(values).any() else mean_std(values, digits)


def t_density(x, df):
    return np.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                  - (df + 1) / 2 * np.log1p(np.asarray(x) ** 2 / df))


def student_p(t, df):
    """Two-sided p of Student's t with df degrees of freedom, its density integrated numerically."""
    x = np.linspace(0, abs(t), 20001)
    return max(0.0, 1 - 2 * np.trapezoid(t_density(x, df), x))


def t_quantile(df, level):
    """The t whose two-sided p is 1 - level: Newton's method on student_p (convex in t, so the steps never overshoot)."""
    t = 1.0
    for _ in range(200):
        step = (student_p(t, df) - (1 - level)) / (2 * t_density(t, df))
        t += step
        if abs(step) < 1e-9:
            break
    return t


def welch_parts(a, b):
    """(difference of means a - b, its standard error, Welch's degrees of freedom)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb else math.inf
    return a.mean() - b.mean(), math.sqrt(va + vb), df


def welch(a, b):
    """Welch's two-sample t-test: (t, two-sided p)."""
    delta, se, df = welch_parts(a, b)
    if se == 0:
        return (math.inf if delta != 0 else 0.0), (0.0 if delta != 0 else 1.0)
    return delta / se, student_p(delta / se, df)


def welch_ci(a, b, level=0.95):
    """The difference of means a - b and its Welch confidence interval: (delta, low, high)."""
    delta, se, df = welch_parts(a, b)
    half = t_quantile(df, level) * se if se else 0.0
    return delta, delta - half, delta + half


def robustness(noise):
    """{corruption: (acc - chance) / (clean - chance), averaged over its severities}: the share of its accuracy above
    chance that a run keeps. Noisy / clean accuracy would favour a weaker model, whose clean accuracy is nearer the
    chance floor that any corruption leaves it."""
    above = noise['clean'] - CHANCE
    return {c: float(np.mean([(a - CHANCE) / above for a in accs.values()])) for c, accs in noise['accuracy'].items()}


def stat(m, key):
    """One number of a run; NaN where the run does not have it (attention focus on CIFAR-10, outliers of old runs,
    clean training accuracy, noise, λ and quantization of runs older than what measures them)."""
    if key.startswith(('attn_logits', 'activations')):  # e.g. 'attn_logits.top1'
        kind, which = key.split('.')
        return m['outliers'][kind][which] if 'outliers' in m else float('nan')
    if key.startswith(('noise', 'robust')):  # 'robustness': the corruptions' mean, 'robust.<corruption>': one
        if 'noise' not in m:
            return float('nan')
        if key == 'noise_mean':
            return m['noise']['mean']
        by_corruption = robustness(m['noise'])
        return np.mean(list(by_corruption.values())) if key == 'robustness' else by_corruption[key.split('.')[1]]
    if key.startswith('quant'):  # 'quant.<logits or residual>.<bits>'
        _, where, bits = key.split('.')
        return m['quant'][where][bits] if 'quant' in m else float('nan')
    if key == 'lambda_min':  # diff: the smallest λ of its layers; diff2: the smallest mean λ_t
        return min(m['lambda']['layers']) if 'lambda' in m else float('nan')
    if key == 'attn_focus_pos':  # a classic map is positive: its focus is its positive part's
        return m.get('attn_focus_pos', m.get('attn_focus', float('nan')) if m['config']['attention'] == 'classic'
                     else float('nan'))
    last = m['history'][-1]
    return {'val_loss': last['val_loss'], 'val_acc': last['val_acc'],
            'train_clean_acc': last.get('train_clean_acc', float('nan')), 'test_loss': m['test']['loss'],
            'test_acc': m['test']['acc'], 'attn_focus': m.get('attn_focus', float('nan'))}[key]


def chosen_rates(by_run):
    """{run: the learning rate of its highest mean final validation accuracy} over each run's finished runs, on the
    seeds that every rate has (the sweep's seed 0: the seeds run later at the chosen rate cannot move the choice), or
    each rate's every seed where they share none; never on test accuracy; the lowest rate of a tie."""
    chosen = {}
    for run, ms in by_run.items():
        done = finished(ms)
        rates = sorted({rate(m) for m in done})
        if rates:
            compared = selection_seeds(done)
            chosen[run] = max(rates, key=lambda r: np.mean([stat(m, 'val_acc') for m in done
                                                            if rate(m) == r and m['seed'] in compared]))
    return chosen


def selection_seeds(done):
    """The seeds a rate is chosen on: those every rate has, or every seed where the rates share none."""
    rates = {rate(m) for m in done}
    return (set.intersection(*({m['seed'] for m in done if rate(m) == r} for r in rates))
            or {m['seed'] for m in done})


def sweep_table(by_run, chosen):
    """Per run_name its final validation accuracy at each learning rate (seeds, failed runs) and the rate chosen."""
    rates = sorted({rate(m) for ms in by_run.values() for m in ms})
    lines = ["| model | " + ''.join(f"lr {rate_name(r)} | " for r in rates) + "chosen lr | "
             "test acc at it (%): all seeds / without the selection seeds |", "|" + "---|" * (len(rates) + 3)]
    for run in ordered(by_run):
        cells = []
        for r in rates:
            at = [m for m in by_run[run] if rate(m) == r]
            done = finished(at)
            text = [f"{mean_std([100 * stat(m, 'val_acc') for m in done], 2)} ({seeds(len(done))})"] if done else []
            cells.append(', '.join(text + ([f"{len(at) - len(done)} failed"] if len(at) > len(done) else [])) or '–')
        tried = sorted({rate(m) for m in by_run[run]})
        if run not in chosen:
            choice = '– (no finished run)'
        else:
            edge = ' (the only rate tried)' if len(tried) == 1 else ' (at the edge: add the next rate out)'
            choice = rate_name(chosen[run]) + (edge if chosen[run] in (tried[0], tried[-1]) else '')
        # the winner's curse: the selection seeds' test accuracy is not independent of the choice made on them
        at = [m for m in finished(by_run[run]) if run in chosen and rate(m) == chosen[run]]
        rest = [m for m in at if m['seed'] not in selection_seeds(finished(by_run[run]))]
        curse = (f"{mean_std([100 * stat(m, 'test_acc') for m in at], 2)} / "
                 + (f"{mean_std([100 * stat(m, 'test_acc') for m in rest], 2)} ({seeds(len(rest))})" if rest else '–')
                 if at else '–')
        lines.append(f"| {run} | " + ' | '.join(cells) + f" | {choice} | {curse} |")
    return lines


def sweep_figure(dataset, by_run, path):
    """Final validation accuracy against learning rate, one line per run_name: the mean over its seeds at each rate,
    ± 1 std where it has several."""
    rates = sorted({rate(m) for ms in by_run.values() for m in finished(ms)})
    colour = colours(by_run)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in ordered(by_run):
        points = [(r, [stat(m, 'val_acc') for m in finished(by_run[run]) if rate(m) == r]) for r in rates]
        points = [(r, accs) for r, accs in points if accs]
        if not points:
            continue
        x, accs = zip(*points)
        ax.errorbar(x, [np.mean(a) for a in accs], yerr=[np.std(a, ddof=1) if len(a) > 1 else np.nan for a in accs],
                    color=colour[run], marker='o', capsize=3, label=run)
    ax.set_xscale('log')
    ax.set_xticks(rates, [rate_name(r) for r in rates])
    ax.minorticks_off()
    ax.set_xlabel('learning rate')
    ax.set_ylabel('final validation accuracy')
    ax.set_title(f"{dataset}: learning-rate sweep (mean ± 1 std over seeds where several)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_figure(dataset, by_run, tags, key, ylabel, path):
    colour = colours(by_run)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in ordered(by_run):
        curves = np.array([[h[key] for h in m['history']] for m in by_run[run]])  # same epochs: load_runs checks
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(0)
        std = curves.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        ax.plot(epochs, mean, color=colour[run], label=label(run, tags, seeds(len(curves))))
        ax.fill_between(epochs, mean - std, mean + std, color=colour[run], alpha=0.25, linewidth=0)
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    one_seed = all(len(ms) == 1 for ms in by_run.values())
    ax.set_title(f"{dataset}: {ylabel} ({'one seed' if one_seed else 'mean ± 1 std over seeds'})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attention_figure(dataset, by_run, tags, path, n_images=8):
    """The same test images; per variant (its lowest seed) the CLS token's last-layer attention over the patches,
    averaged over heads, on the image. Every row shares one diverging colour scale, symmetric about zero, so that the
    rows compare by eye: classic attention is never negative, differential attention's signed maps may be. Where
    attention.npz has `boxes` (mnist_cluttered), each image's digit box is outlined on every panel of it."""
    samples = {r: np.load(os.path.join(by_run[r][0]['path'], 'attention.npz')) for r in ordered(by_run)
               if os.path.exists(os.path.join(by_run[r][0]['path'], 'attention.npz'))}
    if not samples:
        return False
    first = next(iter(samples.values()))
    images = first['images'][:n_images]
    maps = {}
    for run, sample in samples.items():
        grid = int(math.isqrt(sample['cls_attn'].shape[-1]))
        maps[run] = sample['cls_attn'][-1, :n_images].mean(axis=1).reshape(-1, grid, grid)
    limit = max(np.abs(m).max() for m in maps.values())
    names = CLASS_NAMES.get(dataset)
    fig, axes = plt.subplots(len(samples) + 1, n_images, figsize=(1.5 * n_images, 1.6 * (len(samples) + 1)),
                             squeeze=False)
    for j, image in enumerate(images):
        target = int(first['labels'][j])
        axes[0, j].imshow(image.transpose(1, 2, 0).squeeze(), cmap='gray')
        axes[0, j].set_title(names[target] if names else f"label {target}", fontsize=9)
    for i, run in enumerate(maps, start=1):
        for j, (image, attn) in enumerate(zip(images, maps[run])):
            ax = axes[i, j]
            ax.imshow(image.transpose(1, 2, 0).squeeze(), cmap='gray')
            h, w = image.shape[1:]
            shown = ax.imshow(attn, cmap='RdBu_r', alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5), vmin=-limit,
                              vmax=limit, interpolation='nearest')
        axes[i, 0].set_ylabel('\n'.join([variant(run), f"seed {by_run[run][0]['seed']}"] + tags[run]), fontsize=9)
    fig.colorbar(shown, ax=axes[1:, :].ravel().tolist(), fraction=0.02, pad=0.01,
                 label='attention (one scale for every row)')
    if 'boxes' in first.files:  # [row0, col0, row1, col1) in pixels; a pixel c spans c - 0.5 to c + 0.5
        for j, (row0, col0, row1, col1) in enumerate(first['boxes'][:n_images]):
            for ax in axes[:, j]:
                ax.add_patch(matplotlib.patches.Rectangle((col0 - 0.5, row0 - 0.5), col1 - col0, row1 - row0,
                                                          fill=False, edgecolor='lime', linewidth=0.8))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{dataset}: CLS attention over patches, last layer, mean over heads\none colour scale for every row, "
                 "symmetric about 0 (blue: negative, which only differential attention can be)", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return True


def noise_levels(by_run):
    """{corruption: its severities, in the order metrics.json lists them (increasing severity)} over the runs."""
    levels = {}
    for run in ordered(by_run):
        for m in by_run[run]:
            for corruption, accs in m.get('noise', {}).get('accuracy', {}).items():
                levels[corruption] = list(dict.fromkeys(levels.get(corruption, []) + list(accs)))
    return levels


def noise_figure(dataset, by_run, tags, path):
    """One panel per corruption: test accuracy clean (x = 0) and at each severity (categorical, as listed), one line
    per run (over its seeds that have noise: mean ± 1 std where several)."""
    levels = noise_levels(by_run)
    colour = colours(by_run)
    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.6), sharey=True, squeeze=False)
    for ax, (corruption, severities) in zip(axes[0], levels.items()):
        x = np.arange(len(severities) + 1)
        for run in ordered(by_run):
            ms = [m for m in by_run[run] if 'noise' in m]
            if not ms:
                continue
            accs = np.array([[m['noise']['clean']] + [m['noise']['accuracy'].get(corruption, {}).get(s, np.nan)
                                                      for s in severities] for m in ms])
            ax.errorbar(x, accs.mean(0), yerr=accs.std(0, ddof=1) if len(ms) > 1 else None, color=colour[run],
                        marker='o', markersize=3, capsize=2, label=label(run, tags, seeds(len(ms))))
        ax.set_xticks(x, ['clean'] + severities)
        ax.set_xlabel('severity')
        ax.set_title(corruption, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel('test accuracy')
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{dataset}: test accuracy under corruptions (mean ± 1 std over seeds where several)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def minutes_to(ms, acc):
    """Mean minutes of training until the validation accuracy first reaches acc, over the seeds that reach it."""
    times = [next((h['time_s'] / 60 for h in m['history'] if h['val_acc'] >= acc), None) for m in ms]
    reached = [t for t in times if t is not None]
    if not reached:
        return 'not reached'
    return mean_std(reached, 1) + ('' if len(reached) == len(ms) else f" ({len(reached)} of {len(ms)} seeds)")


def failed_cell(ms, failed):
    """A row's failed runs of all its runs, and its finished runs that were resumed by hand after a failure."""
    resumed = sum(bool(m.get('failures')) for m in ms)
    return ((f"{len(failed)} of {len(ms) + len(failed)}" if failed else '0')
            + (f"; {resumed} resumed after a failure" if resumed else ''))


def machine(m):
    """A run's device, with the CPUs it trained on where metrics.json records them (its timings depend on them)."""
    return m['device'] + (': ' + ' + '.join(m['cpu']) if m.get('cpu') else '')


def compute_cell(ms):
    """Training compute, TFLOP: the matmul FLOPs of a training image (eval.py's compute) times the images the run saw
    (its steps times the global batch); – for runs from before it was recorded."""
    flops = [m['flops_per_image'] * m['history'][-1]['step'] * m['config']['batch_size'] if 'flops_per_image' in m
             else float('nan') for m in ms]
    return '–' if np.isnan(flops).any() else f"{np.mean(flops) / 1e12:,.1f}"


def dataset_table(dataset, by_run, failed, tags):
    """One row per run_name: its finished runs' numbers, and a row of '–' for a run_name whose runs all failed."""
    marks = VAL_ACC_MARKS.get(dataset, ())
    header = (['model', 'params', 'val loss', 'val acc (%)', 'test loss', 'test acc (%)', 'train acc (clean, %)',
               'attention focus', 'seeds', 'failed', 's/epoch', 'min per run']
              + [f"min to {100 * acc:.0f}% val" for acc in marks] + ['compute (TFLOP)', 'img/s', 'device'])
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for run in ordered(set(by_run) | {r for r, ms in failed.items() if ms}):
        ms = by_run.get(run, [])
        if not ms:
            cells = ['–'] * (len(header) - 1)  # the cells leave out the model column
            cells[header.index('seeds') - 1] = '0'
            cells[header.index('failed') - 1] = failed_cell(ms, failed[run])
        else:
            cells = ([f"{ms[0]['params']:,}", mean_std([stat(m, 'val_loss') for m in ms], 4),
                      mean_std([100 * stat(m, 'val_acc') for m in ms], 2),
                      mean_std([stat(m, 'test_loss') for m in ms], 4),
                      mean_std([100 * stat(m, 'test_acc') for m in ms], 2),
                      cell([100 * stat(m, 'train_clean_acc') for m in ms], 2),
                      cell([stat(m, 'attn_focus') for m in ms], 3), str(len(ms)), failed_cell(ms, failed.get(run, [])),
                      f"{np.mean([m['history'][-1]['time_s'] / len(m['history']) for m in ms]):.1f}",
                      mean_std([m['train_time_s'] / 60 for m in ms], 1)] + [minutes_to(ms, acc) for acc in marks]
                     + [compute_cell(ms), f"{np.mean([m['images_per_s'] for m in ms]):,.0f}",
                        ', '.join(sorted({machine(m) for m in ms}))])
        lines.append(f"| {label(run, tags)} | " + ' | '.join(cells) + ' |')
    return lines


def outlier_table(by_run, tags):
    """The DIFF paper's Table 5 for these runs: |attention logits| and |residual-stream activations| on the test set."""
    runs = [r for r in ordered(by_run) if all('outliers' in m for m in by_run[r])]
    if not runs:
        return []
    keys = [f"{kind}.{which}" for kind in ('attn_logits', 'activations') for which in ('top1', 'top10', 'median')]
    lines = ["| model | logits top-1 | logits top-10 | logits median | activations top-1 | activations top-10 | "
             "activations median | seeds |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {label(run, tags)} | "
                     + ' | '.join(mean_std([stat(m, k) for m in by_run[run]], 3 if 'median' in k else 1) for k in keys)
                     + f" | {len(by_run[run])} |")
    return lines


def noise_table(by_run, tags):
    """Per run, over its seeds that have noise: clean and mean noise accuracy, chance-corrected robustness (the mean of
    its corruptions') and each corruption's mean accuracy over its severities."""
    levels = noise_levels(by_run)
    runs = [r for r in ordered(by_run) if any('noise' in m for m in by_run[r])]
    if not runs:
        return []
    lines = ["| model | clean acc (%) | mean noise acc (%) | robustness | "
             + ''.join(f"{c} (%) | " for c in levels) + "seeds |", "|" + "---|" * (len(levels) + 5)]
    for run in runs:
        ms = [m for m in by_run[run] if 'noise' in m]
        corruptions = [cell([100 * np.mean(list(m['noise']['accuracy'][c].values())) if c in m['noise']['accuracy']
                             else np.nan for m in ms], 2) for c in levels]
        lines.append(f"| {label(run, tags)} | {mean_std([100 * m['noise']['clean'] for m in ms], 2)} | "
                     f"{mean_std([100 * stat(m, 'noise_mean') for m in ms], 2)} | "
                     f"{mean_std([stat(m, 'robustness') for m in ms], 3)} | "
                     + ''.join(f"{c} | " for c in corruptions) + f"{len(ms)} |")
    return lines


def robustness_table(by_run, tags):
    """Per run, chance-corrected robustness: overall (the corruptions' mean, each weighing the same) and per corruption
    (its severities' mean of (acc - chance) / (clean - chance))."""
    levels = noise_levels(by_run)
    runs = [r for r in ordered(by_run) if any('noise' in m for m in by_run[r])]
    if not runs:
        return []
    lines = ["| model | robustness | " + ''.join(f"{c} | " for c in levels) + "seeds |",
             "|" + "---|" * (len(levels) + 3)]
    for run in runs:
        ms = [m for m in by_run[run] if 'noise' in m]
        lines.append(f"| {label(run, tags)} | {mean_std([stat(m, 'robustness') for m in ms], 3)} | "
                     + ''.join(f"{cell([stat(m, 'robust.' + c) for m in ms], 3)} | " for c in levels)
                     + f"{len(ms)} |")
    return lines


def layers(values, digits=3):
    return ', '.join(f"{v:.{digits}f}" for v in values)


def lambda_table(by_run, tags):
    """Per run and seed, what λ learned (eval.py's lambda: diff's λ per layer, diff2's λ_t per layer) beside the run's
    test accuracy and attention focus (|A| and its positive part), and the line that counts diff's runs with a layer
    at λ ≤ 0."""
    runs = [r for r in ordered(by_run) if any('lambda' in m for m in by_run[r])]
    if not runs:
        return []
    lines = ["| model | seed | λ per layer (diff2: mean λ_t) | smallest | λ_t 10th pct | λ_t 90th pct | "
             "share λ_t < 0.1 | test acc (%) | attention focus | focus, positive part |", "|" + "---|" * 10]
    crossed = []
    for run in runs:
        for m in by_run[run]:
            if 'lambda' not in m:
                continue
            lam = m['lambda']
            spread = [layers(lam[k], 2) if k in lam else '–' for k in ('p10', 'p90', 'below_0.1')]
            focus = [cell([stat(m, k)], 3) for k in ('attn_focus', 'attn_focus_pos')]
            lines.append(f"| {label(run, tags)} | {m['seed']} | {layers(lam['layers'])} | {stat(m, 'lambda_min'):.3f} | "
                         + ' | '.join(spread) + f" | {100 * stat(m, 'test_acc'):.2f} | " + ' | '.join(focus) + " |")
            if m['config']['attention'] == 'diff':
                crossed.append(stat(m, 'lambda_min') <= 0)
    if crossed:
        lines += ["", f"diff runs with a layer at λ ≤ 0 (that layer adds its two maps): {sum(crossed)} of {len(crossed)}"]
    return lines


def lambda_figure(dataset, by_run, tags, path):
    """λ against layer, one line per seed, a colour per run (diff: λ; diff2: mean λ_t over the test set, its 10th to
    90th percentile shaded)."""
    colour = colours(by_run)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in ordered(by_run):
        ms = [m for m in by_run[run] if 'lambda' in m]
        for i, m in enumerate(ms):
            lam = m['lambda']
            x = np.arange(len(lam['layers']))
            ax.plot(x, lam['layers'], color=colour[run], marker='o', label=label(run, tags, seeds(len(ms))) if not i else None)
            if 'p10' in lam:
                ax.fill_between(x, lam['p10'], lam['p90'], color=colour[run], alpha=0.1, linewidth=0)
    ax.axhline(0, color='black', linewidth=0.8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel('layer')
    ax.set_ylabel('λ')
    ax.set_title(f"{dataset}: λ per layer, every seed (diff2: mean λ_t, 10th-90th pct shaded)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quant_bits(by_run):
    return sorted({b for ms in by_run.values() for m in ms for b in m.get('quant', {}).get('logits', {})},
                  key=int, reverse=True)


def quant_table(by_run, tags):
    """Per run, over its seeds that have it: clean test accuracy and the accuracy with the attention logits or the
    residual stream fake-quantized at each number of bits (eval.py's quant)."""
    bits = quant_bits(by_run)
    runs = [r for r in ordered(by_run) if any('quant' in m for m in by_run[r])]
    if not runs:
        return []
    lines = ["| model | clean acc (%) | " + ''.join(f"logits {b}-bit | " for b in bits)
             + ''.join(f"residual {b}-bit | " for b in bits) + "seeds |", "|" + "---|" * (2 * len(bits) + 3)]
    for run in runs:
        ms = [m for m in by_run[run] if 'quant' in m]
        cells = [cell([100 * stat(m, f'quant.{where}.{b}') for m in ms], 2) for where in ('logits', 'residual')
                 for b in bits]
        lines.append(f"| {label(run, tags)} | {mean_std([100 * stat(m, 'test_acc') for m in ms], 2)} | "
                     + ' | '.join(cells) + f" | {len(ms)} |")
    return lines


def quant_figure(dataset, by_run, tags, path):
    """Test accuracy against bits, clean first, one panel per setting (logits, residual stream), one line per run:
    the mean over its seeds ± 1 std where several."""
    bits = quant_bits(by_run)
    colour = colours(by_run)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharey=True)
    for ax, where in zip(axes, ('logits', 'residual')):
        x = np.arange(len(bits) + 1)
        for run in ordered(by_run):
            ms = [m for m in by_run[run] if 'quant' in m]
            if not ms:
                continue
            accs = np.array([[stat(m, 'test_acc')] + [stat(m, f'quant.{where}.{b}') for b in bits] for m in ms])
            ax.errorbar(x, accs.mean(0), yerr=accs.std(0, ddof=1) if len(ms) > 1 else None, color=colour[run],
                        marker='o', markersize=3, capsize=2, label=label(run, tags, seeds(len(ms))))
        ax.set_xticks(x, ['clean'] + [str(b) for b in bits])
        ax.set_xlabel('bits')
        ax.set_title({'logits': 'attention logits quantized', 'residual': 'residual stream quantized'}[where],
                     fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('test accuracy')
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{dataset}: absmax fake quantization, per image (mean ± 1 std over seeds where several)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def axis_points(sections, study, reference):
    """{run: its runs} of one panel of an axis figure: the axis study's runs and the reference study's (the default
    setting), each at its chosen rate, of AXIS_VARIANTS."""
    return {r: ms for (s, _), by_run in sections.items() if s in (study, reference) for r, ms in by_run.items()
            if variant(r) in AXIS_VARIANTS}


def of_variant(runs, v):
    """Every seed's metrics of the runs of one variant (vit, diff, ...) in {run: its runs}."""
    return [m for r, ms in runs.items() if variant(r) == v for m in ms]


def accuracies_at(ms, x_of):
    """{axis setting: the test accuracies (%) of the runs there}, settings in increasing order."""
    by_x = defaultdict(list)
    for m in ms:
        by_x[x_of(m)].append(100 * stat(m, 'test_acc'))
    return dict(sorted(by_x.items()))


def classic_rise(by_size):
    """classic's {size: test accuracies (%)} (accuracies_at) up to the size of its best mean: accuracy is read off the
    part of classic's curve that rises (beyond its best a larger classic does worse, and an accuracy there would
    belong to two sizes)."""
    means = [np.mean(accs) for accs in by_size.values()]
    return dict(list(by_size.items())[:int(np.argmax(means)) + 1]) if by_size else {}


def classic_fit(rise):
    """(slope, intercept): a least-squares line of the classic seeds' test accuracy (%) against log10 of the axis,
    over classic_rise's sizes; None where that is fewer than two."""
    if len(rise) < 2:
        return None
    return np.polyfit([math.log10(x) for x, accs in rise.items() for _ in accs],
                      [acc for accs in rise.values() for acc in accs], 1)


def on_curve(acc, sizes, means):
    """The size at which classic's curve, its means at each size joined by straight lines in log10 size, reaches a
    test accuracy; beyond its ends, along its first or last segment."""
    i = min(max(int(np.searchsorted(means, acc)), 1), len(means) - 1)
    logs = np.log10(sizes)
    return 10 ** (logs[i - 1] + (acc - means[i - 1]) * (logs[i] - logs[i - 1]) / (means[i] - means[i - 1]))


def size_equivalence(runs, x_of):
    """Lines that place every other variant on classic's accuracy curve against parameters, read off at the variant's
    mean and at the ends of the 95% confidence interval of that mean (classic's own seed spread is not in the range):
    on the curve through classic's means (on_curve), which follows a bend, and on classic_fit's straight line."""
    by_size = accuracies_at(of_variant(runs, 'vit'), x_of)
    if len(by_size) < 2:
        return []
    said = (f"Size equivalence: classic's mean test accuracy at {len(by_size)} sizes: "
            + ', '.join(f"{x:,} {np.mean(accs):.2f}% ({seeds(len(accs))})" for x, accs in by_size.items()) + ".")
    rise = classic_rise(by_size)
    sizes = list(rise)
    fit = classic_fit(rise)
    if fit is None:
        return [f"{said} None: classic does best at its smallest size.", ""]
    slope, intercept = fit
    means = [np.mean(by_size[x]) for x in sizes]
    rising = all(a < b for a, b in zip(means, means[1:]))
    if len(sizes) < len(by_size):
        said += (f" It does best at {sizes[-1]:,} and worse beyond: what follows reads the sizes up to "
                 f"{sizes[-1]:,}.")
    lines = [said + f" Its least-squares line: {intercept:.2f} + {slope:.2f} × log10(parameters) "
             f"({slope * math.log10(2):+.2f} points a doubling). Each other variant where classic reaches its accuracy "
             "(at its mean, and at the ends of the mean's 95% CI), on classic's curve (its means joined in log "
             "parameters)" + (" and on the line:" if rising else ": none, its means do not rise with size; on the "
                              "line:"), ""]
    for run in ordered(runs):
        if variant(run) == 'vit':
            continue
        for x, accs in accuracies_at(runs[run], x_of).items():
            if len(accs) < 2:
                lines.append(f"- {run} at {x:,} parameters: {accs[0]:.2f}% from one seed, no interval")
                continue
            mean = np.mean(accs)
            half = t_quantile(len(accs) - 1, 0.95) * np.std(accs, ddof=1) / math.sqrt(len(accs))
            points = (mean - half, mean, mean + half)
            readings = [('line', [10 ** ((acc - intercept) / slope) for acc in points])]
            if rising:
                readings.insert(0, ('curve', [on_curve(acc, sizes, means) for acc in points]))
            said = []
            for how, (low, at, high) in readings:
                outside = ', an extrapolation' if not sizes[0] <= at <= sizes[-1] else ''
                said.append(f"on the {how} ≈ classic at {at / 1e6:.3f}M (range {low / 1e6:.3f}-{high / 1e6:.3f}M), "
                            f"{at / x:.2f}× its size{outside}")
            lines.append(f"- {run} at {x:,} parameters ({mean:.2f}%, 95% CI [{mean - half:.2f}, {mean + half:.2f}], "
                         f"{seeds(len(accs))}): " + '; '.join(said))
    return lines


def axis_figure(name, panels, path):
    """Test accuracy against an axis, one panel per dataset, one line per variant: mean ± 1 std over its seeds at each
    setting (each seed a dot); on the size axis, classic_fit as a dashed line over the sizes it is fitted on."""
    xlabel, x_of, _ = AXES[name]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        by_variant = {v: accuracies_at(of_variant(runs, v), x_of) for v in {variant(r) for r in runs}}
        colour = colours(by_variant)  # a variant's name is a run name of that variant
        for v in ordered(by_variant):
            xs, accs = list(by_variant[v]), list(by_variant[v].values())
            counts = seeds(len(accs[0])) if len(accs) == 1 else '/'.join(str(len(a)) for a in accs) + ' seeds'
            ax.errorbar(xs, [np.mean(a) for a in accs], yerr=[np.std(a, ddof=1) if len(a) > 1 else 0 for a in accs],
                        color=colour[v], marker='o', capsize=3, label=f"{v} ({counts})")
            for x, a in zip(xs, accs):
                ax.plot([x] * len(a), a, '.', color=colour[v], alpha=0.4)
        rise = classic_rise(by_variant.get('vit', {})) if name == 'size' else {}
        fit = classic_fit(rise)
        if fit is not None:
            xs = list(rise)
            ax.plot(xs, np.polyval(fit, np.log10(xs)), '--', color=colour['vit'], alpha=0.6, label='vit: fit on log10')
        ticks = []
        for x in sorted({x for v in by_variant.values() for x in v}):
            if not ticks or x >= 1.25 * ticks[-1]:  # variants a few percent apart in size would overprint their labels
                ticks.append(x)
        ax.set_xscale('log')
        ax.set_xticks(ticks, [f"{x / 1e6:.2f}M" if name == 'size' else str(x) for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel('test accuracy (%)')
    fig.suptitle(f"Test accuracy against {xlabel}\nmean ± 1 std over seeds; dots: seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def holm(ps):
    """Holm-Bonferroni adjusted p-values, in the order given: the k-th smallest of m times (m - k + 1), capped at 1
    and never below the one before it."""
    adjusted, running = [0.0] * len(ps), 0.0
    for k, i in enumerate(np.argsort(ps, kind='stable')):
        running = max(running, min(1.0, (len(ps) - k) * ps[i]))
        adjusted[i] = running
    return adjusted


def comparable(a, b):
    """How the settings of two runs differ: ({recipe key: values}, {any other key: values}); they are compared only
    where the second is empty (the attention keys, and run_name, may always differ)."""
    diffs = differences(settings(a), settings(b))
    recipe = {k: v for k, v in diffs.items() if k in RECIPE_KEYS}
    other = {k: v for k, v in diffs.items() if k not in RECIPE_KEYS + ATTENTION_KEYS + ('run_name',)}
    return recipe, other


def comparison(by_run, tags):
    """Every run against the study's baselines, its *_vit runs (classic attention, no qk_norm; those of its own name's
    prefix where there are such, e.g. cifar10_small_h4_vit for cifar10_small_h4_diff), and a run whose
    attention is not classic also against its *_balanced runs and any classic run of its parameter count (a control
    such as cifar10_small_vit351k for diff2), where comparable() allows: for each of TESTS the
    difference of means with its Welch 95% CI, whether it exceeds 2 std, and Welch's t-test, whose p is Holm-corrected
    within its family of this study and dataset: test accuracy (PRIMARY, the verdict's; with its TOST equivalence at
    ±EQUIVALENCE points) or the rest."""
    classic = [r for r in ordered(by_run) if by_run[r][0]['config']['attention'] == 'classic'
               and not settings(by_run[r][0])['qk_norm']]
    vits = [r for r in classic if r.endswith('_vit')]
    rows = []  # (line up to its verdict, raw p, whether in the primary family), p None where there is no test
    for run in ordered(by_run):
        if run in vits:
            continue
        a = by_run[run]
        # a differential run also against balanced, and against a classic control of its parameter count (within 1%)
        controls = [r for r in classic if r not in vits and (r.endswith('_balanced') or
                    abs(by_run[r][0]['params'] - a[0]['params']) <= 0.01 * a[0]['params'])]
        # a study along an axis names its runs <axis setting>_<variant>: each against the vit of its own setting
        own_vits = [r for r in vits if r.rsplit('_', 1)[0] == run.rsplit('_', 1)[0]] or vits
        for other in own_vits + (controls if a[0]['config']['attention'] != 'classic' else []):
            b = by_run[other]
            pair = f"{label(run, tags)} vs {label(other, tags)}"
            recipe, rest = comparable(a[0], b[0])
            if rest:
                rows.append((f"- {pair}: not compared: differ in {described(rest)}", None, False))
                continue
            if recipe:
                pair += f" (also differs in {described(recipe)})"
            if min(len(a), len(b)) < 2:
                rows.append((f"- {pair}: needs at least 2 seeds each for a test", None, False))
                continue
            for key, scale, name in TESTS:
                xa, xb = [scale * stat(m, key) for m in a], [scale * stat(m, key) for m in b]
                if key.startswith(('noise', 'robust', 'quant')):  # runs older than eval.py's: the seeds that have it
                    xa, xb = [x for x in xa if not math.isnan(x)], [x for x in xb if not math.isnan(x)]
                if min(len(xa), len(xb)) < 2 or np.isnan(xa).any() or np.isnan(xb).any():
                    continue
                delta, low, high = welch_ci(xa, xb)
                spread = max(np.std(xa, ddof=1), np.std(xb, ddof=1))
                t, p = welch(xa, xb)
                text = (f"- {pair}, {name}: {delta:+.4f} (95% CI [{low:+.4f}, {high:+.4f}]; larger std {spread:.4f}; "
                        f"{'exceeds' if abs(delta) > 2 * spread else 'within'} 2 std), Welch t = {t:+.2f}, p = {p:.3f}")
                if key == PRIMARY:
                    _, low, high = welch_ci(xa, xb, 0.90)
                    text += (f", ±{EQUIVALENCE:g}-point equivalence (TOST, 90% CI [{low:+.2f}, {high:+.2f}]): "
                             f"{'holds' if -EQUIVALENCE < low and high < EQUIVALENCE else 'not shown'}")
                rows.append((text, p, key == PRIMARY))
    if not rows:
        return []
    families = {primary: [p for _, p, f in rows if p is not None and f == primary] for primary in (True, False)}
    corrected = {primary: iter(holm(ps)) for primary, ps in families.items()}
    lines = [f"Comparisons (difference of means a - b with its Welch 95% CI; Holm p: Welch's p corrected within its "
             f"family, the primary one of these {len(families[True])} test-accuracy tests, on which the verdict rests, "
             f"or the secondary one of the section's {len(families[False])} other tests):"
             if any(families.values()) else "Comparisons:", ""]
    for text, p, primary in rows:
        if p is None:
            lines.append(text)
            continue
        q = next(corrected[primary])
        lines.append(f"{text}, Holm p = {q:.3f} ({'primary' if primary else 'secondary'}): "
                     f"{'significant (p < 0.05)' if q < 0.05 else 'not significant'}")
    return lines


def main(folder):
    runs = load_runs(folder)
    report = ["# Results", "",
              f"Generated by `python plot.py {folder}` from every `metrics.json` below this folder. Mean ± sample std "
              "over seeds. Losses include label smoothing 0.1, as those of the old project did "
              "([eithannak29/NanoDiffVision](https://github.com/eithannak29/NanoDiffVision), which this one replaces). "
              "Val loss is the last "
              "epoch's; test numbers are the final model's. Train acc (clean): the last epoch's accuracy on a fixed, "
              "un-augmented subset of 5,000 training images (not the running mean over the augmented batches); – for "
              "runs from before it was measured. Failed: the runs of a row that stopped on a non-finite loss, of all "
              "its runs (a row whose runs all failed has no numbers), and its finished runs resumed by hand after a "
              "failure. Attention focus: the share of the CLS token's last-layer attention mass (|weights|, mean over "
              "heads) on foreground patches of the test set (mnist_cluttered: on the patches inside the digit's box, "
              "which its attention maps outline); CIFAR-10 has no foreground mask, so it has no focus (–). Outliers "
              "(the DIFF paper's Table 5): the largest, 10th largest and median |value| over the test set of the "
              "attention logits before each softmax (QKᵀ/√d) and of the residual stream (every block's output). "
              "Noise (eval.py): test accuracy under each corruption at each severity; mean noise acc is the mean over "
              "every (corruption, severity) cell, a corruption's column its mean over its severities; runs from before "
              "eval.py are left out of it. Robustness is chance-corrected: (acc - chance) / (clean - chance), chance "
              f"{CHANCE:g}, averaged over a corruption's severities, then over the corruptions with equal weight "
              "(noisy / clean accuracy would favour a weaker model). What λ learned (eval.py's lambda): diff's λ per "
              "layer (λ ≤ 0: the layer adds its two maps instead of subtracting them), diff2's λ_t over every token "
              "and head of the test set; attention focus averages |A|, which for a signed diff map also counts what "
              "it subtracts (and where λ < 0 the map is att1 + |λ| att2), so the focus of the positive part max(A, 0) "
              "stands beside it. Quantization (eval.py's quant, the DIFF paper's Fig. 8): test accuracy with the "
              "attention logits before every softmax, or every block's output on the residual stream, fake-quantized "
              "by dynamic absmax per image and layer (all heads and maps of a layer share one scale; 2^(b-1) - 1 "
              "levels each side), no retraining. Learning-rate sweeps (a study of lr<rate>/ "
              "folders): per run_name the final validation accuracy at each rate; the rate of the highest mean over "
              "the seeds every rate has is chosen (test accuracy plays no part), flagged where it is the lowest or "
              "highest tried, and the rest of the section is made from each run_name's runs at its chosen rate, "
              "named on its row; the sweep table gives the test accuracy at the chosen rate also without the seeds "
              "it was chosen on (a winner's curse favours the variant with more rates tried). Comparisons: a study's "
              "vit (classic attention, no qk_norm) is the baseline of every "
              "other run, and a run whose "
              "attention is not classic is also compared with balanced and with a classic run of its parameter count "
              "(within 1%, e.g. vit351k for diff2); two runs are compared only where their "
              f"settings agree apart from the attention ({', '.join(ATTENTION_KEYS)}) and the recipe a study may "
              f"choose per variant ({', '.join(RECIPE_KEYS)}: named on the line where they differ), else the line "
              "says in what they differ. Each comparison: the difference of means with its 95% confidence interval "
              "(Welch) and Welch's t-test, whose p is given raw and Holm–Bonferroni corrected (Holm p) within its "
              "family. Holm families: test accuracy is the primary family (the test-accuracy comparisons of one "
              "section, one study and dataset), on which the verdict rests; the section's other tests (losses, focus, "
              "outliers, noise, robustness, 4-bit accuracy: correlated with each other and with accuracy) form a "
              "secondary family of their own. Significant means Holm p < 0.05; \"no difference detected\" is not "
              f"equivalence: test accuracy is called equivalent only where the 90% CI lies inside ±{EQUIVALENCE:g} "
              "point (two one-sided tests, TOST). Precision and epochs: under a section's heading where its runs "
              "agree on them, else on every row and legend.", ""]
    written = []
    sections = {}  # (study, dataset): its finished runs at their chosen rates, for the axis figures
    for study, dataset in sorted(runs, key=lambda k: (k[0] != '.', k)):  # the folder's own runs first
        everything = runs[study, dataset]
        figure = {kind: os.path.normpath(os.path.join(study, f'{dataset}_{kind}.png'))  # relative to folder
                  for kind in FIGURES}
        made = []  # the figures of this section, in FIGURES' order
        report += [f"## {dataset}" + ('' if study == '.' else f" ({study}/)"), ""]
        sweep, chosen = [], {}
        if is_sweep(everything):
            chosen = chosen_rates(everything)
            sweep = (["Learning-rate sweep: final validation accuracy (%), mean ± std over seeds; the chosen rate has "
                      "the highest mean over the seeds every rate has:", ""] + sweep_table(everything, chosen)
                     + ["", "At each run_name's chosen rate:", ""])
            if chosen:
                sweep_figure(dataset, everything, os.path.join(folder, figure['lr_sweep']))
                made.append('lr_sweep')
            everything = {r: [m for m in ms if rate(m) == chosen[r]] if r in chosen else ms
                          for r, ms in everything.items()}
        by_run = {r: finished(ms) for r, ms in everything.items() if finished(ms)}
        sections[study, dataset] = by_run
        failed = {r: [m for m in ms if m['test'] is None] for r, ms in everything.items()}
        tags = run_tags(by_run)
        if by_run and not any(tags.values()):  # the runs agree: say it once
            shared_precision, epochs = setup(next(iter(by_run.values()))[0])
            report += [f"{shared_precision}, {epochs} epochs", ""]
        if chosen:  # each row at its own rate
            tags = {r: [f"lr {rate_name(chosen[r])}"] + t for r, t in tags.items()}
        report += sweep + dataset_table(dataset, by_run, failed, tags) + [""]
        if by_run:
            for key, ylabel in (('val_loss', 'validation loss'), ('val_acc', 'validation accuracy')):
                curve_figure(dataset, by_run, tags, key, ylabel, os.path.join(folder, figure[key]))
                made.append(key)
        if attention_figure(dataset, by_run, tags, os.path.join(folder, figure['attention'])):
            made.append('attention')
        if noise_levels(by_run):
            noise_figure(dataset, by_run, tags, os.path.join(folder, figure['noise']))
            made.append('noise')
        if any('lambda' in m for ms in by_run.values() for m in ms):
            lambda_figure(dataset, by_run, tags, os.path.join(folder, figure['lambda']))
            made.append('lambda')
        if quant_bits(by_run):
            quant_figure(dataset, by_run, tags, os.path.join(folder, figure['quant']))
            made.append('quant')
        for title, table in (('Outliers:', outlier_table(by_run, tags)), ('Noise:', noise_table(by_run, tags)),
                             ('Chance-corrected robustness:', robustness_table(by_run, tags)),
                             ('What λ learned:', lambda_table(by_run, tags)),
                             ('Quantization (test accuracy, %):', quant_table(by_run, tags))):
            if table:
                report += [title, ""] + table + [""]
        comparisons = comparison(by_run, tags)
        if comparisons:
            report += comparisons + [""]
        # the old project's numbers beside the repository's own main study only, never in a user's out/README.md
        if dataset in OLD_TABLE and study == '.' and os.path.realpath(folder) == os.path.realpath(OWN_RESULTS):
            report += ["The old project's published table (single seed, wrong parameter counts):", "",
                       "| model | params (as published) | val loss | test loss | test acc (%) |", "|---|---|---|---|---|"]
            report += [f"| {n} | {p} | {vl:.3f} | {tl:.3f} | {100 * a:.2f} |" for n, p, vl, tl, a in OLD_TABLE[dataset]]
            report.append("")
        written += [os.path.join(folder, figure[kind]) for kind in made]
        report += [f"![{dataset} {FIGURES[kind]}]({figure[kind]})" for kind in made] + [""]
    axes = {name: [(f"{study}/ (default: {reference}/)", axis_points(sections, study, reference))
                   for study, reference in AXES[name][2] if any(s == study for s, _ in sections)]
            for name in AXES}
    axes = {name: panels for name, panels in axes.items() if panels}
    if axes:
        report += ["## When would diff win? Test accuracy along three axes", "",
                   "Each axis study beside each variant's default setting (its reference study: cifar10_small's n_head "
                   "8, 0.31M parameters, 64 tokens; cluttered MNIST's 40 × 40 canvas), every run at its chosen rate.",
                   ""]
    for name, panels in axes.items():
        path = os.path.join(folder, f'axis_{name}.png')
        axis_figure(name, panels, path)
        written.append(path)
        if name == 'size':
            report += size_equivalence(panels[0][1], AXES['size'][1]) + [""]
        report += [f"![test accuracy against {AXES[name][0]}](axis_{name}.png)", ""]
    text = '\n'.join(report)
    with open(os.path.join(folder, 'README.md.tmp'), 'w') as f:
        f.write(text)
    os.replace(os.path.join(folder, 'README.md.tmp'), os.path.join(folder, 'README.md'))
    print(text)
    print(f"wrote {', '.join(written + [os.path.join(folder, 'README.md')])}")


if __name__ == '__main__':
    usage = "usage: python plot.py <results folder>, e.g. python plot.py results/"
    if sys.argv[1:] in (['--help'], ['-h']):
        print(usage)
        sys.exit(0)
    if len(sys.argv) != 2:
        fail(usage)
    if not os.path.isdir(sys.argv[1]):
        fail(f"{sys.argv[1]} is not a folder; {usage}")
    main(sys.argv[1].rstrip('/'))
