"""Scale-out: the OpenAI server as a Ray Serve application with 2 replicas on a local Ray cluster (CPU),
answering the openai client through Ray Serve's HTTP proxy. Each replica loads its own engine (a tiny
random-weight model saved to a directory)."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import ray
from ray import serve

from tests.conftest import build_tiny_engine

DEPLOY_TIMEOUT_S = 240
QUESTION = [{"role": "user", "content": "Tell me a story."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    engine = build_tiny_engine("llama", tokenizer)
    engine.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ray_url(tiny_model_dir):
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as error:  # pragma: no cover - only where Ray itself cannot start
        pytest.skip(f"Ray cannot start on this machine: {type(error).__name__}: {error}")
    from hogwild_agents.server.ray_app import APP_NAME, build_app

    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            {
                "model": tiny_model_dir,
                "replicas": 2,
                "num_gpus": 0,
                "model_name": "tiny",
                "protocol": "none",
                "max_tokens": "8",  # as `serve run ... max_tokens=8` passes it
                "temperature": 0.0,
            }
        )
        deployed = threading.Thread(target=serve.run, args=(app,), kwargs={"name": APP_NAME}, daemon=True)
        deployed.start()
        deployed.join(DEPLOY_TIMEOUT_S)
        assert not deployed.is_alive(), f"the 2 replicas did not start within {DEPLOY_TIMEOUT_S} s"
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_the_openai_client(ray_url) -> None:
    status = serve.status().applications["hogwild"].deployments["HogwildServer"]
    assert status.replica_states.get("RUNNING") == 2
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == ["tiny"]

    reply = client.chat.completions.create(model="tiny", messages=QUESTION)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 16  # 2 workers x 8

    started = time.monotonic()
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content  # greedy: any replica gives the same answer
    assert chunks[-1].choices[0].finish_reason == "length"
    assert time.monotonic() - started < 120

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=QUESTION, n=2)
    assert refused.value.body["param"] == "n"
