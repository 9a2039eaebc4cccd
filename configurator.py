"""
Overrides a script's default globals, as nanoGPT does:
    python train.py config/mnist_vit.py --epochs=3 --seed=1
Each positional argument is a config file: trusted Python that is exec'd and may set any of the globals.
Each --key=value sets one global; the value is parsed as a Python literal (never executed) and must have
the type of the default. Config files apply first, in their order, then the flags, wherever they stand.
Unknown keys and wrong types are errors that name the key (and the config file that sets it) and, for an
unknown key, the nearest valid one; `--key value` with a space, and true/false for a boolean, are errors that say
what to write. A leading ~ in a *_dir value is expanded. --help or -h prints every setting with its value and
comment, grouped as in the script: the default, or the value the config files and flags before or after it set,
marked with where it comes from.
"""

import ast
import difflib
import math
import os
import sys
import time
import types
from ast import literal_eval


class ConfigError(ValueError):
    pass


BOOLEAN_WORDS = ('true', 'false', 'yes', 'no', 'on', 'off', 't', 'f', 'y', 'n', '1', '0')


def check(key, value, defaults, flag=True):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = (f"did you mean {'--' if flag else ''}{close[0]}?" if close
                else "no setting has a similar name (--help lists them)")
        raise ConfigError(f"unknown config key {key!r}; {hint}")
    default = defaults[key]
    # 'auto' defaults also take a bool (compile=True/False); an int is fine where a float is expected
    ok = (type(value) is type(default) or (default == 'auto' and isinstance(value, bool))
          or (type(default) is float and type(value) is int))
    if not ok:
        hint = ''
        if (type(default) is bool or default == 'auto') and str(value).lower() in BOOLEAN_WORDS:
            hint = "; write True or False (Python literals)"
        raise ConfigError(f"config key {key!r} must be of type {type(default).__name__} (default {default!r}), "
                          f"got {value!r} ({type(value).__name__}){hint}")
    return float(value) if type(default) is float else value


def configure(defaults, argv, sources=None):
    """Returns the overrides that the config files and --key=value arguments in argv make to defaults. A dict given
    as sources receives, for each key that a config file assigns or a flag sets, the file's path or 'command line'."""
    # before the config files run, or `--epochs 1` would fail as "config file '1' not found"
    for arg, following in zip(argv, argv[1:] + [None]):
        if arg.startswith('--') and '=' not in arg:
            if following is not None and not following.startswith('--') and not os.path.isfile(following):
                raise ConfigError(f"argument {arg!r} has no value: write {arg}={following} (with =, not a space)")
            raise ConfigError(f"argument {arg!r} has no value: write {arg}=VALUE")
    overrides, sources = {}, {} if sources is None else sources
    config_files_first = sorted(argv, key=lambda arg: arg.startswith('--'))  # a stable sort keeps each group's order
    for arg in config_files_first:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (config files live in config/)")
            before = {**defaults, **overrides}
            scope = dict(before)
            with open(arg) as f:
                source = f.read()
            exec(source, scope)
            # --help marks every key the file assigns, also those it sets to the value they already have
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id in defaults:
                    sources[node.id] = arg
            for key, value in scope.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue
                if key not in before or value != before[key]:
                    try:
                        overrides[key] = check(key, value, defaults, flag=False)
                    except ConfigError as e:
                        raise ConfigError(f"config file {arg!r}: {e}") from None
        else:
            key, _, text = arg[2:].partition('=')
            try:
                value = literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word such as --dataset=mnist is a string
            overrides[key] = check(key, value, defaults)
            sources[key] = 'command line'
    for key, value in overrides.items():
        if key.endswith('_dir'):
            overrides[key] = os.path.expanduser(value)
    return overrides


