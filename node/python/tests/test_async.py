"""The asyncio API: 50 concurrent jobs from one client (one connection to the facilitator)
while the event loop keeps ticking, status iteration with `async for`, and cancellation."""

from __future__ import annotations

import asyncio
import time

import horde
import horde.aio

JOBS = 50

# The longest the event loop may go without running a 10 ms ticker while 50 jobs run: nothing
# the SDK does runs on the loop's thread, so any gap is the machine's load, not a blocked loop.
MAX_LOOP_GAP_S = 1.0


async def ticker(gaps: list[float], stop: asyncio.Event) -> None:
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


async def one_job(client: horde.aio.Client, network, index: int) -> list[str]:
    job = await client.submit(network.demo_spec())
    await job.wait_for_endpoint(timeout=180)
    body = f"job {index}".encode()
    response = await job.request("POST", "/echo", body)
    assert response.body == body and response.receipt.job_id == job.job_id
    await job.terminate()
    names = [status.name async for status in job.statuses(timeout=120)]
    assert (await job.wait()).name == "Completed"
    return names


def test_fifty_concurrent_jobs_from_one_asyncio_client(network):
    async def main() -> None:
        gaps: list[float] = []
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(gaps, stop))
        async with horde.aio.Client(horde.Key.generate(), network.facilitator) as client:
            started = time.monotonic()
            results = await asyncio.gather(*(one_job(client, network, i) for i in range(JOBS)))
            elapsed = time.monotonic() - started
        stop.set()
        await tick
        assert len(results) == JOBS
        for names in results:
            assert names[0] == "Received" and names[-1] == "Completed", names
        assert max(gaps) < MAX_LOOP_GAP_S, max(gaps)
        print(f"{JOBS} jobs in {elapsed:.1f} s; longest event-loop gap {max(gaps) * 1e3:.0f} ms")

    asyncio.run(main())


def test_cancelling_an_await_cancels_the_operation(network):
    async def main() -> None:
        client = horde.aio.Client(horde.Key.generate(), network.facilitator)
        job = await client.submit(network.demo_spec())
        await job.wait_for_endpoint(timeout=60)
        waiting = asyncio.create_task(job.wait_for("NeverSent"))
        await asyncio.sleep(0.2)
        waiting.cancel()
        try:
            await waiting
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("not cancelled")
        async with await job.forward() as forward:
            assert forward.url.startswith("http://127.0.0.1:")
        stream = await job.stream("GET", "/stream?n=3&delay_ms=10")
        chunks = b""
        while (chunk := await stream.read_async()) is not None:
            chunks += chunk
        assert chunks.count(b"data: token-") == 3
        assert (await stream.finish_async()).bytes_out > 0
        await job.terminate()
        assert (await job.wait(timeout=60)).name == "Completed"

    asyncio.run(main())
