#!/usr/bin/env python3
"""Serving benchmark: `tunehub serve` against a plain LitServe + PEFT server, side by side.

    python benchmarks/serve.py            # 64 modules, 500 requests, 32 concurrent clients
    python benchmarks/serve.py --quick    # 16 modules, 96 requests, 16 clients (about a minute)

Both servers run the same base (the ``tiny`` preset unless ``--preset``), the same LoRA modules
(mixed ranks) and the same workload: requests spread uniformly over the modules, prompts of
mixed lengths, mixed ``max_tokens`` (every request generates exactly that many tokens, greedy).
Clients are ``httpx.AsyncClient`` coroutines, each sending its next request when the last one
answered.

- tunehub: ``tunehub serve`` as users start it (a real process, registry on disk, open tenant).
  The engine batches the requests in flight, each row with its own module.
- litserve_peft: the baseline written below (``BASELINE_SERVER``): one LitServe worker holding a
  ``PeftModel`` with every module loaded as a named adapter; each request calls
  ``set_adapter(name)`` then ``generate``, one request at a time, as PEFT's multi-adapter docs
  describe.

Both servers get one untimed warm-up request per module first. The verdict is the ratio of
requests per second; p50/p99 latency and errors go in ``figures``. The last stdout line is JSON:
``{"benchmark": "serve", "ratios": {...}, "figures": {"tunehub": {...}, "litserve_peft": {...}}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCHMARK = "serve"
TARGETS: dict[str, tuple[str, float]] = {"requests_per_s_vs_litserve_peft": (">=", 3.0)}


@dataclass(frozen=True)
class Sizes:
    name: str
    modules: int
    requests: int
    clients: int
    prompt_words: tuple[int, int]
    max_tokens: tuple[int, ...]


FULL = Sizes("full", modules=64, requests=500, clients=32, prompt_words=(4, 48), max_tokens=(8, 16, 32, 64))
QUICK = Sizes("quick", modules=16, requests=96, clients=16, prompt_words=(4, 24), max_tokens=(8, 16, 32))
RANKS = (4, 8, 16)
WORDS = (
    "the river runs past an old mill where the farmer counts his apples and a quiet child reads about "
    "ships that sailed north in winter while the baker sells warm bread near the station every morning"
).split()

BASELINE_SERVER = r'''
"""Baseline: one LitServe worker, a PeftModel with every module as a named adapter; each request
switches adapter (set_adapter) and generates alone."""
import argparse
import json

import litserve as ls
import torch


class PeftSetAdapterAPI(ls.LitAPI):
    def __init__(self, base, modules, quantization):
        super().__init__(max_batch_size=1)
        self.base, self.modules, self.quantization = base, modules, quantization

    def setup(self, device):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from tunehub.devices import resolve_compute_dtype

        kwargs = {}
        if self.quantization == "nf4":  # the compute dtype tunehub's engine picks on this hardware
            kwargs = {"quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=resolve_compute_dtype("auto", str(device))), "device_map": {"": device}}
        model = AutoModelForCausalLM.from_pretrained(self.base, **kwargs)
        if self.quantization == "none":
            model.to(device)
        names = sorted(self.modules)
        model = PeftModel.from_pretrained(model, self.modules[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(self.modules[name], adapter_name=name)
        self.model = model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.torch_device = device

    def decode_request(self, request):
        return request

    def predict(self, x):
        self.model.set_adapter(x["adapter"])
        inputs = self.tokenizer(x["prompt"], return_tensors="pt").to(self.torch_device)
        n = int(x["max_tokens"])
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        return {"text": self.tokenizer.decode(new, skip_special_tokens=True), "completion_tokens": int(new.shape[0])}

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--base")
    parser.add_argument("--modules")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    api = PeftSetAdapterAPI(args.base, json.loads(open(args.modules).read()), args.quantization)
    server = ls.LitServer(api, accelerator="auto", devices=1, workers_per_device=1, timeout=False)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")
'''


# --- preparation -----------------------------------------------------------------------------------


def prepare(work: Path, sizes: Sizes, preset: str) -> dict[str, Any]:
    """Base, modules (pushed to a registry) and the request list."""
    from tunehub.registry.local import LocalStore
    from tunehub.trainer.base import build_base
    from tunehub.trainer.testing import make_lora_module

    base = build_base(work / "base", preset, seed=0, overwrite=True)
    store = LocalStore(work / "registry", cache_dir=work / "cache")
    modules: dict[str, str] = {}
    started = time.perf_counter()
    for i in range(sizes.modules):
        name = f"m{i:02d}"
        folder = make_lora_module(base, work / "modules" / name, seed=i + 1, r=RANKS[i % len(RANKS)])
        store.push(folder, f"bench/{name}")
        modules[name] = str(folder)
    print(f"prepared {sizes.modules} modules in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rng = random.Random(0)
    workload = []
    for _ in range(sizes.requests):
        words = rng.randint(*sizes.prompt_words)
        workload.append(
            {
                "module": f"m{rng.randrange(sizes.modules):02d}",
                "prompt": " ".join(rng.choice(WORDS) for _ in range(words)),
                "max_tokens": rng.choice(sizes.max_tokens),
            }
        )
    (work / "modules.json").write_text(json.dumps(modules))
    return {"base": str(base), "modules": modules, "workload": workload}


# --- servers ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same threading setting for both servers
    return env


def start_tunehub(work: Path, prepared: dict[str, Any], sizes: Sizes, quantization: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "tunehub.sdk.cli",
        "serve",
        "--base",
        prepared["base"],
        "--quantization",
        quantization,
        "--registry",
        f"file://{work / 'registry'}",
        "--port",
        str(port),
        "--max-batch",
        str(sizes.clients),
        "--pool-bytes",
        str(4 << 30),
        "--audit-log",
        str(work / "audit.jsonl"),
    ]
    log = open(work / "tunehub.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=_env())
    return proc, f"http://127.0.0.1:{port}"


def start_baseline(work: Path, prepared: dict[str, Any], quantization: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    script = work / "litserve_peft_server.py"
    script.write_text(BASELINE_SERVER)
    cmd = [
        sys.executable,
        str(script),
        "--base",
        prepared["base"],
        "--modules",
        str(work / "modules.json"),
        "--quantization",
        quantization,
        "--port",
        str(port),
    ]
    log = open(work / "litserve_peft.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, cwd=work, env=_env())
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout} s")


def stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the server left in its process group
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait()


# --- load --------------------------------------------------------------------------------------


def tunehub_request(item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "/v1/completions", {
        "model": f"bench/{item['module']}",
        "prompt": item["prompt"],
        "max_tokens": item["max_tokens"],
        "temperature": 0,
        "ignore_eos": True,
    }


def baseline_request(item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "/predict", {"adapter": item["module"], "prompt": item["prompt"], "max_tokens": item["max_tokens"]}


def _text(kind: str, payload: dict[str, Any]) -> tuple[str, int]:
    if kind == "tunehub":
        return payload["choices"][0]["text"], payload["usage"]["completion_tokens"]
    return payload["text"], payload["completion_tokens"]


async def _load(url: str, kind: str, items: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    import httpx

    build = tunehub_request if kind == "tunehub" else baseline_request
    queue: asyncio.Queue = asyncio.Queue()
    for index, item in enumerate(items):
        queue.put_nowait((index, item))
    latencies: list[float] = []
    texts: dict[int, str] = {}
    errors: list[str] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while True:
            try:
                index, item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            path, body = build(item)
            started = time.perf_counter()
            try:
                response = await http.post(url + path, json=body)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:120]}")
                    continue
                text, n = _text(kind, response.json())
                latencies.append(time.perf_counter() - started)
                texts[index] = text
                tokens += n
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        wall = time.perf_counter() - started
    return {"latencies": latencies, "texts": texts, "errors": errors, "tokens": tokens, "wall_s": wall}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def measure(kind: str, url: str, prepared: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    warm = [{"module": name, "prompt": "warm up", "max_tokens": 2} for name in sorted(prepared["modules"])]
    asyncio.run(_load(url, kind, warm, min(sizes.clients, len(warm))))
    run = asyncio.run(_load(url, kind, prepared["workload"], sizes.clients))
    done = len(run["latencies"])
    return {
        "requests": len(prepared["workload"]),
        "completed": done,
        "errors": len(run["errors"]),
        "error_samples": run["errors"][:3],
        "wall_s": round(run["wall_s"], 2),
        "requests_per_s": round(done / run["wall_s"], 3),
        "tokens_per_s": round(run["tokens"] / run["wall_s"], 1),
        "p50_ms": round(_percentile(run["latencies"], 50) * 1000, 1),
        "p99_ms": round(_percentile(run["latencies"], 99) * 1000, 1),
        "_texts": run["texts"],
    }


# --- report ------------------------------------------------------------------------------------


def summarize(sizes: Sizes, preset: str, quantization: str, tunehub: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    ratios = {}
    value = tunehub["requests_per_s"] / baseline["requests_per_s"] if baseline["requests_per_s"] else float("inf")
    op, target = TARGETS["requests_per_s_vs_litserve_peft"]
    ratios["requests_per_s_vs_litserve_peft"] = {
        "value": round(value, 3),
        "target": f"{op} {target}",
        "pass": value >= target,
    }
    shared = set(tunehub["_texts"]) & set(baseline["_texts"])
    same = sum(1 for i in shared if tunehub["_texts"][i] == baseline["_texts"][i])
    figures = {
        "sizes": sizes.name,
        "workload": {
            "modules": sizes.modules,
            "requests": sizes.requests,
            "clients": sizes.clients,
            "prompt_words": list(sizes.prompt_words),
            "max_tokens": list(sizes.max_tokens),
            "preset": preset,
            "quantization": quantization,
            "ranks": list(RANKS),
        },
        "tunehub": {k: v for k, v in tunehub.items() if not k.startswith("_")},
        "litserve_peft": {k: v for k, v in baseline.items() if not k.startswith("_")},
        "same_text_share": round(same / len(shared), 3) if shared else None,
        "p50_latency_vs_litserve_peft": round(tunehub["p50_ms"] / baseline["p50_ms"], 3) if baseline["p50_ms"] else None,
    }
    return {"benchmark": BENCHMARK, "ratios": ratios, "figures": figures}


def print_report(report: dict[str, Any]) -> None:
    fig = report["figures"]
    rows = [
        ("requests/s", "requests_per_s"),
        ("tokens/s", "tokens_per_s"),
        ("p50 latency ms", "p50_ms"),
        ("p99 latency ms", "p99_ms"),
        ("errors", "errors"),
        ("wall s", "wall_s"),
    ]
    w = fig["workload"]
    print(
        f"\nserve benchmark ({fig['sizes']}): {w['modules']} modules, {w['requests']} requests, {w['clients']} clients,"
        f" base preset {w['preset']} ({w['quantization']})",
        file=sys.stderr,
    )
    print(f"{'':18}{'tunehub':>14}{'litserve_peft':>16}", file=sys.stderr)
    for label, key in rows:
        print(f"{label:18}{fig['tunehub'][key]:>14}{fig['litserve_peft'][key]:>16}", file=sys.stderr)
    for name, entry in report["ratios"].items():
        verdict = "pass" if entry["pass"] else "FAIL"
        print(f"{name}: {entry['value']:.2f} (target {entry['target']}) {verdict}", file=sys.stderr)
    print(f"answers identical to the baseline's: {fig['same_text_share']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 modules, 96 requests, 16 clients")
    parser.add_argument("--preset", default="tiny", help="base preset (tiny, small, bench-100m, ...)")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4"), help="for both servers")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (base, modules, logs)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tunehub-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepared = prepare(work, sizes, args.preset)
        results = {}
        for kind, start, sig in (
            ("tunehub", lambda: start_tunehub(work, prepared, sizes, args.quantization), signal.SIGTERM),
            ("litserve_peft", lambda: start_baseline(work, prepared, args.quantization), signal.SIGINT),
        ):
            proc, url = start()
            try:
                wait_ready(proc, url)
                print(f"measuring {kind} ...", file=sys.stderr)
                results[kind] = measure("tunehub" if kind == "tunehub" else "baseline", url, prepared, sizes)
            finally:
                stop(proc, sig)
        report = summarize(sizes, args.preset, args.quantization, results["tunehub"], results["litserve_peft"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_report(report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
