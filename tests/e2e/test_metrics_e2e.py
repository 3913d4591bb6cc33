"""Prometheus metrics against the real daemon."""

from __future__ import annotations

import httpx2 as httpx
import openai

from conftest import samples, value

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def test_daemon_metrics_after_requests(client: openai.OpenAI, http: httpx.Client) -> None:
    """Against the real daemon: after a non-streaming and a streaming chat request the request
    and token counters have grown and the time-to-first-token and decode-speed histograms
    have observations; the model info names the served model."""
    before = http.get("/metrics").text
    client.chat.completions.create(model="m", messages=PARIS, max_tokens=12, temperature=0)
    list(
        client.chat.completions.create(
            model="m", messages=PARIS, max_tokens=12, temperature=0, stream=True
        )
    )
    resp = http.get("/metrics")
    assert resp.status_code == 200
    after = resp.text

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("mlxd_requests_total", route="/v1/chat/completions", status="200") == 2
    assert grew("mlxd_requests_total", route="/metrics", status="200") == 1
    assert grew("mlxd_prompt_tokens_total") > 0
    assert grew("mlxd_completion_tokens_total") > 0
    assert grew("mlxd_time_to_first_token_seconds_count") == 2
    assert grew("mlxd_decode_tokens_per_second_count") == 2
    assert value(after, "mlxd_model_ready") == 1
    assert value(after, "mlxd_model_load_seconds") > 0
    info = [labels for name, labels in samples(after) if name == "mlxd_model_info"]
    assert len(info) == 1 and ("model", "SmolLM2-135M-Instruct") in info[0]
