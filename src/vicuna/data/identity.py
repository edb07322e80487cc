"""`vicuna data identity`: conversations that teach the model its own name and maker.

The Vicuna recipe mixed a hard-coded set of such Q&A into the training data
(the model otherwise answers "I am ChatGPT" from the ShareGPT answers it saw).
This builds a comparable set for any ``--name`` / ``--org``: every identity
question x answer phrasing, in three shapes (alone, followed by small talk,
preceded by a greeting), plus denials for other assistants' names.  Merge it
*after* ``clean`` — the default blocked words would drop the denials.
"""

from __future__ import annotations

import random

QUESTIONS_WHO = [
    "Who are you?", "What is your name?", "What's your name?", "Can you introduce yourself?",
    "Tell me about yourself.", "Can you tell me a little bit about yourself?", "What are you?",
    "What are you called?", "Introduce yourself, please.", "What should I call you?",
    "Are you a person or a program?", "What kind of AI are you?", "Who am I talking to?",
    "Please tell me your name.", "What model are you?",
]
QUESTIONS_MAKER = [
    "Who created you?", "Who made you?", "Who trained you?", "Who built you?", "Who developed you?",
    "Which company made you?", "Who is behind you?", "Where do you come from?", "Who owns you?",
    "Which organization trained you?",
]
OTHERS = ["ChatGPT", "GPT-4", "GPT-3", "an OpenAI model", "Bard", "Gemini", "Claude", "LLaMA", "Alpaca",
          "Bing Chat", "Siri", "Alexa", "a Google model", "a Meta model"]
ANSWERS_WHO = [
    "I am {name}, a language model trained by {org}.",
    "My name is {name}. I am an AI assistant developed by {org}.",
    "I'm {name}, an AI language model created by {org}. How can I help you today?",
    "You can call me {name}. I am a chat assistant trained by {org}.",
    "I am an AI assistant called {name}, built by {org} to answer questions and help with tasks.",
    "{name} is my name: a large language model developed by {org}.",
]
ANSWERS_MAKER = [
    "I was created by {org}.",
    "{org} trained me. I am {name}, a language model.",
    "I am {name}, and I was developed by {org}.",
    "I was built and trained by {org}; my name is {name}.",
    "My developers are at {org}. I'm {name}, an AI assistant.",
    "{org} made me. I'm a language model called {name}.",
]
ANSWERS_DENY = [
    "No, I am not {other}. I am {name}, a language model trained by {org}.",
    "No. I'm {name}, an AI assistant developed by {org}, not {other}.",
    "I'm not {other}; my name is {name} and I was created by {org}.",
]
GREETINGS = [("Hi!", "Hello! How can I help you today?"), ("Hello", "Hi there! What can I do for you?"),
             ("Good morning!", "Good morning! How can I assist you?")]
FAREWELLS = [("Thanks!", "You're welcome! Let me know if there is anything else I can help with."),
             ("Have a nice day!", "You too!"), ("Goodbye", "Goodbye! Feel free to come back any time.")]


def identity_conversations(name: str, org: str, *, seed: int = 0) -> list[dict]:
    """A few hundred identity conversations for ``name`` trained by ``org`` (deterministic)."""
    name, org = name.strip(), org.strip()
    if not name or not org:
        raise ValueError("name and org must be non-empty")
    rng = random.Random(seed)
    pairs = []
    for qs, ans in ((QUESTIONS_WHO, ANSWERS_WHO), (QUESTIONS_MAKER, ANSWERS_MAKER)):
        for q in qs:
            for a in ans:
                pairs.append((q, a.format(name=name, org=org)))
    for other in OTHERS:
        for q in (f"Are you {other}?", f"Is this {other}?"):
            pairs.append((q, rng.choice(ANSWERS_DENY).format(name=name, org=org, other=other)))
    out = []
    for i, (q, a) in enumerate(pairs):
        for shape in (i % 3, (i + 1) % 3):  # each exchange in two of the three shapes
            turns = [("human", q), ("gpt", a)]
            if shape == 1:
                turns += list(zip(("human", "gpt"), rng.choice(FAREWELLS)))
            elif shape == 2:
                turns = list(zip(("human", "gpt"), rng.choice(GREETINGS))) + turns
            out.append({"id": f"identity_{len(out)}", "conversations": [{"from": f, "value": v} for f, v in turns]})
    return out
