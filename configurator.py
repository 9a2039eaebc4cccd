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
import os
import sys
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
