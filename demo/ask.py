"""The demo's second job: `answer-question` on `ask.requested`, an answer streamed as it is written.

    POST /api/events {"name": "ask.requested", "data": {"prompt": "How does resuming work?"}}

The answer is a text stream (docs/protocol.md §11) on channel
`run.<run_id>`, topic `answer`; the run's lifecycle on topic `run` comes from
the runner, as for every run. The page shows it growing, a reload shows the
text so far at once, and cancelling the run (the page's Stop) ends it
`cancelled`, keeping the text.

Where the answer comes from:
- by default, a local generator: no network, no model. It writes a few
  paragraphs made from the prompt (seeded by it: the same prompt, the same
  answer) in tokens of about four characters, `DEMO_ASK_TOKENS_PER_S` a second,
  like a model would.
- with `OPENAI_BASE_URL` set (the environment, or the app's config), any
  OpenAI-compatible chat-completions server, through the official `openai`
  package (requirements-openai.txt), `OPENAI_MODEL` and `OPENAI_API_KEY`
  optional. The key goes to that server and nowhere else: errors say the
  server's status, never its message, which may quote what it was sent.

The answer is one step, `answer`: a failed attempt that is retried streams
again on the same text stream, which starts over (the page shows only the
attempt that is running).
"""
from __future__ import annotations

import random
import re
import time
from contextlib import closing
from typing import Any, Callable, Iterable, Iterator, Sequence

from flask import current_app

from common.errors import PublicError
from jobs import Context, NonRetriableError, function

MAX_PROMPT_CHARS = 2000
#: The local generator's answer, in tokens, when DEMO_ASK_TOKENS does not fix it: picked from the prompt.
ANSWER_TOKENS = (150, 400)
SYSTEM_PROMPT = (
    "You answer questions asked on the demo page of a project that streams background jobs' "
    "progress to browsers over server-sent events. Answer in two to four short paragraphs."
)


class InvalidAskRequest(NonRetriableError, PublicError):
    """A prompt no retry can fix, in a message for the person who asked: the page shows it."""


class ModelUnavailable(NonRetriableError, PublicError):
    """OPENAI_BASE_URL is set, but this server cannot talk to it (the package is missing)."""


class ModelServerError(PublicError):
    """The model server failed or could not be reached: worth a retry."""


class ModelServerRefused(NonRetriableError, ModelServerError):
    """The model server refused the request (a 4xx other than 408 and 429): a retry gets the same."""


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidAskRequest(f"'prompt' must be a string of 1-{MAX_PROMPT_CHARS} characters, not only spaces")
    return prompt


@function(id="answer-question", trigger="ask.requested", retries=2)
def answer_question(ctx: Context) -> dict[str, Any]:
    prompt = check_prompt(ctx.event.data.get("prompt"))
    config = current_app.config

    def answer() -> dict[str, Any]:
        if config["OPENAI_BASE_URL"]:
            source = "openai"
            pieces = openai_pieces(prompt, base_url=config["OPENAI_BASE_URL"],
                                   api_key=config["OPENAI_API_KEY"], model=config["OPENAI_MODEL"])
        else:
            source = "local"
            pieces = paced(tokenize(local_answer(prompt, int(config["DEMO_ASK_TOKENS"]))),
                           float(config["DEMO_ASK_TOKENS_PER_S"]))
        characters = 0
        # closing(): a cancelled or failed write closes the generator (and the model's response) now.
        with ctx.text_stream(ctx.channel, "answer") as out, closing(pieces):
            for piece in pieces:
                out.write(piece)  # raises jobs.Cancelled once the run is cancelled: the stream ends cancelled
                characters += len(piece)
        return {"source": source, "characters": characters}

    return ctx.step.run("answer", answer)


# -- the local generator ----------------------------------------------------------------------
#
# A small grammar rather than a model: sentences about the project's own ideas, with the
# prompt's subject in them. Readable, deterministic, and free.

