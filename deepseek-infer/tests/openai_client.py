"""The official `openai` Python client against `deepseek serve` (run by the ignored test
`the_openai_python_client_talks_to_the_server` in serve.rs, which starts the server).

Checks chat and completions, streamed and not, that streamed text equals the non-streamed text,
usage counts, finish reasons, stop strings, `n`, token-id prompts, model listing, and that errors
arrive as the client's typed exceptions with the right status.
"""
import argparse

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    model = args.model

    assert [m.id for m in client.models.list()] == [model]

    messages = [{"role": "user", "content": "Hello! What is 2 + 3?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    reply = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    pieces = []
    finish = None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reply, ("".join(pieces), reply)
    assert finish == chat.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
    assert len(pieces) > 2

    prompt = "The quick brown fox"
    done = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
    text = done.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == text, (streamed, text)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 20

    # A stop string taken from the text: the reply ends just before it.
    if len(text) > 4:
        stop = text[3:5]
        cut = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[: text.index(stop)], (cut.choices[0].text, text, stop)
        assert cut.choices[0].finish_reason == "stop"

    ids = client.completions.create(model=model, prompt=[84, 104, 101], max_tokens=5, temperature=0)
    assert ids.usage.prompt_tokens == 3
    several = client.completions.create(model=model, prompt=prompt, max_tokens=8, n=2, seed=3, temperature=1.0)
    assert [c.index for c in several.choices] == [0, 1]

    for call, status in [
        (lambda: client.completions.create(model="nope", prompt="x", max_tokens=2), 404),
        (lambda: client.completions.create(model=model, prompt="x", max_tokens=2, temperature=-1), 400),
        (lambda: client.completions.create(model=model, prompt="x", max_tokens=10**6), 400),
    ]:
        try:
            call()
        except openai.APIStatusError as e:
            assert e.status_code == status, (e.status_code, status)
            assert e.body and "message" in e.body, e.body
        else:
            raise AssertionError(f"expected {status}")
    print(f"openai {openai.__version__}: all checks passed")


if __name__ == "__main__":
    main()
