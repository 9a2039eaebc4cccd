import ast
import os
import re

import pytest

from conftest import ROOT, run_train, run_train_fast, train_defaults
from configurator import ConfigError, apply_config, configure
from data import DATASETS

DEFAULTS = train_defaults()


def test_override_with_good_values(tmp_path):
    overrides = configure(DEFAULTS, ['--epochs=3', '--dataset=fashionmnist', "--attention='classic'",
                                     '--learning_rate=1e-3', '--dropout=0', '--compile=True'])
    assert overrides == dict(epochs=3, dataset='fashionmnist', attention='classic', learning_rate=1e-3,
                             dropout=0.0, compile=True)
    assert type(overrides['dropout']) is float


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("import math\nepochs = 7\nn_embd = 2 ** 5\n_helper = 1\n")
    assert configure(DEFAULTS, [str(path), '--epochs=2']) == dict(epochs=2, n_embd=32)


def test_config_files_apply_before_flags_whatever_the_order(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("epochs = 7\n")
    assert configure(DEFAULTS, ['--epochs=1', str(path)]) == dict(epochs=1)
    assert configure(DEFAULTS, ['--epochs=1', os.path.join(ROOT, 'config', 'mnist_vit.py')])['epochs'] == 1


def test_home_is_expanded_in_folders():
    overrides = configure(DEFAULTS, ['--data_dir=~/x', '--out_dir=~'])
    assert overrides == dict(data_dir=os.path.expanduser('~/x'), out_dir=os.path.expanduser('~'))
    assert configure(DEFAULTS, ['--run_name=~x'])['run_name'] == '~x'  # not a folder


@pytest.mark.parametrize('arg,message', [
    ('--epoch=3', "unknown config key 'epoch'; did you mean --epochs?"),
    ('--learnig_rate=1e-3', "unknown config key 'learnig_rate'; did you mean --learning_rate?"),
    ('--qk_nrom=True', "unknown config key 'qk_nrom'; did you mean --qk_norm?"),
    ('--zebra=1', "unknown config key 'zebra'; no setting has a similar name (--help lists them)"),
])
def test_unknown_key_suggests_the_nearest_key(arg, message):
    with pytest.raises(ConfigError) as error:
        configure(DEFAULTS, [arg])
    assert str(error.value) == message


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("learnig_rate = 1e-3\n")
    with pytest.raises(ConfigError) as error:
        configure(DEFAULTS, [str(path)])
    assert str(error.value) == f"config file {str(path)!r}: unknown config key 'learnig_rate'; did you mean learning_rate?"


@pytest.mark.parametrize('arg', ['--epochs=3.5', '--epochs=ten', '--compile=1', '--learning_rate=True', '--qk_norm=true',
                                 '--overwrite=1'])
def test_wrong_type_names_key_and_type(arg):
    key = arg[2:].split('=')[0]
    with pytest.raises(ConfigError, match=f"config key '{key}' must be of type"):
        configure(DEFAULTS, [arg])


def test_values_are_never_executed(tmp_path):
    marker = tmp_path / 'executed'
    value = f"__import__('pathlib').Path('{marker}').touch()"
    assert configure(DEFAULTS, [f'--run_name={value}']) == dict(run_name=value)
    assert not marker.exists()


def test_every_config_file_is_valid_and_variants_share_the_recipe():
    for name in ('mnist', 'fashionmnist', 'cifar10', 'cifar10_small'):
        resolved = {v: {**DEFAULTS, **configure(DEFAULTS, [os.path.join(ROOT, 'config', f'{name}_{v}.py')])}
                    for v in ('vit', 'balanced', 'diff')}
        dataset = name.split('_')[0]
        assert resolved['vit']['attention'] == resolved['balanced']['attention'] == 'classic'
        assert resolved['diff']['attention'] == 'diff'
        assert resolved['balanced']['n_head'] == 2 * resolved['vit']['n_head']
        # attn_impl picks a kernel, not a function: cifar10_small_balanced takes the faster one for its 16 narrow heads
        recipe = [{k: v for k, v in c.items() if k not in ('attention', 'n_head', 'attn_impl')} for c in resolved.values()]
        assert recipe[0] == recipe[1] == recipe[2], dataset
        assert recipe[0]['dataset'] == dataset
    assert resolved['diff']['n_head'] // 2 >= 4  # cifar10_small: many differential heads, as the DIFF authors advise


@pytest.mark.parametrize('args,message', [
    (['--epoch=3'], "unknown config key 'epoch'"),
    (['--epochs=3.5'], "config key 'epochs' must be of type int"),
    (['config/nope.py'], "config file 'config/nope.py' not found"),
    (['--learning_rate=0'], 'learning_rate=0.0: must be > 0'),
    (['--epochs=0'], 'epochs=0: must be >= 1'),
    (['--batch_size=0'], 'batch_size=0: must be >= 1'),
    (['--dropout=1.0'], 'dropout=1.0: must be in [0, 1)'),
    (['--n_embd=63'], 'n_embd=63 is not divisible by n_head=2'),
    (['--n_head=3', '--n_embd=48'], 'n_head=3 is odd'),
    (['--patch_size=5'], 'image_size=28 is not divisible by patch_size=5'),
    (['--dataset=svhn'], f"unknown dataset 'svhn'; known: {', '.join(DATASETS)}"),
    (['--attention=linear'], "attention='linear': must be one of classic, diff, diff2"),
    (['--augment=mixup'], "augment='mixup': must be one of none, flip, crop, cropflip, randaugment"),
    (['--device=tpu'], "device='tpu': must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (['--dtype=float8'], "dtype='float8': must be"),
    (['--init_from=best'], "init_from='best': must be 'scratch' or 'resume'"),
    (['--compile=false'], "compile='false': must be True, False or 'auto'"),
    (['--compile=yes'], "compile='yes': must be True, False or 'auto'"),
])
def test_bad_input_is_one_clear_error(args, message, tmp_path):
    proc = run_train_fast('--device=cpu', f'--data_dir={tmp_path}', f'--out_dir={tmp_path}', *args, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr  # one line, no traceback
    assert message in proc.stderr


def test_bad_input_is_one_clear_error_from_a_fresh_interpreter(tmp_path):
    """As above, but from `python train.py` itself rather than a fork of a process that has imported torch: nothing
    that a fresh start prints (an import's warning, say) reaches stderr, and the exit code is the interpreter's."""
    proc = run_train('--device=cpu', f'--data_dir={tmp_path}', f'--out_dir={tmp_path}', '--dtype=float8', check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr  # one line, no traceback
    assert "dtype='float8': must be" in proc.stderr


def test_train_defaults_are_the_mnist_diff_config():
    """train.py with no config file trains config/mnist_diff.py, as its header says."""
    assert configure(DEFAULTS, [os.path.join(ROOT, 'config', 'mnist_diff.py')]) == {}  # it changes nothing


def help_output(argv, capsys):
    scope = {'__file__': os.path.join(ROOT, 'train.py'), **DEFAULTS}
    with pytest.raises(SystemExit) as stop:
        apply_config(scope, argv=argv)
    assert stop.value.code == 0
    return {line.split('=')[0].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith('  --')}


def test_help_after_config_files_shows_their_values(capsys):
    small, diff = (os.path.join(ROOT, 'config', f'{name}.py') for name in ('cifar10_small_vit', 'mnist_diff'))
    lines = help_output([small, '--help', '--epochs=2'], capsys)
    assert lines['--learning_rate'].startswith('  --learning_rate=0.002 ') and f'[{small}]' in lines['--learning_rate']
    assert lines['--epochs'].startswith('  --epochs=2 ') and '[command line]' in lines['--epochs']
    assert lines['--seed'].split() == ['--seed=0']  # a default, unmarked
    assert f'[{small}]' in lines['--label_smoothing']  # set by the file, to the value it already had
    # config/mnist_diff.py sets the defaults' values: still marked as its own
    assert f'[{diff}]' in help_output(['-h', diff], capsys)['--n_head']
    plain = help_output(['--help'], capsys)  # no config file: the defaults as the script writes them
    assert plain['--learning_rate'].split() == ['--learning_rate=1e-3'] and '[' not in plain['--epochs']


@pytest.mark.parametrize('argv,message', [
    (['--epochs', '1'], "write --epochs=1 "),
    (['config/mnist_vit.py', '--seed', '3', '--epochs=2'], "write --seed=3 "),
    (['--epochs'], "write --epochs=VALUE"),
    (['--epochs', '--seed=1'], "write --epochs=VALUE"),
])
def test_key_without_equals_says_what_to_write(argv, message):
    argv = [os.path.join(ROOT, arg) if arg.startswith('config/') else arg for arg in argv]
    with pytest.raises(ConfigError) as error:
        configure(DEFAULTS, argv)
    assert message in str(error.value) and 'not found' not in str(error.value)


@pytest.mark.parametrize('arg', ['--qk_norm=true', '--qk_norm=false', '--overwrite=TRUE', '--overwrite=yes',
                                 '--overwrite=1', '--qk_norm=0', '--compile=1'])
def test_boolean_words_suggest_python_literals(arg):
    with pytest.raises(ConfigError, match=r"must be of type .*; write True or False \(Python literals\)"):
        configure(DEFAULTS, [arg])


@pytest.mark.parametrize('arg', ['--epochs=ten', '--learning_rate=True', '--run_name=1', '--epochs=1.0'])
def test_no_boolean_hint_for_other_keys(arg):
    with pytest.raises(ConfigError) as error:
        configure(DEFAULTS, [arg])
    assert 'True or False' not in str(error.value)


@pytest.mark.parametrize('text,key', [("learnig_rate = 1e-3\n", 'learnig_rate'), ("epochs = 2.5\n", 'epochs'),
                                      ("qk_norm = 'true'\n", 'qk_norm')])
def test_config_file_errors_name_the_file_and_key(tmp_path, text, key):
    path = tmp_path / 'c.py'
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        configure(DEFAULTS, [os.path.join(ROOT, 'config', 'mnist_vit.py'), str(path), '--epochs=1'])
    assert f"config file {str(path)!r}" in str(error.value) and f"{key!r}" in str(error.value)
    assert 'mnist_vit' not in str(error.value)


def test_tests_start_python_as_sys_executable():
    """A bare python in a test (a command's first word, or PYTHON= for gpu.sh) finds whatever Python is on PATH, not
    the one that runs pytest (venv/bin/python -m pytest tests, venv not activated): subprocesses use sys.executable."""
    def bare_python(node):
        return isinstance(node, ast.Constant) and re.match(r'python[\d.]*( |$)', str(node.value))
    tests = os.path.join(ROOT, 'tests')
    for name in sorted(os.listdir(tests)):
        if name.endswith('.py'):
            with open(os.path.join(tests, name)) as f:
                tree = ast.parse(f.read())
            bare = [node.lineno for node in ast.walk(tree)
                    if isinstance(node, ast.keyword) and node.arg == 'PYTHON' and bare_python(node.value)
                    or isinstance(node, (ast.List, ast.Tuple)) and node.elts and bare_python(node.elts[0])]
            assert not bare, f"tests/{name}, lines {bare}: use sys.executable"
