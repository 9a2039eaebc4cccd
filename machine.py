"""
What a run needs to know about the machine it runs on: the device, precision and compile that 'auto' resolves to, the
CPU's name, how busy the other processes keep the cores, the memory high-water mark, and glibc's handling of freed
buffers. train.py, bench.py and eval.py use them; nothing of the project is imported here.
"""

import math
import os
import time


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
