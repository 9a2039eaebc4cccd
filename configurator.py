"""
Overrides a script's default globals, as nanoGPT does:
    python train.py config/mnist_vit.py --epochs=3 --seed=1
Each positional argument is a config file: trusted Python that is exec'd and may set any of the globals.
Each --key=value sets one global; the value is parsed as a Python literal (never executed) and must have
the type of the default. Unknown keys and wrong types are errors that name the key.
"""

import ast
import os
import sys
import types
from ast import literal_eval


class ConfigError(ValueError):
    pass


def check(key, value, defaults):
    if key not in defaults:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(defaults))}")
    default = defaults[key]
    # 'auto' defaults also take a bool (compile=True/False); an int is fine where a float is expected
    ok = (type(value) is type(default) or (default == 'auto' and isinstance(value, bool))
          or (type(default) is float and type(value) is int))
    if not ok:
        raise ConfigError(f"config key {key!r} must be of type {type(default).__name__} (default {default!r}), "
                          f"got {value!r} ({type(value).__name__})")
    return float(value) if type(default) is float else value


def configure(defaults, argv):
    """Returns the overrides that the config files and --key=value arguments in argv make to defaults."""
    overrides = {}
    for arg in argv:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (config files live in config/)")
            before = {**defaults, **overrides}
            scope = dict(before)
            with open(arg) as f:
                exec(f.read(), scope)
            for key, value in scope.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue
                if key not in before or value != before[key]:
                    overrides[key] = check(key, value, defaults)
        else:
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise ConfigError(f"argument {arg!r} must look like --key=value")
            try:
                value = literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word such as --dataset=mnist is a string
            overrides[key] = check(key, value, defaults)
    return overrides


def read_defaults(script):
    """A script's default config globals, read from its source without running it: the constant assignments
    at module level above the line that starts with `config_keys`."""
    with open(script) as f:
        tree = ast.parse(f.read())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == 'config_keys':
                break
            defaults[node.targets[0].id] = literal_eval(node.value)
    return defaults


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
        native = [getattr(torch.cpu, f, lambda: False)() for f in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
        dtype = 'bfloat16' if any(native) else 'float32'
    use_compile = device_type == 'cuda' if compile == 'auto' else compile
    return device, device_type, dtype, use_compile


def peak_memory_mb(device):
    """High-water mark of memory so far: allocated CUDA memory on a GPU, the process's resident set on the CPU."""
    import resource
    import torch
    if str(device).startswith('cuda'):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def apply_config(scope, argv=None):
    """Applies configure() to a script's globals(); prints what changed. Exits with one line on bad input."""
    defaults = {k: v for k, v in scope.items()
                if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
    try:
        overrides = configure(defaults, sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    scope.update(overrides)
    return overrides
