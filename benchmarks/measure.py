"""Timing and memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time

import torch


def code_commit() -> str:
    """The commit a measurement is taken with (timings change with the code); "+" when hf_snp/ has edits."""
    def git(*command):
        return subprocess.run(["git", *command], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return (head + ("+" if git("status", "--porcelain", "--", "../hf_snp") else "")) if head else "unknown"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc_mallinfo2():
    """glibc's ``mallinfo2`` (2.33+), or None elsewhere."""
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _glibc_mallinfo2()


class RssPeak:
    """Samples the resident set size in a background thread: ``peak`` (all resident pages),
    ``anon_peak`` (anonymous pages only: without file pages mapped from checkpoints or an
    offload folder, which the kernel can drop and reread) and ``heap_peak`` (the bytes malloc has
    handed out and not had back, glibc only: live buffers, without the freed ones the allocator
    keeps resident)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.anon_peak, self.heap_peak = interval, 0, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def heap_now() -> int:
        """Bytes in use from malloc (heap and mmapped chunks); 0 where glibc's mallinfo2 is missing."""
        if _MALLINFO2 is None:
            return 0
        info = _MALLINFO2()
        return info.uordblks + info.hblkhd

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def anon_now() -> int:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    def __enter__(self):
        self.peak, self.anon_peak, self.heap_peak = self.now(), self.anon_now(), self.heap_now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self.anon_peak = max(self.anon_peak, self.anon_now())
            self.heap_peak = max(self.heap_peak, self.heap_now())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def dense_forward_seconds(model, ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds of one forward pass over ``ids`` in batches (after a warm-up on the first batch: a first pass spends
    seconds on first-touch allocations the later ones do not)."""
    model(ids[:batch_size].to(device), use_cache=False)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        model(ids[i : i + batch_size].to(device), use_cache=False)
    sync(device)
    return time.perf_counter() - start


def first_windows(tokenizer, text: str, num: int, length: int) -> torch.Tensor:
    """The first ``num`` windows of ``length`` tokens of ``text``, as [num, length] ids."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[: num * length].view(num, length)


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def save_line_plot(path: str, series: dict, xlabel: str, ylabel: str, title: str, *,
                   reference: tuple[str, float] | None = None, logx: bool = False, logy: bool = False,
                   size: tuple[float, float] = (6.5, 4.2), legend_size: int = 8) -> None:
    """One line per ``series`` entry ({label: [(x, y), ...]}), an optional horizontal reference line, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if reference is not None:
        ax.axhline(reference[1], color="grey", linestyle="--", label=reference[0])
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def smollm2_protocol(windows: int, seq_len: int):
    """The ablation protocol on the packaged SmolLM2-135M (fp32): (tokenizer, dense model, calibration ids: the first
    ``windows`` x ``seq_len`` tokens of the WikiText-2 validation text, perplexity() arguments for as many tokens of
    the test text, dense perplexity)."""
    from hf_snp.evaluation.perplexity import perplexity
    from hf_snp.setup.calibration import packaged_text
    from hf_snp.setup.loading import demo_model_source, load_model, load_tokenizer

    source = demo_model_source()
    tokenizer = load_tokenizer(source)
    dense = load_model(source, dtype=torch.float32)
    calib = first_windows(tokenizer, packaged_text("wikitext2-local"), windows, seq_len)
    eval_args = dict(dataset="wikitext2-test-local", seq_len=seq_len, max_windows=windows, progress=False)
    return tokenizer, dense, calib, eval_args, perplexity(dense, tokenizer, **eval_args)
