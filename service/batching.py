"""Searches that arrive together go to faiss together.

An HTTP worker process answers many connections on one event loop. Unfiltered
searches are queued; one thread runs faiss on everything queued so far in one
call, while the loop parses the next requests, and those form the next call. No
request waits for a batch to fill: a lone request is searched at once, and under
load each call takes what arrived during the previous one. One call over many
queries turns the coarse quantizer's scan into one matrix product and lets
fast-scan codes be compared for many queries at a time, and faiss runs while
Python answers other requests (it releases the GIL).

Only queries of one searcher (index version) and one ``fetch`` share a call, so
an answer never depends on what else was asked (a larger k re-ranks more
candidates in some indexes). Filtered searches, each with its own selector (and
maybe a scan of every list), run on the same thread, one call each, never on the
loop.

Image queries queue the same way for the image threads (one per core the worker
has): a free thread takes a share of the uploads waiting, and ``search_images``
runs them through decoding, the model (one image at a time) and one faiss call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math

from imgembed.service.searcher import ImageQuery, Query, Searcher

# Query vectors in one faiss call at most: bounds how long a call keeps the queue waiting.
MAX_BATCH_ROWS = 256
# Uploads an image thread takes at once at most: each of them is answered when all
# are embedded, so this bounds the wait it adds (7 model calls, ~85 ms on one core).
MAX_IMAGES = 8


class SearchBatcher:
    """Belongs to one event loop (one worker process)."""

    def __init__(self):
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="faiss")
        self._queued: list[tuple[Searcher, Query, asyncio.Future]] = []
        self._running = False
        self._drainer: asyncio.Task | None = None  # referenced, so that it is not collected midway

    async def answer(self, searcher: Searcher, query: Query) -> list[list[dict]]:
        loop = asyncio.get_running_loop()
        if query.matching is not None:  # its own selector, maybe a scan of every list: off the loop
            return await loop.run_in_executor(self._thread, searcher.answer, query)
        future = loop.create_future()
        self._queued.append((searcher, query, future))
        if not self._running:
            self._running = True
            self._drainer = loop.create_task(self._drain())
        scores, found = await future
        return query.finish(scores, found)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                calls = self._next_calls()
                results = await loop.run_in_executor(self._thread, _search_calls, calls)
                for (_, _, waiting), result in zip(calls, results, strict=True):
                    for future, answer in zip(waiting, result, strict=True):
                        if future.done():  # the client went away
                            continue
                        if isinstance(answer, BaseException):
                            future.set_exception(answer)
                        else:
                            future.set_result(answer)
        finally:
            self._running = False

    def _next_calls(self) -> list[tuple[Searcher, list[Query], list[asyncio.Future]]]:
        """Up to MAX_BATCH_ROWS of the queue (at least one query), one call per
        (searcher, fetch), in arrival order."""
        taken, rows = 0, 0
        while taken < len(self._queued) and (
            taken == 0 or rows + len(self._queued[taken][1].vectors) <= MAX_BATCH_ROWS
        ):
            rows += len(self._queued[taken][1].vectors)
            taken += 1
        batch, self._queued = self._queued[:taken], self._queued[taken:]
        calls: dict[tuple[int, int], tuple[Searcher, list[Query], list[asyncio.Future]]] = {}
        for searcher, query, future in batch:
            _, queries, futures = calls.setdefault((id(searcher), query.fetch), (searcher, [], []))
            queries.append(query)
            futures.append(future)
        return list(calls.values())


class ImageBatcher:
    """Belongs to one event loop (one worker process); ``threads`` images are
    embedded at once, one on each thread. An upload that cannot be decoded fails
    alone; a failure of the model or of faiss goes to every upload of its call."""

    def __init__(self, threads: int):
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="images")
        self._free = threads
        self._queued: list[tuple[Searcher, ImageQuery, asyncio.Future]] = []
        self._running: set[asyncio.Task] = set()  # referenced, so that none is collected midway

    async def answer(self, searcher: Searcher, upload: ImageQuery) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        self._queued.append((searcher, upload, future))
        self._start()
        return await future

    def _start(self) -> None:
        """Hands the free threads their shares of the queue."""
        while self._free and self._queued:
            take = min(MAX_IMAGES, math.ceil(len(self._queued) / self._free))
            jobs, self._queued = self._queued[:take], self._queued[take:]
            self._free -= 1
            task = asyncio.get_running_loop().create_task(self._run(jobs))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, jobs: list[tuple[Searcher, ImageQuery, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            uploads = [(searcher, upload) for searcher, upload, _ in jobs]
            answers = await loop.run_in_executor(self._threads, _search_images, uploads)
        except Exception as error:  # noqa: BLE001 (handed to the requests, which answer it)
            answers = [error] * len(jobs)
        finally:
            self._free += 1
        for (_, _, future), answer in zip(jobs, answers, strict=True):
            if future.done():  # cancelled meanwhile
                continue
            if isinstance(answer, BaseException):  # this upload's own, or the call's
                future.set_exception(answer)
            else:
                future.set_result(answer)
        self._start()


def _search_images(uploads: list[tuple[Searcher, ImageQuery]]) -> list:
    """In an image thread: the answers of the uploads, those of one searcher together."""
    answers: list = [None] * len(uploads)
    by_searcher: dict[int, list[int]] = {}
    for i, (searcher, _) in enumerate(uploads):
        by_searcher.setdefault(id(searcher), []).append(i)
    for members in by_searcher.values():
        searcher = uploads[members[0]][0]
        found = searcher.search_images([uploads[i][1] for i in members])
        for i, answer in zip(members, found, strict=True):
            answers[i] = answer
    return answers


def _search_calls(calls) -> list[list]:
    """In the faiss thread: one search per call, split back per query (an exception
    goes to every query of its call)."""
    results = []
    for searcher, queries, _ in calls:
        try:
            results.append(searcher.search_together(queries))
        except Exception as error:  # noqa: BLE001 (handed to the requests, which answer it)
            results.append([error] * len(queries))
    return results
