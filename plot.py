"""
Figures and the results table from every run under a results folder:
$ python plot.py results/
Reads each <run_name>/seed<seed>/metrics.json (and attention.npz beside it), groups the runs by study, dataset and
run_name, aggregates the seeds (mean ± std) and writes, per study and dataset, <dataset>_val_loss.png,
<dataset>_val_acc.png and <dataset>_attention.png, plus README.md with the results tables, which it also prints.
A study is the folder that holds the <run_name> folders: the results folder itself, or a subfolder of it such as
results/gpu_NVIDIA_H200/, whose runs get their own tables and figures (in that subfolder) and are never pooled with
the others. The seeds of one run_name in one study must share every result-changing setting, compared as it resolved
on the run's machine (device, dtype, compile and attn_impl 'auto' equal what they became), and a run of unknown
precision never pools with one of known precision; runs that differ, and a copy of a run (the same seed twice), are
an error, never mixed. run_name = <dataset>_<variant>, variant one of VARIANTS; each variant is compared with vit, and
the differential ones also with balanced (Welch's t-test, p Holm-corrected over every test of the study and dataset).
Precision and epochs are named on every row and legend where the runs of a study and dataset differ in them, else
once under the heading. Only the repository's own results/ folder gets the old project's published table beside ours.
"""

import glob
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import matplotlib.ticker

# run_name = <dataset>_<variant>: classic, classic with twice the heads, differential, Differential Transformer V2,
# and differential / classic with qk_norm
VARIANTS = ('vit', 'balanced', 'diff', 'diff2', 'diffqk', 'vitqk')
COLORS = {'vit': 'tab:blue', 'balanced': 'tab:green', 'diff': 'tab:red', 'diff2': 'tab:purple', 'diffqk': 'tab:orange',
          'vitqk': 'tab:cyan'}
BASELINES = {'balanced': ('vit',), 'diff': ('vit', 'balanced'), 'diff2': ('vit', 'balanced'),
             'diffqk': ('vit', 'balanced'), 'vitqk': ('vit',)}  # what comparison() tests each variant against
