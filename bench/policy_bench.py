"""Policy evaluation latency with 200 Cedar rules: `Governance.decide` as the gateway calls it.

    .venv/bin/python bench/policy_bench.py [--rules 200] [--iterations 20000]

The policy set mixes what an organization writes: team- and key-scoped permits, model- and
provider-scoped rules, and global forbids with conditions (residency, entity types, environment,
labels). 20 models with 3 deployments each over 4 providers; requests from 500 keys in 50 teams
with random classification, region and detected entity types. Prints p50/p99 of:

- decide, first pass: the first 3,000 requests, policy subsets compiled as combinations appear;
- decide, uncached: the decision memo cleared before every call (a combination never seen before),
  keys already known to the worker — the cost of one real evaluation of every deployment of a model;
- decide, new key object: also rebuilds that key's Cedar entities (first request after a key change);
- decide, memoised: the same request again (the common case in steady traffic);
- plain Cedar: one PolicySet of all rules, one `is_authorized` per deployment (no scope index), for
  comparison.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cedarpy

from plinth.config import parse_config
from plinth.governance.config import Level
from plinth.governance.engine import Governance
from plinth.tenancy.keys import Principal

MODELS = 20
DEPLOYMENTS = 3
PROVIDERS = ["openai", "azure-eu", "anthropic", "bedrock-eu"]
REGIONS = {
    "openai": "us-east-1",
    "azure-eu": "eu-west-1",
    "anthropic": "us-east-1",
    "bedrock-eu": "eu-central-1",
}
TEAMS = 50
KEYS = 500
ENTITY_TYPES = ["EMAIL", "PHONE", "IBAN", "CREDIT_CARD", "PERSON", "ADDRESS"]


def rules(n: int, rng: random.Random) -> str:
    """`n` policies in a realistic mix of scopes (see the module docstring)."""
    out = ['@id("base") permit (principal, action in [Plinth::Action::"invoke", Plinth::Action::"embed"], resource)'
           ' when { principal.environment != "sandbox" };']  # fmt: skip
    conditions = [
        'context.caller_region like "eu-*" && context.data_class_rank >= 2 && !resource.regions.contains("eu-west-1")',
        'context.entity_types.contains("CREDIT_CARD") && !resource.provider.certifications.contains("pci-dss")',
        'principal.environment == "prod" && resource.model_status == "deprecated"',
        'principal.labels.contains("intern") && context.data_class_rank > 0',
        "context.data_class_rank > principal.data_class_rank + 1",
        'context.entity_types.containsAny(["IBAN", "PASSPORT"]) && context.caller_region like "us-*"',
        "resource.provider.retention_days > 30 && context.data_class_rank >= 2",
        '!resource.provider.training_opt_out && principal.labels.contains("customer-data")',
    ]
    i = 0
    while len(out) < n:
        i += 1
        kind = len(out) % 5
        team = f"team_{rng.randrange(TEAMS)}"
        model = f"model-{rng.randrange(MODELS)}"
        cond = rng.choice(conditions)
        if kind == 0:
            out.append(f'@id("team-{i}") permit (principal in Plinth::Team::"{team}", '
                       f'action == Plinth::Action::"invoke", resource in Plinth::Model::"{model}");')  # fmt: skip
        elif kind == 1:
            out.append(f'@id("model-{i}") forbid (principal, action, resource in Plinth::Model::"{model}") '
                       f"when {{ {cond} }};")  # fmt: skip
        elif kind == 2:
            provider = rng.choice(PROVIDERS)
            out.append(f'@id("provider-{i}") forbid (principal, action, resource in Plinth::Provider::"{provider}") '
                       f'when {{ {cond} && principal.team == "{team}" }};')  # fmt: skip
        elif kind == 3:
            out.append(f'@id("global-{i}") forbid (principal, action, resource is Plinth::Deployment) '
                       f'when {{ {cond} && context.model == "{model}" }};')  # fmt: skip
        else:
            out.append(f'@id("key-{i}") forbid (principal == Plinth::Key::"key_{rng.randrange(KEYS)}", action, '
                       f"resource is Plinth::Deployment) when {{ {cond} }};")  # fmt: skip
    return "\n".join(out[:n])


def build(policies: Path) -> tuple[Governance, dict[str, list[str]]]:
    models = []
    catalog = []
    names: dict[str, list[str]] = {}
    for m in range(MODELS):
        deps = []
        entries = []
        for d in range(DEPLOYMENTS):
            provider = PROVIDERS[(m + d) % len(PROVIDERS)]
            name = f"model-{m}-{provider}-{d}"
            deps.append(
                {"name": name, "provider": "openai", "model": "x", "base_url": "http://127.0.0.1:9/v1"}
            )
            entries.append({"name": name, "provider": provider, "regions": [REGIONS[provider]]})
        names[f"model-{m}"] = [d["name"] for d in deps]
        models.append({"name": f"model-{m}", "deployments": deps})
        status = "deprecated" if m % 7 == 0 else "approved"
        catalog.append(
            {"name": f"model-{m}", "status": status, "data_class": "restricted", "deployments": entries}
        )
    providers = [
        {"name": p, "reviewer": "sec", "expires_at": "2099-01-01", "data_class": "restricted",
         "certifications": ["pci-dss"] if p == "azure-eu" else [], "data_retention_days": 0 if "eu" in p else 30,
         "training_opt_out": True}
        for p in PROVIDERS
    ]  # fmt: skip
    config = parse_config(
        {
            "models": models,
            "governance": {"policies": str(policies), "models": catalog, "providers": providers},
        }
    )
    return Governance(config), names


def principals(rng: random.Random) -> list[Principal]:
    return [
        Principal(
            name=f"app-{k}",
            key_id=f"key_{k}",
            team_id=f"team_{k % TEAMS}",
            org_id="org_1",
            environment=rng.choice(["prod", "dev", "staging"]),
            data_class=rng.choice(["internal", "confidential"]),
            tags=tuple(rng.sample(["intern", "customer-data", "pci", "batch"], rng.randrange(3))),
        )
        for k in range(KEYS)
    ]


Request = tuple[Principal, str, str, list[str], Level, str, tuple[str, ...]]


def requests(rng: random.Random, keys: list[Principal], names: dict[str, list[str]], n: int) -> list[Request]:
    out = []
    for _ in range(n):
        model = f"model-{rng.randrange(MODELS)}"
        out.append(
            (
                rng.choice(keys), rng.choice(["invoke", "invoke", "invoke", "embed"]), model, names[model],
                rng.choice([Level.PUBLIC, Level.INTERNAL, Level.CONFIDENTIAL, Level.RESTRICTED]),
                rng.choice(["eu-west-1", "us-east-1", "eu-central-1", "ap-south-1"]),
                tuple(rng.sample(ENTITY_TYPES, rng.randrange(3))),
            )
        )  # fmt: skip
    return out


def measure(
    label: str, fn: Callable[[Request], Any], batch: list[Request], before: Callable[[], None]
) -> None:
    samples = []
    gc.collect()
    gc.disable()  # the gateway freezes its long-lived objects; keep collector pauses out of the figures
    try:
        for req in batch:
            before()
            started = time.perf_counter_ns()
            fn(req)
            samples.append(time.perf_counter_ns() - started)
    finally:
        gc.enable()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(len(samples) * p))] / 1000

    print(f"{label:<44} p50 {pct(0.50):8.1f} µs   p99 {pct(0.99):8.1f} µs   max {samples[-1] / 1000:8.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"plinth-policy-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    text = rules(args.rules, rng)
    (workdir / "rules.cedar").write_text(text)
    started = time.perf_counter()
    gov, names = build(workdir / "rules.cedar")
    load_s = time.perf_counter() - started
    keys = principals(rng)
    batch = requests(rng, keys, names, args.iterations)
    print(f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
          f"cedarpy {getattr(cedarpy, '__version__', '4.12.2')}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{len(gov.policies)} policies, {MODELS} models x {DEPLOYMENTS} deployments, {KEYS} keys; "
          f"load + validate + index: {load_s * 1000:.0f} ms; {len(batch)} requests per figure")  # fmt: skip

    def decide(req: Request) -> Any:
        return gov.decide(*req)

    def clear_memo() -> None:
        gov._memo.decisions.clear()  # benchmark only: force a full evaluation

    # Cold: policy subsets are compiled on first use of a (scope, key attributes) combination.
    measure("decide, first pass (subsets compiled)", decide, batch[:3000], clear_memo)
    for req in batch:  # warm: per-key entities and per-scope policy sets built once
        decide(req)
    print(f"{len(gov.policies._sets)} compiled policy subsets after {len(batch)} requests")
    outcomes = [gov.decide(*req).outcome for req in batch[:2000]]
    print(
        "decisions: "
        + ", ".join(f"{o} {outcomes.count(o) * 100 // len(outcomes)}%" for o in ("allow", "reroute", "deny"))
    )
    measure("decide, uncached (full evaluation)", decide, batch, clear_memo)

    def fresh_key(req: Request) -> Any:
        p = req[0]
        clone = Principal(name=p.name, key_id=p.key_id, team_id=p.team_id, org_id=p.org_id,
                          environment=p.environment, data_class=p.data_class, tags=p.tags)  # fmt: skip
        return gov.decide(clone, *req[1:])

    measure(
        "decide, new key object (entities rebuilt)", fresh_key, batch[: max(1, len(batch) // 4)], clear_memo
    )
    for req in batch:  # every request decided once, so the next pass finds each memoised
        decide(req)
    measure("decide, memoised (same request again)", decide, batch, lambda: None)

    plain = cedarpy.PolicySet.from_str(text)

    def naive(req: Request) -> Any:
        principal, action, model, deps, level, region, types = req
        who = gov._principal(principal)
        view = gov.snapshot.group(gov.snapshot.models[model], tuple(deps))
        entities = who.entities_with(view)
        context = {"data_class": level.value, "data_class_rank": level.rank, "caller_region": region,
                   "entity_types": list(types), "model": model}  # fmt: skip
        for name in deps:
            request = {"principal": who.uid, "action": {"type": "Plinth::Action", "id": action},
                       "resource": view.members[name].target.uid, "context": context}  # fmt: skip
            cedarpy.is_authorized(request, plain, entities)

    measure("plain Cedar, all rules, per deployment", naive, batch[: max(1, len(batch) // 4)], lambda: None)


if __name__ == "__main__":
    sys.exit(main())
