"""Time the routes from a batch-file line to a GenerateContentRequest.

Usage: ``python bench/bench_parse.py [--lines N] [--seed S]``

Builds N realistic lines of about 200 bytes (single- and multi-turn prompts,
system instructions, generation configs, camelCase and snake_case, some
colons in the text), then times, over all of them:

* ``json_format.Parse`` on the request's own JSON text (the line's key left
  aside, so this flatters it a little),
* ``orjson.loads`` of the line plus ``json_format.ParseDict`` of its request,
* ``longbatch.server.jsonl.parse_generate_line`` of the line,
* ``orjson.loads`` alone, as the floor.

Figures are CPU time (``time.process_time``), the best of a few passes per
chunk of lines for the fast routes, so that other work on the machine does not
inflate them. Prints a table (µs a line, lines a second) and then one JSON line
with the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable

import orjson
from google.protobuf import json_format

from longbatch.server.jsonl import parse_generate_line
from longbatch.v1 import content_pb2

WORDS = (
    "the a of to and in is for on with that as are this be by from it at or an summarize translate explain "
    "list describe compare write classify answer question paragraph sentence customer review product order "
    "invoice weather report email summary French German table JSON data model result between steps short"
).split()
TAILS = ["", "", "", " Answer: yes or no.", " Format: JSON.", " Q: why?", " See https://example.com/a."]


def _prompt(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."
    return text + rng.choice(TAILS)


def _request(rng: random.Random) -> dict[str, object]:
    """One request as a Gemini user would write it; about 170 bytes of JSON."""
    kind = rng.random()
    if kind < 0.6:
        request: dict[str, object] = {
            "contents": [{"role": "user", "parts": [{"text": _prompt(rng, rng.randint(6, 14))}]}],
            "generationConfig": {"temperature": rng.choice([0.0, 0.2, 0.7, 1.0]),
                                 "maxOutputTokens": rng.choice([64, 256, 1024])},
        }
    elif kind < 0.8:
        request = {
            "systemInstruction": {"parts": [{"text": "You are a concise assistant."}]},
            "contents": [{"role": "user", "parts": [{"text": _prompt(rng, rng.randint(6, 12))}]}],
        }
    elif kind < 0.9:
        request = {
            "model": "models/echo",
            "contents": [{"parts": [{"text": _prompt(rng, rng.randint(4, 10))}]}],
            "generation_config": {"top_p": 0.95, "top_k": 40, "stop_sequences": ["\n\n"]},
        }
    else:
        request = {
            "contents": [
                {"role": "user", "parts": [{"text": _prompt(rng, 3)}]},
                {"role": "model", "parts": [{"text": _prompt(rng, 2)}]},
                {"role": "user", "parts": [{"text": _prompt(rng, 4)}]},
            ],
        }
    return request


def build_lines(n: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    """N lines and, for the json_format.Parse baseline, their requests' JSON text."""
    rng = random.Random(seed)
    lines, requests = [], []
    for i in range(n):
        request = orjson.dumps(_request(rng))
        requests.append(request)
        lines.append(b'{"key":"req-' + str(i).encode() + b'","request":' + request + b"}")
    return lines, requests


def _time(label: str, run: Callable[[list[bytes]], None], chunks: list[list[bytes]], passes: int
          ) -> dict[str, float | str]:
    """CPU time of ``run`` over all chunks, keeping each chunk's best of ``passes``.

    Other work on the machine only ever adds time, so the best pass is the truest figure.
    """
    best = [math.inf] * len(chunks)
    gc.collect()
    for _ in range(passes):
        for i, chunk in enumerate(chunks):
            start = time.process_time()
            run(chunk)
            best[i] = min(best[i], time.process_time() - start)
    n = sum(map(len, chunks))
    elapsed = sum(best)
    return {"route": label, "us_per_line": elapsed / n * 1e6, "lines_per_s": n / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=200_000, help="how many lines (default 200000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the lines")
    parser.add_argument("--passes", type=int, default=3, help="passes over the lines for the fast routes (best kept)")
    args = parser.parse_args(argv)
    n: int = args.lines
    lines, requests = build_lines(n, args.seed)
    mean_bytes = sum(map(len, lines)) / n
    cls = content_pb2.GenerateContentRequest

    # Same answers before any timing: the fast route must build what ParseDict builds.
    for line in lines[:2000]:
        decoded = orjson.loads(line)
        assert parse_generate_line(line) == (decoded["key"], json_format.ParseDict(decoded["request"], cls()))

    requests_of = dict(zip(lines, requests, strict=True))

    def parse(chunk: list[bytes]) -> None:
        for line in chunk:
            json_format.Parse(requests_of[line], cls())

    def parse_dict(chunk: list[bytes]) -> None:
        for line in chunk:
            decoded = orjson.loads(line)
            decoded.get("key", "")
            json_format.ParseDict(decoded["request"], cls())

    def fast(chunk: list[bytes]) -> None:
        for line in chunk:
            parse_generate_line(line)

    def floor(chunk: list[bytes]) -> None:
        for line in chunk:
            orjson.loads(line)

    warm = [lines[:1000]]  # first calls fill caches; keep them out of the figures
    for route in (parse, parse_dict, fast, floor):
        route(warm[0])
    chunks = [lines[i : i + 2000] for i in range(0, n, 2000)]
    slow_passes = 1  # the baselines are slow enough that noise hardly moves them
    results = [
        _time("json_format.Parse", parse, chunks, slow_passes),
        _time("orjson.loads + ParseDict", parse_dict, chunks, slow_passes),
        _time("parse_generate_line", fast, chunks, args.passes),
        _time("orjson.loads alone", floor, chunks, args.passes),
    ]
    print(f"{n} lines, {mean_bytes:.0f} bytes on average, Python {platform.python_version()}")
    print(f"{'route':<28}{'µs/line':>10}{'lines/s':>12}")
    for r in results:
        print(f"{r['route']:<28}{r['us_per_line']:>10.2f}{r['lines_per_s']:>12,.0f}")
    speedup = float(results[1]["us_per_line"]) / float(results[2]["us_per_line"])
    print(f"parse_generate_line is {speedup:.1f}x orjson.loads + ParseDict")
    figures = {
        "lines": n,
        "mean_line_bytes": round(mean_bytes, 1),
        "python": platform.python_version(),
        "clock": "process_time, best of passes per 2000-line chunk",
        "results": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in results],
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
