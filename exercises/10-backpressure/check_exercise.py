"""The check of exercise 10: a fast model, a slow client, your relay between.

No server here: lesson 10's chain (TCP windows, a blocked write) is
replaced by a ``write`` that simply takes as long as the client would, so
the check can watch every token.  The model makes a token every 1 ms; the
client needs 50 ms per write.  On trio's virtual clock, exact and instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

TOKENS, ITL, AHEAD = 300, 0.001, 16


@dataclass
class Watch:
    """What the model made and the client was handed, and when."""

    made: list[float] = field(default_factory=list)  # when each token was made
    handed: list[float] = field(default_factory=list)  # when each token reached write()
    writes: list[int] = field(default_factory=list)  # tokens per write
    lead: int = 0  # most tokens made and not yet handed to write()
    text: str = ""  # everything written, in order

    async def model(self, tokens: int = TOKENS):
        for n in range(tokens):
            await trio.sleep(ITL)
            self.made.append(trio.current_time())
            self.lead = max(self.lead, len(self.made) - len(self.handed))
            yield f"t{n} "

    def writer(self, seconds: float):
        async def write(tokens: list[str]) -> None:
            self.handed += [trio.current_time()] * len(tokens)
            self.writes.append(len(tokens))
            self.text += "".join(tokens)
            await trio.sleep(seconds)

        return write


async def run(exercise, watch: Watch, write_seconds: float, tokens: int = TOKENS) -> None:
    with trio.fail_after(60):
        await exercise.relay(watch.model(tokens), watch.writer(write_seconds), AHEAD)


async def test_a_slow_client_holds_the_model_back(exercise, autojump_clock, observe):
    watch = Watch()
    await run(exercise, watch, write_seconds=0.050)
    observe(f"slow client: most tokens the model got ahead (ahead={AHEAD})", watch.lead)
    observe("slow client: writes, most tokens in one write", (len(watch.writes), max(watch.writes)))
    assert watch.text == "".join(f"t{n} " for n in range(TOKENS)), "every token, once, in order"
    lead, writes = watch.lead, len(watch.writes)
    assert lead <= AHEAD + 1, (
        f"the model got {lead} tokens ahead of a client that takes 50 ms per write; ahead={AHEAD}"
    )
    assert writes <= TOKENS // 4, (
        f"{writes} writes for {TOKENS} tokens: each write should take every token waiting"
    )


async def test_a_fast_client_gets_each_token_at_once(exercise, autojump_clock, observe):
    watch = Watch()
    await run(exercise, watch, write_seconds=0)
    late = max(h - m for m, h in zip(watch.made, watch.handed, strict=True))
    observe("fast client: longest wait between made and written", f"{late * 1000:.3f} ms")
    assert late < 1e-9, f"a token waited {late * 1000:.1f} ms for the write: a write must not wait to fill up"


async def test_a_client_that_leaves_stops_the_model(exercise, autojump_clock, observe):
    watch = Watch()

    async def write(tokens: list[str]) -> None:
        watch.handed += [trio.current_time()] * len(tokens)
        if len(watch.handed) >= 20:
            raise ConnectionResetError("the client left")
        await trio.sleep(0.010)

    raised = False
    with trio.fail_after(60):
        try:
            await exercise.relay(watch.model(), write, AHEAD)
        except* ConnectionResetError:  # alone, or in a nursery's ExceptionGroup
            raised = True
    assert raised, "write() raised ConnectionResetError, and relay() returned as if all went well"
    left = trio.current_time()
    await trio.sleep(1)  # the model would make 1000 tokens in this second
    made_after = sum(t > left for t in watch.made)
    observe("tokens made after the client left", made_after)
    assert made_after == 0