_OPENINGS = (
    "Good question: {topic} is easier to reason about once you see where the state lives.",
    "Here is how I would think about {topic}.",
    "Short answer: {topic} is mostly about never losing your place.",
    "Let me walk through {topic} step by step.",
)
_ACTIONS = (
    ("keeps", "every message in a table"),
    ("replays", "exactly what the client missed"),
    ("sends", "a cursor with each event"),
    ("remembers", "the last id it saw"),
    ("stores", "the text written so far"),
    ("checks", "the token before anything else"),
    ("writes", "small pieces every fifty milliseconds"),
    ("hands back", "the run it could not finish"),
    ("folds", "a long answer into one message"),
    ("publishes", "its progress on the run's channel"),
)
_SUBJECTS = ("the server", "each browser", "the job", "a worker", "the database", "the client", "the page")
_REASONS = (
    "so nothing is lost when the connection drops",
    "so a reload shows the whole answer at once",
    "which keeps the page honest about what it has seen",
    "because networks fail far more often than servers do",
    "and that is what makes a retry safe",
    "so two tabs always agree",
)
_CONDITIONS = (
    "the connection drops halfway through",
    "the tab sleeps for an hour",
    "two workers race for the same run",
    "the database restarts",
    "a proxy buffers the response",
    "the token expires mid-stream",
)
_AFTERWARDS = ("and carries on from there", "without asking twice", "and nobody has to do a thing", "as if nothing happened")
_STARTS = ("In practice", "Under the hood", "Most of the time", "Put simply", "Either way", "In this project")
_METAPHORS = (
    "a ledger rather than a radio",
    "a conveyor belt of numbered boxes",
    "a bookmark in a long book",
    "a relay race where the baton is the cursor",
)
_THINGS = ("a durable log", "a cursor", "a short-lived token", "a heartbeat", "an idempotent retry", "a clear status")
_MISTAKES = (
    ("keep the state only in memory", "works until the first deploy"),
    ("send the whole text on every change", "makes long answers stutter"),
    ("treat a reconnect as a fresh start", "shows the same lines twice"),
    ("retry without a backoff", "floods the server the moment it comes back"),
    ("trust the client's clock", "turns a small drift into a missing message"),
)
_SENTENCES = (
    "{Start}, {subject} {action}, {reason}.",
    "Think of {topic} as {metaphor}: {subject} {action}, and {subject2} {action2}.",
    "If {condition}, {subject} {action} {afterwards}.",
    "{topic} comes down to three things: {thing}, {thing2} and {thing3}.",
    "A common mistake is to {mistake}, which {consequence}.",
    "The part people miss is that {subject} {action} {afterwards}, {reason}.",
    "{Start}, when {condition}, nothing special happens: {subject} {action}.",
)
_CLOSINGS = (
    "So, to sum up: {topic} works because every piece has a place and an order.",
    "That is the whole trick behind {topic}: write it down first, then show it.",
    "In short, {topic} is a log with a bookmark, and the rest is detail.",
)
_STOPWORDS = frozenset(
    "about after again also because before being could does doing from have into just more most much only "
    "other over same should some such than that their them then there these they this those what when where "
    "which while will with would your works work happens happen explain tell please every keep keeps "
    "always never still really thing things anything something".split()
)