def config_block(script):
    """The config section of a script's source: (line, assigned name or None, its ast node or None) for each line
    from the first `# ---` rule up to the line that starts with `config_keys`."""
    with open(script) as f:
        source = f.read()
    assigned = {node.lineno: node for node in ast.parse(source).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    lines, block = source.splitlines(), []
    start = next(i for i, line in enumerate(lines) if line.startswith('# ---'))
    for number, line in enumerate(lines[start + 1:], start=start + 2):
        if line.startswith('config_keys'):
            break
        node = assigned.get(number)
        block.append((line, node.targets[0].id if node else None, node))
    return block


def read_defaults(script):
    """A script's default config globals, read from its source without running it."""
    return {name: literal_eval(node.value) for _, name, node in config_block(script) if name}


def help_text(scripts, overrides=None, sources=None):
    """Every setting of the scripts with its value and comment, under the scripts' own section comments: the value
    in overrides, else the default; a key in sources is marked with where it is set (as configure() fills them)."""
    overrides, sources = overrides or {}, sources or {}
    out = [f"usage: python {os.path.basename(scripts[-1])} [config/<file>.py ...] [--key=value ...]", "",
           "Config files apply first, then --key=value flags (Python literals of the default's type).", ""]
    if sources:
        out[-1:] = ["Values set by a config file or a flag are marked [where from]; the others are defaults.", ""]
    for script in scripts:
        for line, name, node in config_block(script):
            if name:
                comment = line[node.end_col_offset:].strip().lstrip('#').strip()
                value = line[node.value.col_offset:node.value.end_col_offset]
                if name in overrides:
                    value = repr(overrides[name])
                if name in sources:
                    comment = f"[{sources[name]}] {comment}"
                out.append((f"  --{name}={value}".ljust(32) + f"  {comment}").rstrip())
            elif line.startswith('# ') and not line.startswith('# ---'):
                out.append(line[2:] + ':')
    return '\n'.join(out)


def resolve_auto(device, dtype, compile):
    """The 'auto' system settings made concrete: CUDA when present; bfloat16 where the hardware computes in it
    (float16 on older GPUs, float32 on CPUs without AVX512-BF16 or AMX, where bfloat16 is emulated and slow);
    torch.compile on CUDA only. Returns (device, device_type, dtype, use_compile)."""
    import torch
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if dtype == 'auto' and device_type == 'cuda':
        dtype = 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    elif dtype == 'auto':
        dtype = 'bfloat16' if native_cpu_bfloat16() else 'float32'
    use_compile = device_type == 'cuda' if compile == 'auto' else compile
    return device, device_type, dtype, use_compile


def native_cpu_bfloat16():
    """Whether this CPU computes in bfloat16 (AVX512-BF16 or AMX); elsewhere PyTorch emulates it, about 10x slower."""
    import torch
    return any(getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))


def cpu_name():
    """The CPU's model and the vector instructions PyTorch uses on it, e.g. 'AMD EPYC (AVX2)': what a CPU run's
    timings depend on."""
    import platform
    import torch
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    except OSError:
        model = ''
    native = ', native bfloat16' if native_cpu_bfloat16() else ''
    return f"{model or platform.processor() or 'unknown CPU'} ({torch.backends.cpu.get_cpu_capability()}{native})"


def cpu_reading():
    """(now, CPU seconds used by every process on the machine, CPU seconds used by this one) from time.time(),
    /proc/stat and os.times(); None where there is no /proc/stat. Two readings tell how busy the others were."""
    try:
        with open('/proc/stat') as f:
            user, nice, system, idle, iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    own = os.times()
    return time.time(), (user + nice + system + irq + softirq) / os.sysconf('SC_CLK_TCK'), own.user + own.system


def free_cores(before, after):
    """The cores that other processes left free between two cpu_reading()s (at least one): a process that kept a
    quarter of a core busy or more holds that core."""
    busy_elsewhere = (after[1] - before[1] - (after[2] - before[2])) / max(after[0] - before[0], 1e-9)
    return max(1, len(os.sched_getaffinity(0)) - max(0, math.ceil(busy_elsewhere - 0.25)))


def keep_freed_memory():
    """Keeps the buffers a training step frees for the next one: glibc hands them back to the OS and faults them in
    again each step, which costs a CPU run about 10% with the same numbers (results/NOTES.md, 2026-12-02, fourth
    session). Same as MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=268435456;
    a MALLOC_* variable set in the environment wins. Does nothing without glibc."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    for option, name, value in ((-3, 'MALLOC_MMAP_THRESHOLD_', 32 * 2 ** 20),  # M_MMAP_THRESHOLD: mmap only above it
                                (-1, 'MALLOC_TRIM_THRESHOLD_', 2 ** 31 - 1),  # M_TRIM_THRESHOLD: no trimming
                                (-2, 'MALLOC_TOP_PAD_', 256 * 2 ** 20)):  # M_TOP_PAD: grow the heap in large steps
        if name not in os.environ:
            mallopt(option, value)


def peak_memory_mb(device):
    """High-water mark of memory so far: allocated CUDA memory on a GPU, the process's resident set on the CPU."""
    import resource
    import torch
    if str(device).startswith('cuda'):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def apply_config(scope, help_scripts=None, argv=None):
    """Applies configure() to a script's globals(); exits with one line on bad input. --help / -h prints the
    settings of help_scripts (default: the script itself), as the other arguments set them, and exits."""
    argv = sys.argv[1:] if argv is None else argv
    wants_help = '--help' in argv or '-h' in argv
    argv = [arg for arg in argv if arg not in ('--help', '-h')]
    defaults = {k: v for k, v in scope.items()
                if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
    sources = {}
    try:
        overrides = configure(defaults, argv, sources)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if wants_help:
        print(help_text(help_scripts or [scope['__file__']], overrides, sources))
        sys.exit(0)
    scope.update(overrides)
    return overrides
