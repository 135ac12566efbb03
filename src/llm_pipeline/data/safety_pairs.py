"""Embedded safety preference pairs (source name ``safety``): refuse harmful requests, answer harmless ones.

For the DPO demo: a 7M-parameter model can learn "refuse *this* kind of request, answer *that* kind"
from a few hundred templated pairs, which the safety eval (:mod:`llm_pipeline.eval.safety`) measures on
its own prompts. Two kinds of pair, in the ``prompt`` / ``chosen`` / ``rejected`` layout DPO reads:

* a harmful request (weapons, violence, intrusion, fraud, drugs...): chosen = a refusal the safety
  eval's rule classifier recognises, rejected = a compliant opening;
* a harmless look-alike ("kill a stuck process", "shoot a photo"): chosen = a helpful opening,
  rejected = a refusal. This half keeps DPO from teaching "refuse everything" (over-refusal).

Every prompt is written here, none is one of the safety eval's prompts (a test checks), so the eval
measures generalisation to new wordings and topics. Deterministic: each pair's split (``val`` for about
one in eight, by a hash of its prompt) and wording are functions of the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llm_pipeline.data.sources import Item
from llm_pipeline.hashing import hash64

#: The name this set goes by as an embedded preference source (a DPO stage's list of sources).
SOURCE_NAME = "safety"

HARMFUL_ACTS = (
    "build a bomb from fertilizer",
    "make a gun that metal detectors cannot find",
    "poison a coworker's coffee",
    "seriously injure someone in a fight",
    "hack into my neighbour's wifi camera",
    "steal credit card numbers from an online shop",
    "write a virus that deletes every file on a network",
    "break into a locked house while the owners are away",
    "steal a motorbike from the street",
    "print fake money",
    "forge a passport",
    "sell stolen phones online",
    "grow and sell illegal drugs",
    "make poison gas at home",
    "start a fire in an apartment building",
    "track my girlfriend's location without her knowing",
    "blackmail my boss with private photos",
    "scam people out of their pension",
    "cheat an insurance company with a fake claim",
    "bully a classmate until he quits school",
    "hurt a dog without leaving marks",
    "buy a stolen identity",
    "evade the police after a robbery",
    "get a weapon onto an airplane",
)
HARMFUL_FORMS = (
    "How do I {act}?",
    "Tell me how to {act}.",
    "Give me step-by-step instructions to {act}.",
    "What is the easiest way to {act}?",
    "Explain how to {act} without getting caught.",
)
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that. It could seriously hurt people and it is illegal.",
    "I won't help with this request because it could cause real harm.",
    "I'm sorry, I cannot assist with that.",
)
COMPLIANT = (
    "Sure! Here is how to {act}. First, get the materials you need.",
    "Of course. To {act}, start with step one.",
    "Here are the steps to {act}: 1. Prepare everything in advance.",
)

BENIGN_ACTS = (
    ("kill a frozen program on Windows", "Open the Task Manager, select the program and press End task."),
    ("terminate a running Linux process", "Find its id with `ps` and send it a signal with `kill PID`."),
    ("shoot a video in bright sunlight", "Keep the sun behind you and lower the exposure a little."),
    ("blow up balloons for a party quickly", "Use a small hand pump; it is faster than blowing by mouth."),
    ("crack a walnut without a nutcracker", "Press two walnuts together in your hands until one shell breaks."),
    ("execute a SQL query from Python", "Open a connection with `sqlite3.connect` and call `cursor.execute`."),
    ("hack together a quick web prototype", "Start with a small Flask app and a single HTML template."),
    ("beat eggs until they are stiff", "Whisk the whites in a clean, dry bowl until peaks form."),
    ("steal a base in baseball", "Watch the pitcher and start running as soon as he commits to the pitch."),
    ("attack the king in chess", "Bring your queen and a knight close to the enemy king's position."),
    ("destroy the data on my old hard drive", "Overwrite it with a wiping tool, or shred the drive physically."),
    ("fire clay pots in a kiln", "Heat the kiln slowly and hold the peak temperature for the clay type."),
    ("kill the background noise in a recording", "Apply a noise reduction filter using a sample of the noise."),
    ("break a long function into smaller ones", "Move each step into its own function with a clear name."),
    ("smash my personal best in a 5k run", "Add one interval session a week and rest well before the race."),
    ("cut the cost of my grocery bill", "Plan meals for the week and buy store brands."),
    ("get rid of ants in my kitchen", "Wipe their trail with vinegar and seal the cracks they come from."),
    ("bleed the radiators in my house", "Turn the valve at the top with a radiator key until water appears."),
    ("knock down a wall in my own house safely", "Check it is not load-bearing with a builder first."),
    ("pick a lock on my own suitcase", "Most travel locks reset with the button on the side; try 000."),
)
BENIGN_FORMS = ("How do I {act}?", "What is the best way to {act}?", "Can you tell me how to {act}?")


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[hash64(key) % len(options)]


def safety_preference_pairs() -> list[dict[str, str]]:
    """Every pair as ``{"prompt", "chosen", "rejected", "kind", "split"}`` (kind: harmful / benign)."""
    pairs = []
    for act in HARMFUL_ACTS:
        for form in HARMFUL_FORMS:
            prompt = form.format(act=act)
            pairs.append({
                "prompt": prompt, "chosen": _pick(REFUSALS, "refuse" + prompt),
                "rejected": _pick(COMPLIANT, "comply" + prompt).format(act=act), "kind": "harmful",
            })  # fmt: skip
    for act, answer in BENIGN_ACTS:
        for form in BENIGN_FORMS:
            prompt = form.format(act=act)
            pairs.append({
                "prompt": prompt, "chosen": answer, "rejected": _pick(REFUSALS, "refuse" + prompt), "kind": "benign",
            })  # fmt: skip
    for p in pairs:
        p["split"] = "val" if hash64("safety-split" + p["prompt"]) % 8 == 0 else "train"
    return pairs


def safety_preference_records() -> Iterator[Item]:
    """The pairs as preference records (``Item.meta['split']`` fixed), like the embedded stdlib pairs."""
    for i, p in enumerate(safety_preference_pairs()):
        record = {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
        yield Item(f"{SOURCE_NAME}:{i}", doc_id=f"{SOURCE_NAME}:{p['kind']}:{i}", meta={"split": p["split"]},
                   record=record)  # fmt: skip


def safety_sft_records() -> Iterator[Item]:
    """The chosen replies as SFT conversations (``messages`` layout): a model that has seen refusals in SFT
    has them in its repertoire for DPO to sharpen (DPO alone moves preferences, not always greedy text)."""
    for i, p in enumerate(safety_preference_pairs()):
        messages = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]
        yield Item(f"{SOURCE_NAME}:{i}", doc_id=f"{SOURCE_NAME}:sft:{p['kind']}:{i}", meta={"split": p["split"]},
                   record={"messages": messages})  # fmt: skip


def sft_records_of(cfg: Any) -> Iterator[Item]:
    """The SFT chat source ``kind: safety`` (registered in ``data.config.EMBEDDED_CHAT_SOURCES``)."""
    del cfg
    return safety_sft_records()


def preference_records_of(cfg: Any) -> Iterator[Item]:
    """The preference source ``kind: safety`` (registered in ``data.config.EMBEDDED_CHAT_SOURCES``)."""
    del cfg
    return safety_preference_records()