def topic_of(prompt: str) -> str:
    """The prompt's subject, roughly: its two longest words that say something."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]{3,}", prompt) if w.lower() not in _STOPWORDS]
    longest = sorted(dict.fromkeys(words), key=len, reverse=True)[:2]
    kept = dict.fromkeys(w for w in words if w in longest)  # in the prompt's order
    return "the " + " ".join(kept) if kept else "your question"


class _Deck:
    """Draws from `items` without repeats until all were drawn, then from a new shuffle."""

    def __init__(self, rng: random.Random, items: Sequence[Any]) -> None:
        self._rng, self._items, self._left = rng, list(items), []

    def draw(self) -> Any:
        if not self._left:
            self._left = self._rng.sample(self._items, len(self._items))
        return self._left.pop()


def local_answer(prompt: str, tokens: int = 0) -> str:
    """A few paragraphs answering `prompt`, the same for the same prompt: about `tokens` tokens
    (it ends at the first sentence past them), or 150-400 picked from the prompt when `tokens` is 0."""
    rng = random.Random(prompt)  # a str seed is hashed with SHA-512: the same in every process
    target = tokens or rng.randint(*ANSWER_TOKENS)
    topic = topic_of(prompt)

    actions, reasons, conditions, starts, mistakes, sentences = (
        _Deck(rng, items) for items in (_ACTIONS, _REASONS, _CONDITIONS, _STARTS, _MISTAKES, _SENTENCES)
    )

    def fill(template: str) -> str:
        (verb, thing), (verb2, thing2) = actions.draw(), actions.draw()
        mistake, consequence = mistakes.draw()
        things = rng.sample(_THINGS, 3)
        subjects = rng.sample(_SUBJECTS, 2)
        sentence = template.format(
            topic=topic, Start=starts.draw(),
            subject=subjects[0], subject2=subjects[1], action=f"{verb} {thing}", action2=f"{verb2} {thing2}",
            reason=reasons.draw(), condition=conditions.draw(), afterwards=rng.choice(_AFTERWARDS),
            metaphor=rng.choice(_METAPHORS), thing=things[0], thing2=things[1], thing3=things[2],
            mistake=mistake, consequence=consequence,
        )
        return sentence[:1].upper() + sentence[1:]

    paragraphs: list[list[str]] = [[fill(rng.choice(_OPENINGS))]]
    count = len(tokenize(paragraphs[0][0]))
    per_paragraph = rng.randint(3, 5)
    while count < target:
        if len(paragraphs[-1]) >= per_paragraph:
            paragraphs.append([])
            per_paragraph = rng.randint(3, 5)
        sentence = fill(sentences.draw())
        paragraphs[-1].append(sentence)
        count += len(tokenize(" " + sentence))  # its first token takes the space (or break) before it
    paragraphs.append([fill(rng.choice(_CLOSINGS))])
    return "\n\n".join(" ".join(sentences) for sentences in paragraphs)


def tokenize(text: str) -> list[str]:
    """`text` in pieces of about four characters, each with the spaces before it (as a model's tokens
    come: " stre", "am"); joined, they are `text` again."""
    return re.findall(r"\s*\S{1,4}|\s+", text)


def paced(
    pieces: Iterable[str], per_s: float,
    *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> Iterator[str]:
    """`pieces`, `per_s` a second (0: all at once), on a schedule that does not drift with the
    time the caller takes."""
    due = None
    for piece in pieces:
        if per_s > 0:
            due = clock() if due is None else due + 1 / per_s
            if (wait := due - clock()) > 0:
                sleep(wait)
        yield piece


# -- an OpenAI-compatible server ---------------------------------------------------------------


def openai_pieces(prompt: str, *, base_url: str, api_key: str | None, model: str) -> Iterator[str]:
    """The answer of `model` at `base_url` (`.../v1`), piece by piece as the server streams it."""
    try:
        import openai
    except ImportError:
        raise ModelUnavailable(
            "OPENAI_BASE_URL is set, but the openai package is not installed: pip install -r requirements-openai.txt"
        ) from None
    # A local server (llama.cpp, vLLM, Ollama) wants no key, but the client insists on one.
    client = openai.OpenAI(base_url=str(base_url), api_key=str(api_key or "no-key"), max_retries=1, timeout=60.0)
    try:
        with client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            stream=True,
        ) as stream:
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    yield piece
    # Only the status and the error's type: the server's message may quote the request, key and all.
    except openai.APIStatusError as exc:
        error = ModelServerError if exc.status_code in (408, 429) or exc.status_code >= 500 else ModelServerRefused
        raise error(f"the model server answered {exc.status_code} ({type(exc).__name__})") from None
    except openai.APIError as exc:
        raise ModelServerError(f"the model server failed ({type(exc).__name__})") from None
    finally:
        client.close()
