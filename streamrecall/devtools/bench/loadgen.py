"""A closed-loop HTTP/1.1 load generator with kept-alive connections, run in its own process.

``bench query`` starts it as a subprocess so that the client's CPU is not the server's
(both still share the machine's cores: the CPU seconds it used are reported so a reader can
tell how much of the machine it took). Each of ``concurrency`` connections sends its next
request as soon as the answer to the previous one has been read, the way a pooled client
(requests.Session, httpx, a Go or Java pool) behaves. asyncio on one thread keeps the client
cheap: a thread per connection would spend the cores on the GIL instead of on the server.

Input (stdin): a JSON object ``{"host", "port", "path", "bodies": [str], "concurrency",
"requests", "warmup", "server_pids"}``. Output (stdout): one JSON object with ``qps``,
``latencies_s`` (sorted), ``errors``, ``cpu_s`` (this process), ``server_cpu_s`` (the
``server_pids`` together, from /proc) and ``wall_s``, all over the timed requests only.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HttpFailure(Exception):
    """The server answered with a status other than 200, or closed the connection."""


async def _one_connection(host: str, port: int, requests: list[bytes], latencies: list[float]) -> int:
    """Send ``requests`` one after another on one kept-alive connection; returns errors seen."""
    reader, writer = await asyncio.open_connection(host, port)
    errors = 0
    try:
        for request in requests:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
    finally:
        writer.close()
    return errors


def _requests(host: str, path: str, bodies: list[str]) -> list[bytes]:
    out = []
    for body in bodies:
        raw = body.encode()
        out.append(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode()
                   + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(raw)).encode()
                   + b"\r\n\r\n" + raw)
    return out


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm each connection up, then time ``requests`` requests spread over the connections."""
    host, port, concurrency = spec["host"], int(spec["port"]), int(spec["concurrency"])
    requests = _requests(host, spec["path"], spec["bodies"])
    total, warmup = int(spec["requests"]), int(spec.get("warmup", 0))
    plan = [requests[i % len(requests)] for i in range(total)]
    per_conn = [plan[c::concurrency] for c in range(concurrency)]
    warm: list[float] = []
    await asyncio.gather(*(_one_connection(host, port, requests[:max(1, warmup // concurrency)], warm)
                           for _ in range(concurrency)))
    latencies: list[float] = []
    servers = [int(pid) for pid in spec.get("server_pids", ())]
    cpu0, server0 = resource.getrusage(resource.RUSAGE_SELF), sum(map(cpu_seconds, servers))
    started = time.perf_counter()
    errors = sum(await asyncio.gather(*(_one_connection(host, port, part, latencies) for part in per_conn)))
    wall = time.perf_counter() - started
    cpu1, server1 = resource.getrusage(resource.RUSAGE_SELF), sum(map(cpu_seconds, servers))
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"qps": len(latencies) / wall, "latencies_s": sorted(latencies), "errors": errors,
            "cpu_s": cpu, "server_cpu_s": server1 - server0, "wall_s": wall}


def main() -> None:
    import uvloop  # the client's own overhead matters: it shares the cores with the server

    spec = json.load(sys.stdin)
    json.dump(uvloop.run(run(spec)), sys.stdout)


if __name__ == "__main__":
    main()