REQUIRED = ('run', 'seed', 'dataset', 'config', 'params', 'history', 'test', 'images_per_s', 'device')
# config keys that cannot change a result (train.py's RESULT_NEUTRAL_KEYS) and the seed: the seeds of one run may differ there
POOLED_KEYS = ('seed', 'out_dir', 'data_dir', 'log_interval', 'init_from', 'eval_only', 'overwrite')
CLASS_NAMES = {
    'fashionmnist': ('T-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'boot'),
    'cifar10': ('plane', 'car', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'),
}
# validation accuracies whose time to reach the table reports (a budget question only where they take a while)
VAL_ACC_MARKS = {'cifar10': (0.7, 0.8)}
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
    """{(study, dataset): {run_name: [metrics of each seed, by seed]}} for the finished runs under folder; study is
    the path from folder to the folder holding <run_name>/seed<seed>/, '.' for folder itself."""
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
        if m['test'] is None:
            print(f"skipping {path}: the run has not finished")
            continue
        m['path'] = os.path.dirname(path)
        parts = os.path.relpath(m['path'], folder).split(os.sep)
        study = os.path.join(*parts[:-2]) if len(parts) > 2 else '.'
        runs[study, m['dataset']][m['run']].append(m)
    if not runs:
        fail(f"no finished run under {folder}/")
    runs = {k: {r: sorted(ms, key=lambda m: m['seed']) for r, ms in by_run.items()} for k, by_run in runs.items()}
    for by_run in runs.values():
        for run, ms in by_run.items():
            for a, b in zip(ms, ms[1:]):
                if a['seed'] == b['seed']:
                    fail(f"{run} seed {a['seed']} is in both {a['path']} and {b['path']}: a copy of a run is not "
                         "another seed; move one away")
            first = settings(ms[0])
            for m in ms[1:]:
                other = settings(m)
                # an unknown precision beside a known one: the check below says what to do about it
                differences = [f"{k} ({first.get(k)!r} vs {other.get(k)!r})" for k in sorted(set(first) | set(other))
                               if first.get(k) != other.get(k) and not (k == 'precision' and None in (first[k], other[k]))]
                if differences:
                    fail(f"the runs of {run} in {ms[0]['path']} and {m['path']} differ in {', '.join(differences)}: "
                         "move one away or give it another run_name")
            known, unknown = [m for m in ms if precision(m)], [m for m in ms if not precision(m)]
            if known and unknown:
                fail(f"the runs of {run} in {known[0]['path']} ({precision(known[0])}) and {unknown[0]['path']} "
                     "(precision unknown: dtype 'auto', from before metrics.json recorded what it resolved to) cannot "
                     "pool: add \"precision\" to its metrics.json where it is documented, or move one away")
    return runs


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


def variant(run_name):
    return run_name.rsplit('_', 1)[-1]


def ordered(by_run):
    return sorted(by_run, key=lambda r: (VARIANTS.index(variant(r)) if variant(r) in VARIANTS else 99, r))


def setup(m):
    """(precision, epochs) of a run, as tables, legends and headings name them."""
    return precision(m) or 'precision unknown', len(m['history'])


def run_tags(by_run):
    """{run: [precision, epochs]} where the runs of one study and dataset differ in either (main names them once
    under the heading where they agree: then every run's tags are [])."""
    setups = {r: setup(ms[0]) for r, ms in by_run.items()}
    mixed = len(set(setups.values())) > 1
    return {r: [p, f"{epochs} ep"] if mixed else [] for r, (p, epochs) in setups.items()}


def label(run, tags):
    return f"{run} ({', '.join(tags[run])})" if tags[run] else run


def mean_std(values, digits):
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"  # one seed: no spread to report
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def welch(a, b):
    """Welch's two-sample t-test: (t, two-sided p). p comes from the Student-t density integrated numerically."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return (math.inf if a.mean() != b.mean() else 0.0), (0.0 if a.mean() != b.mean() else 1.0)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    x = np.linspace(0, abs(t), 20001)
    density = np.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                     - (df + 1) / 2 * np.log1p(x ** 2 / df))
    return t, max(0.0, 1 - 2 * np.trapezoid(density, x))


def stat(m, key):
    """One number of a run; NaN where the run does not have it (attention focus on CIFAR-10, outliers of old runs)."""
    if key.startswith(('attn_logits', 'activations')):  # e.g. 'attn_logits.top1'
        kind, which = key.split('.')
        return m['outliers'][kind][which] if 'outliers' in m else float('nan')
    return {'val_loss': m['history'][-1]['val_loss'], 'test_loss': m['test']['loss'], 'test_acc': m['test']['acc'],
            'attn_focus': m.get('attn_focus', float('nan'))}[key]


def curve_figure(dataset, by_run, tags, key, ylabel, path):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in ordered(by_run):
        curves = np.array([[h[key] for h in m['history']] for m in by_run[run]])  # same epochs: load_runs checks
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(0)
        std = curves.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        color = COLORS.get(variant(run))
        seeds = f"{len(curves)} seed{'s' * (len(curves) > 1)}"
        ax.plot(epochs, mean, color=color, label=f"{run} ({', '.join(tags[run] + [seeds])})")
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.25, linewidth=0)
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
    averaged over heads, on the image. The classic rows share one colour scale; the signed maps of differential
    attention (diff, diff2) share a diverging one, symmetric about zero."""
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
    signed = {r: by_run[r][0]['config']['attention'] in ('diff', 'diff2') for r in maps}
    limits = {s: max((np.abs(m).max() for r, m in maps.items() if signed[r] == s), default=1.0) for s in (False, True)}
    names = CLASS_NAMES.get(dataset)
    fig, axes = plt.subplots(len(samples) + 1, n_images, figsize=(1.5 * n_images, 1.6 * (len(samples) + 1)),
                             squeeze=False)
    for j, image in enumerate(images):
        target = int(first['labels'][j])
        axes[0, j].imshow(image.transpose(1, 2, 0).squeeze(), cmap='gray')
        axes[0, j].set_title(names[target] if names else f"label {target}", fontsize=9)
    for i, run in enumerate(maps, start=1):
        limit = limits[signed[run]]
        for j, (image, attn) in enumerate(zip(images, maps[run])):
            ax = axes[i, j]
            ax.imshow(image.transpose(1, 2, 0).squeeze(), cmap='gray')
            h, w = image.shape[1:]
            shown = ax.imshow(attn, cmap='RdBu_r' if signed[run] else 'inferno', alpha=0.6,
                              extent=(-0.5, w - 0.5, h - 0.5, -0.5), vmin=-limit if signed[run] else 0, vmax=limit,
                              interpolation='nearest')
        axes[i, 0].set_ylabel('\n'.join([variant(run), f"seed {by_run[run][0]['seed']}"] + tags[run]
                                        + ['(signed)'] * signed[run]), fontsize=9)
        fig.colorbar(shown, ax=axes[i, :].tolist(), fraction=0.02, pad=0.01)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{dataset}: CLS attention over patches, last layer, mean over heads", fontsize=11)
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    return True


def minutes_to(ms, acc):
    """Mean minutes of training until the validation accuracy first reaches acc, over the seeds that reach it."""
    times = [next((h['time_s'] / 60 for h in m['history'] if h['val_acc'] >= acc), None) for m in ms]
    reached = [t for t in times if t is not None]
    if not reached:
        return 'not reached'
    return mean_std(reached, 1) + ('' if len(reached) == len(ms) else f" ({len(reached)} of {len(ms)} seeds)")


def dataset_table(dataset, by_run, tags):
    marks = VAL_ACC_MARKS.get(dataset, ())
    lines = ["| model | params | val loss | test loss | test acc (%) | attention focus | seeds | s/epoch | min per run | "
             + ''.join(f"min to {100 * acc:.0f}% val | " for acc in marks) + "img/s | device |",
             "|" + "---|" * (11 + len(marks))]
    for run in ordered(by_run):
        ms = by_run[run]
        focus = [stat(m, 'attn_focus') for m in ms]
        lines.append(f"| {label(run, tags)} | {ms[0]['params']:,} | {mean_std([stat(m, 'val_loss') for m in ms], 4)} | "
                     f"{mean_std([stat(m, 'test_loss') for m in ms], 4)} | "
                     f"{mean_std([100 * stat(m, 'test_acc') for m in ms], 2)} | "
                     f"{mean_std(focus, 3) if not np.isnan(focus).any() else '–'} | {len(ms)} | "
                     f"{np.mean([m['history'][-1]['time_s'] / len(m['history']) for m in ms]):.1f} | "
                     f"{mean_std([m['train_time_s'] / 60 for m in ms], 1)} | "
                     + ''.join(f"{minutes_to(ms, acc)} | " for acc in marks) +
                     f"{np.mean([m['images_per_s'] for m in ms]):,.0f} | "
                     f"{', '.join(sorted({m['device'] for m in ms}))} |")
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


def holm(ps):
    """Holm-Bonferroni adjusted p-values, in the order given: the k-th smallest of m times (m - k + 1), capped at 1
    and never below the one before it."""
    adjusted, running = [0.0] * len(ps), 0.0
    for k, i in enumerate(np.argsort(ps, kind='stable')):
        running = max(running, min(1.0, (len(ps) - k) * ps[i]))
        adjusted[i] = running
    return adjusted


def comparison(by_run, tags):
    """Each variant against its BASELINES: the difference of means, whether it exceeds 2 std, and Welch's t-test,
    whose p is Holm-corrected over every test here (the family: one study and dataset); the verdict uses that p."""
    rows = []  # (line up to its verdict, raw p), p None where there is no test
    for run in ordered(by_run):
        for other in (r for r in ordered(by_run) if variant(r) in BASELINES.get(variant(run), ())):
            a, b = by_run[run], by_run[other]
            pair = f"{label(run, tags)} vs {label(other, tags)}"
            if min(len(a), len(b)) < 2:
                rows.append((f"- {pair}: needs at least 2 seeds each for a test", None))
                continue
            for key, scale, name in (('test_acc', 100, 'test acc (points)'), ('test_loss', 1, 'test loss'),
                                     ('val_loss', 1, 'val loss'), ('attn_focus', 1, 'attention focus'),
                                     ('attn_logits.top1', 1, 'largest |attention logit|'),
                                     ('activations.top1', 1, 'largest |activation|')):
                xa, xb = [scale * stat(m, key) for m in a], [scale * stat(m, key) for m in b]
                if np.isnan(xa).any() or np.isnan(xb).any():
                    continue
                delta = np.mean(xa) - np.mean(xb)
                spread = max(np.std(xa, ddof=1), np.std(xb, ddof=1))
                t, p = welch(xa, xb)
                rows.append((f"- {pair}, {name}: {delta:+.4f} (larger std {spread:.4f}; "
                             f"{'exceeds' if abs(delta) > 2 * spread else 'within'} 2 std), "
                             f"Welch t = {t:+.2f}, p = {p:.3f}", p))
    if not rows:
        return []
    ps = [p for _, p in rows if p is not None]
    corrected = iter(holm(ps))
    lines = [f"Comparisons (Holm p: Welch's p corrected over these {len(ps)} tests, the family of this study and "
             "dataset; the verdict uses it):" if ps else "Comparisons:", ""]
    for text, p in rows:
        if p is None:
            lines.append(text)
            continue
        q = next(corrected)
        lines.append(f"{text}, Holm p = {q:.3f}: {'significant (p < 0.05)' if q < 0.05 else 'not significant'}")
    return lines


def main(folder):
    runs = load_runs(folder)
    report = ["# Results", "",
              f"Generated by `python plot.py {folder}` from every `metrics.json` below this folder. Mean ± sample std "
              "over seeds. Losses include label smoothing 0.1, as the old project's did. Val loss is the last "
              "epoch's; test numbers are the final model's. Attention focus: the share of the CLS token's "
              "last-layer attention mass (|weights|, mean over heads) on foreground patches of the test set; CIFAR-10 "
              "has no foreground mask, so it has no focus (–). Outliers (the DIFF paper's Table 5): the largest, "
              "10th largest and median |value| over the test set of the attention logits before each softmax "
              "(QKᵀ/√d) and of the residual stream (every block's output). Comparisons: each variant against vit, "
              "and the differential ones (diff, diff2, diffqk) also against balanced: the difference of means and "
              "Welch's t-test, whose p is given raw and Holm–Bonferroni corrected (Holm p) over its family, every "
              "test of one section (one study and dataset); the verdict, significant at 0.05 or not, uses Holm p. "
              "Precision and epochs: under a section's heading where its runs agree on them, else on every row and "
              "legend.", ""]
    written = []
    for study, dataset in sorted(runs, key=lambda k: (k[0] != '.', k)):  # the folder's own runs first
        by_run = runs[study, dataset]
        tags = run_tags(by_run)
        figure = {kind: os.path.normpath(os.path.join(study, f'{dataset}_{kind}.png'))  # relative to folder
                  for kind in ('val_loss', 'val_acc', 'attention')}
        for key, ylabel in (('val_loss', 'validation loss'), ('val_acc', 'validation accuracy')):
            written.append(os.path.join(folder, figure[key]))
            curve_figure(dataset, by_run, tags, key, ylabel, written[-1])
        has_attention = attention_figure(dataset, by_run, tags, os.path.join(folder, figure['attention']))
        if has_attention:
            written.append(os.path.join(folder, figure['attention']))
        report += [f"## {dataset}" + ('' if study == '.' else f" ({study}/)"), ""]
        if not any(tags.values()):  # the runs agree: say it once
            shared_precision, epochs = setup(next(iter(by_run.values()))[0])
            report += [f"{shared_precision}, {epochs} epochs", ""]
        report += dataset_table(dataset, by_run, tags) + [""]
        outliers = outlier_table(by_run, tags)
        if outliers:
            report += ["Outliers:", ""] + outliers + [""]
        comparisons = comparison(by_run, tags)
        if comparisons:
            report += comparisons + [""]
        # the old project's numbers beside the repository's own main study only, never in a user's out/README.md
        if dataset in OLD_TABLE and study == '.' and os.path.realpath(folder) == os.path.realpath(OWN_RESULTS):
            report += ["The old project's published table (single seed, wrong parameter counts):", "",
                       "| model | params (as published) | val loss | test loss | test acc (%) |", "|---|---|---|---|---|"]
            report += [f"| {n} | {p} | {vl:.3f} | {tl:.3f} | {100 * a:.2f} |" for n, p, vl, tl, a in OLD_TABLE[dataset]]
            report.append("")
        report += [f"![{dataset} validation loss]({figure['val_loss']})",
                   f"![{dataset} validation accuracy]({figure['val_acc']})"]
        if has_attention:
            report.append(f"![{dataset} attention maps]({figure['attention']})")
        report.append("")
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
