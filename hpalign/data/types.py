"""The records every data format is normalised into, and the errors a bad row raises."""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class DataFormatError(ValueError):
    """A row that does not fit any supported format; the message names file, line/row and field."""

    def __init__(self, source: str, field_name: str | None, problem: str):
        where = f"{source}, field '{field_name}'" if field_name else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.field_name = field_name
        self.problem = problem


@dataclass
class PreferenceExample:
    """One (x, y_w, y_l) pair. `prompt` is the whole conversation up to the answer (history,
    system message and the last user turn), as chat messages ending with a user turn."""

    prompt: list[Message]
    chosen: str
    rejected: str
    source: str  # "path:line" or "path:row N", used in every error and skip report
    margin: float | None = None


@dataclass
class KTOExample:
    """One (x, y, label) example: `label` True when the completion is desirable."""

    prompt: list[Message]
    completion: str
    label: bool
    source: str


@dataclass
class SFTExample:
    prompt: list[Message]
    response: str
    source: str


@dataclass
class PromptExample:
    """A prompt alone (PPO samples its own responses): the conversation up to the answer, as chat
    messages ending with a user turn, exactly like `PreferenceExample.prompt`."""

    prompt: list[Message]
    source: str


@dataclass
class TokenizedExample:
    """Token ids of one example after templating and truncation.

    `prompt_ids` holds every templated token before the response (system, history, last user turn,
    assistant header); each entry of `responses` holds a response's tokens including its end-of-turn
    token. A pair has two responses (chosen, rejected), KTO and SFT one, a prompt none.
    """

    prompt_ids: list[int]
    responses: list[list[int]]
    source: str
    label: bool | None = None  # KTO only
    margin: float | None = None  # RM only
    truncated: bool = False


@dataclass
class LoadReport:
    """What loading saw: nothing is dropped without being counted here."""

    num_rows: int = 0
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # "source: reason", for the log
    num_truncated: int = 0
    num_truncated_response: int = 0
    num_dropped_responses: int = 0  # prompt kind: responses of pair/KTO/SFT rows left out
    num_identical_pairs: int = 0  # pairs dropped: chosen and rejected tokens identical (no preference)
    identical_pairs: list[str] = field(default_factory=list)  # their sources, for the log


def pairs_to_kto(pairs: list[PreferenceExample]) -> list[KTOExample]:
    """Each pair becomes a desirable (chosen) and an undesirable (rejected) example, in that order."""
    return [KTOExample(p.prompt, answer, label, p.source)
            for p in pairs for answer, label in ((p.chosen, True), (p.rejected, False))]
