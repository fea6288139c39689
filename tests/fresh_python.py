"""Reload saved models in a fresh Python process, one process shared by many tests.

Starting a Python that imports torch and transformers costs seconds; the save/reload tests used
to pay that once per reload. Here one child process per setup (``block``: hf_snp made
unimportable, or imported first) is started on first use and serves every reload of the
session: the test sends a job, the child loads the directory with a fresh Auto class call,
runs the saved inputs and writes the logits. The child never sees the test process's state,
and it drops every ``transformers_modules`` module before each job, so each checkpoint's code
file is imported afresh from that checkpoint.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

MARK = "@@reloaded@@ "

WORKER = r"""
import json, sys, traceback
{block}
import torch
import transformers

for line in sys.stdin:
    job = json.loads(line)
    try:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]
        auto = getattr(transformers, job["auto"])
        model = auto.from_pretrained(job["path"], **eval("dict(" + job["kwargs"] + ")")).eval()
        inputs = torch.load(job["inputs"])
        with torch.no_grad():
            torch.save(model(**{{job["input_name"]: inputs}}).logits, job["out"])
        reply = {{"class": type(model).__name__, "module": type(model).__module__,
                 "hf_snp_loaded": sys.modules.get("hf_snp") is not None}}
        if job.get("generate"):  # greedy tokens: {{"prompt": [[ids]], "new": n}}
            with torch.no_grad():
                tokens = model.generate(torch.tensor(job["generate"]["prompt"]), do_sample=False,
                                        max_new_tokens=job["generate"]["new"], min_new_tokens=job["generate"]["new"])
            reply["tokens"] = tokens.tolist()
    except Exception:
        reply = {{"error": traceback.format_exc()}}
    print({mark!r} + json.dumps(reply), flush=True)
"""


class FreshPython:
    """One child interpreter started with ``block`` (e.g. ``sys.modules['hf_snp'] = None``) as its first line."""

    def __init__(self, block: str):
        self.block = block
        self.scratch = tempfile.mkdtemp(prefix="hf_snp_fresh_")
        self.stderr = open(os.path.join(self.scratch, "stderr.txt"), "w+", encoding="utf-8")
        env = {**os.environ, "HF_MODULES_CACHE": os.path.join(self.scratch, "modules")}
        code = WORKER.format(block=block, mark=MARK)
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, env=env)

    def reload(self, path, inputs_file: str, out_file: str, kwargs: str = "", auto: str = "AutoModelForCausalLM",
               input_name: str = "input_ids", generate: dict | None = None) -> dict:
        """Load ``path`` in the child, save its logits on the tensor in ``inputs_file`` to ``out_file``;
        returns the loaded class's name and module and whether hf_snp was imported there (with ``generate``,
        ``{"prompt": [[ids]], "new": n}``, also ``tokens``: n greedy tokens after the prompt)."""
        job = {"path": str(path), "inputs": inputs_file, "out": out_file, "kwargs": kwargs, "auto": auto,
               "input_name": input_name, "generate": generate}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(MARK):
                reply = json.loads(line[len(MARK):])
                if "error" in reply:
                    raise AssertionError(f"reload in the fresh process ({self.block!r}) failed:\n"
                                         f"{reply['error'][-4000:]}")
                return reply
        self.stderr.seek(0)
        raise AssertionError(f"the fresh process ({self.block!r}) died:\n{self.stderr.read()[-4000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.stderr.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


_WORKERS: dict[str, FreshPython] = {}


def fresh_python(block: str) -> FreshPython:
    """The session's child process for ``block`` (started on first use, closed at exit)."""
    worker = _WORKERS.get(block)
    if worker is None or worker.process.poll() is not None:
        worker = _WORKERS[block] = FreshPython(block)
    return worker


@atexit.register
def _close_all() -> None:
    for worker in _WORKERS.values():
        worker.close()
