"""Peak resident-set growth of a call, for the CPU memory tests (each runs its work in a fresh interpreter, which
imports this module): Linux resets the high-water mark to the current RSS on writing 5 to /proc/self/clear_refs;
where that is not allowed, a thread samples the RSS every millisecond (the kernels release the GIL)."""
import resource
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def high_water_mark_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def peak_growth(work) -> tuple[int, float, object]:
    """(peak RSS during work() minus RSS before it, seconds, work's result)."""
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(rss_bytes())
            time.sleep(0.001)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        sampler = None
    except OSError:
        sampler = threading.Thread(target=sample)
        sampler.start()
    before = rss_bytes()
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    if sampler is None:
        peak = high_water_mark_bytes()
    else:
        stop.set()
        sampler.join()
        peak = max(samples + [rss_bytes()])
    return peak - before, seconds, result
