"""Session risk through the real gateway: every scanner's findings accumulate per session until the
session is refused, and an admin clears it (API and permissions)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from conftest import ADMIN_KEY, USER_KEY, GatewayServer, wait_for
from mocks.openai_upstream import OpenAIUpstream, Reply, completion, text_stream
from plinth.cli import app


def watched(config: dict[str, Any], kill_switch: Path, **risk: Any) -> dict[str, Any]:
    """A profile whose kill-switch rule only flags (each turn passes), with session risk blocking."""
    kill_switch.write_text("rules:\n  - id: falcon\n    words: [project falcon]\n")
    return {
        **config,
        "guardrails": {
            "default_profile": "watch",
            "profiles": {
                "watch": {
                    "extends": "standard",
                    "input": {
                        "scanners": [
                            "secrets",
                            {"name": "kill_switch", "options": {"path": str(kill_switch)}},
                            {"name": "session_risk", "options": risk},
                        ],
                        "actions": {"kill_switch.*": "flag", "session_risk.*": "block"},
                    },
                }
            },
        },
    }


async def ask(server: GatewayServer, session: str, text: str) -> str:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0)
    answer = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": text}],
        extra_headers={"x-plinth-session-id": session},
    )
    await asyncio.to_thread(flush, server)
    return answer.choices[0].message.content or ""


def flush(server: GatewayServer) -> None:
    """Wait for the background scorer (it is off the hot path by design)."""
    scorers = server.app.state.guardrails.session_scorers()
    assert scorers
    for scorer in scorers:
        assert scorer.flush()


def api(server: GatewayServer, token: str, method: str, path: str) -> httpx.Response:
    return httpx.request(method, server.url + "/api" + path, headers={"authorization": f"Bearer {token}"})


async def test_findings_of_every_scanner_block_the_session_until_an_admin_clears_it(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    # A kill-switch finding adds 1.0 (decaying slowly): two flagged turns reach 1.9 and block the session.
    server = gateway_factory(watched(basic_config, tmp_path / "ks.yaml", threshold=1.9, user_threshold=0))
    session, other = f"s-{uuid.uuid4().hex}", f"s-{uuid.uuid4().hex}"
    assert await ask(server, session, "What is project falcon?")  # flagged, allowed
    assert await ask(server, session, "Who runs Project  Falcon these days?")  # flagged, allowed

    weather = "Thanks, what is the weather like?"
    with pytest.raises(openai.BadRequestError) as caught:  # harmless, but the session is blocked
        await ask(server, session, weather)
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "guardrail_blocked"
    assert "session_risk.session_blocked" in body["message"] and "session risk" in body["message"]
    assert len(openai_upstream.requests) == 2  # the refused turn never went upstream

    # Another session of the same key is not affected.
    assert await ask(server, other, weather) == f"echo: {weather}"

    # Admins see the block; auditors see it but may not clear it.
    listed = api(server, ADMIN_KEY, "GET", "/guardrails/sessions/blocked")
    assert listed.status_code == 200
    [block] = [b for b in listed.json()["data"] if b["key"] == session]
    assert block["scope"] == "session" and block["score"] >= 1.9 and block["remaining_s"] > 0
    created = api_json(
        server, "POST", "/users", {"email": f"a-{uuid.uuid4().hex[:8]}@x.test", "role": "auditor"}
    )
    auditor = created["token"]
    assert api(server, auditor, "GET", "/guardrails/sessions/blocked").status_code == 200
    refused = api(server, auditor, "POST", f"/guardrails/sessions/{session}/clear")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_permissions"
    with pytest.raises(openai.BadRequestError):
        await ask(server, session, "Still blocked?")

    cleared = api(server, ADMIN_KEY, "POST", f"/guardrails/sessions/{session}/clear")
    assert cleared.status_code == 200 and cleared.json() == {
        "scope": "session",
        "key": session,
        "cleared": True,
    }
    assert await ask(server, session, "Hello again") == "echo: Hello again"
    gone = api(server, ADMIN_KEY, "GET", "/guardrails/sessions/blocked").json()["data"]
    assert session not in {b["key"] for b in gone}

    # Both the refused and the done clear are in the audit trail.
    def audited() -> set[tuple[str, str | None, str]]:
        records = api(server, ADMIN_KEY, "GET", "/audit/records?kind=admin&limit=5000").json()["data"]
        return {(r["action"], r["target"], r["outcome"]) for r in records}

    await wait_for(
        lambda: {("clear_session", session, "ok"), ("clear_session", session, "refused")} <= audited()
    )
    # Nothing left to clear: a 404 naming it, not a silent success.
    again = api(server, ADMIN_KEY, "POST", f"/guardrails/sessions/{session}/clear")
    assert again.status_code == 404 and session in again.json()["error"]["message"]


async def test_a_user_block_spans_sessions_and_is_cleared_by_user(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    # Own settings (half_life_s) so this test gets its own scorer; sessions never block here.
    config = watched(basic_config, tmp_path / "ks.yaml", threshold=100, user_threshold=1.9, half_life_s=601)
    server = gateway_factory(config)
    for _ in range(2):  # two sessions, one flagged turn each
        await ask(server, f"s-{uuid.uuid4().hex}", "Tell me about project falcon")
    with pytest.raises(openai.BadRequestError) as caught:
        await ask(server, f"s-{uuid.uuid4().hex}", "A brand new session")
    assert "session_risk.user_blocked" in caught.value.body["message"]  # type: ignore[index]

    # The CLI: `plinth guardrails sessions` lists the block, `clear --user` lifts it.
    user = "team-a"  # keys from plinth.yaml are known by name
    env: dict[str, str | None] = {
        "PLINTH_URL": server.url,
        "PLINTH_ADMIN_KEY": ADMIN_KEY,
        "PLINTH_TOKEN": None,
    }
    runner = CliRunner()
    listed = await asyncio.to_thread(runner.invoke, app, ["guardrails", "sessions", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert {"scope": "user", "key": user} in [
        {"scope": b["scope"], "key": b["key"]} for b in json.loads(listed.stdout)
    ]
    both = await asyncio.to_thread(
        runner.invoke, app, ["guardrails", "clear", "--user", user, "--session", "x"], env=env
    )
    assert both.exit_code == 2 and "exactly one" in both.output
    cleared = await asyncio.to_thread(runner.invoke, app, ["guardrails", "clear", "--user", user], env=env)
    assert cleared.exit_code == 0, cleared.output
    assert await ask(server, f"s-{uuid.uuid4().hex}", "hi") == "echo: hi"
    again = await asyncio.to_thread(runner.invoke, app, ["guardrails", "clear", "--user", user], env=env)
    assert again.exit_code == 1 and "No session-risk block" in again.output


def api_json(server: GatewayServer, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.request(
        method, server.url + "/api" + path, json=body, headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code < 300, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_leaks_in_answers_whole_and_streamed_count_towards_session_risk(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    canary = "marmot-5521-tundra"
    config = {
        **basic_config,
        "guardrails": {
            "default_profile": "watch",
            "canaries": [canary],
            "profiles": {  # session risk declared on input only: it still hears of output findings
                "watch": {
                    "extends": "standard",
                    "input": {
                        "scanners": ["secrets", {"name": "session_risk", "options": {"half_life_s": 602}}],
                        "actions": {"session_risk.*": "block"},
                    },
                }
            },
        },
    }
    server = gateway_factory(config)
    session = f"s-{uuid.uuid4().hex}"
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0)
    headers = {"x-plinth-session-id": session}
    messages: Any = [{"role": "user", "content": "When is my invoice due?"}]

    openai_upstream.queue(Reply(body=completion(f"It is {canary}.")))  # CANARY_LEAK: 1.5
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, extra_headers=headers
    )
    assert answer.choices[0].finish_reason == "content_filter"
    await asyncio.to_thread(flush, server)
    openai_upstream.queue(Reply(stream=text_stream("Again: ", canary[:8], canary[8:], " bye")))  # 1.5 more
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, extra_headers=headers, stream=True
    )
    assert "leak.canary" in "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await asyncio.to_thread(flush, server)

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages, extra_headers=headers)
    assert "session_risk.session_blocked" in caught.value.body["message"]  # type: ignore[index]
    assert api(server, ADMIN_KEY, "POST", f"/guardrails/sessions/{session}/clear").status_code == 200
