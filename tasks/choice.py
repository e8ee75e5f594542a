"""Multiple-choice answer extraction: each published set's reference rule, reimplemented exactly.

A rule reads a model's reply and the question's options and returns an `Extraction`: the letters its
reference counts as the reply's choice (a reply is right when the correct letter is among them; almost
always one letter, but MVBench's own check credits a bare "(" with every option) and whether the
reference counts the reply in its accuracy at all (Video-MME's script leaves replies it cannot read out
of the denominator; lmms-eval's MVBench leaves out empty replies). Letters are A, B, C, ... for the
options in order.

Rules (`RULES`, chosen per set by `tasks.TASKS[...].rule`, any of them by `score.rule` / `--rule`):

- `videomme`: Video-MME's own `eval_your_results.py` (`extract_characters_regex`), thanku-all/parse_answer
  at afd52cfe3dde5b3685e0d4f760c10c756860c758, the script Video-MME's README points to.
- `mvbench`: MVBench's own `check_ans` (OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb at
  4dd8210b030374bb0c510a57dfbe916f70d3ef71): "(" (the answer prompt's last character) + the reply's first
  line, compared word-wise with "(X) text".
- `lmms_eval`: lmms-eval's current shared extractor `extract_mcq_answer`
  (lmms_eval/tasks/_task_utils/mcq_extract.py at 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3, what its
  Video-MME task uses), over the options' letters: the generic manifest's rule.
- `lmms_eval_mvbench`: lmms-eval's MVBench `mcq_acc` (tasks/mvbench/utils.py, same commit).
- `lmms_eval_nextqa`: lmms-eval's NExT-QA `parse_multi_choice_response` (tasks/nextqa/utils.py, same
  commit, from MMMU), with the option texts.
- `lmms_eval_egoschema`: lmms-eval's EgoSchema `parse_multi_choice_response` (tasks/egoschema/utils.py,
  same commit): its own variant, which takes the earliest of the last occurrences.

The one deliberate difference: where lmms-eval's NExT-QA and EgoSchema parsers find nothing they pick a
random letter (`random.choice`); here such a reply chooses nothing (counted, wrong, `unparseable`), so a
score never depends on a random draw.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Extraction:
    """What a reference rule makes of one reply."""

    letters: frozenset[str]  # the options it counts as chosen (empty: none)
    counted: bool = True  # whether its accuracy counts this reply (its denominator)

    @property
    def letter(self) -> str | None:
        """The chosen letter when exactly one is credited, else None."""
        return next(iter(self.letters)) if len(self.letters) == 1 else None


@dataclass(frozen=True)
class Rule:
    """A named extraction rule and where it comes from."""

    name: str
    reference: str
    extract: Callable[[str, Sequence[str]], Extraction]


def _one(letter: str | None, counted: bool = True) -> Extraction:
    return Extraction(frozenset({letter} if letter else ()), counted)


# ------------------------------------------------------------------ Video-MME's eval_your_results.py

# The script's list as written: two missing commas join "The best option is" with "The correct option
# is", and "Best answer:" with "Best option:", so neither of those four is removed on its own.
VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                     "The best option isThe correct option is", "Best answer:Best option:", "Answer:",
                     "Option:", "The correct answer", "The correct option")  # fmt: skip


def extract_videomme(reply: str, options: Sequence[str]) -> Extraction:
    """`extract_characters_regex`: the prefixes removed (case-sensitive), then the first capital A-D
    anywhere; more than 10 words without one, or none at all, is not extracted and not counted."""
    text = reply.strip()
    for prefix in VIDEOMME_PREFIXES:
        text = text.replace(prefix, "")
    match = re.search("[ABCD]", text)
    return _one(match[0], True) if match else _one(None, False)


# ---------------------------------------------------------------- MVBench's check_ans (mvbench.ipynb)

MVBENCH_RETURN_PROMPT = "("  # mvbench.ipynb's return_prompt: its answer prompt "Best option:(" ends so


def extract_mvbench(reply: str, options: Sequence[str]) -> Extraction:
    """`check_ans(pred, gt)` with pred = "(" + the reply's first line and gt = "(X) text": right when the
    pred's first word (dots removed) is inside "(x)", or "(x)" is inside that word, lower-cased."""
    pred = MVBENCH_RETURN_PROMPT + reply.strip().split("\n")[0]
    first = pred.lower().split(" ")[0]
    credited = [letter for letter in LETTERS[: len(options)]
                if first.replace(".", "") in f"({letter.lower()})" or f"({letter.lower()})" in first]
    return Extraction(frozenset(credited))


# -------------------------------------------------------------- lmms-eval's mcq_extract (current rule)

_MCQ_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is",
                "the best answer is", "best answer is", "the correct option is", "correct option is",
                "the best option is", "best option is", "the choice is", "choice is", "the correct choice is",
                "correct choice is", "i choose", "i select", "i pick", "my answer is", "my choice is",
                "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")  # fmt: skip
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                 "right_paren": 3, "space": 2, "fallback": 0}  # fmt: skip


def extract_lmms_eval(reply: str, options: Sequence[str]) -> Extraction:
    """`extract_mcq_answer(reply, choices)` over the options' letters: candidates in ten formats, the
    highest-priority format wins, and within it the last position."""
    choices = LETTERS[: len(options)]
    if not reply or not reply.strip():
        return _one(None)
    text = reply.strip()
    for char in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(char)
    text = f" {text} "
    candidates: list[tuple[str, int, str]] = []
    for form, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"),
                          ("right_paren", "{})"), ("space", "{} ")):  # fmt: skip
        candidates += [(ch, text.rfind(pattern.format(ch)), form) for ch in choices
                       if pattern.format(ch) in text]
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            after = at + len(phrase)
            candidates += [(ch, text.find(ch, after), "phrase") for ch in choices
                           if text.find(ch, after) != -1]
    stripped = text.strip()
    candidates += [(ch, 0, "start") for ch in choices
                   if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha())]
    candidates += [(ch, len(text) - 1, "end") for ch in choices
                   if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha())]
    if not candidates:
        candidates = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not candidates:
        return _one(None)
    return _one(max(candidates, key=lambda c: (_MCQ_PRIORITY[c[2]], c[1]))[0])


# ------------------------------------------------------------------------ lmms-eval's MVBench mcq_acc

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!")  # fmt: skip


def _mvbench_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, 32)  # the reference passes re.UNICODE (32) as the count


def _mvbench_process(answer: str) -> str:
    match = re.match(r"^([A-E])\.\s*(.+)$", answer.strip(), re.IGNORECASE)
    if match:
        return match.group(1).upper()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    answer = _mvbench_punctuation(answer)
    answer = answer.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", answer, re.IGNORECASE)
    return letter.group(1).upper() if letter else answer


def extract_lmms_eval_mvbench(reply: str, options: Sequence[str]) -> Extraction:
    """`mcq_acc`: "X. text" at the start, else the first single letter a-e standing as a word after its
    punctuation clean-up (any case: the article "a" is A); the accuracy counts non-empty replies only."""
    processed = _mvbench_process(reply)
    chosen = processed if len(processed) == 1 and processed in "ABCDE" else None
    return _one(chosen, reply != "")


# ------------------------------------------------ lmms-eval's parse_multi_choice_response (two variants)


def _strip_edges(reply: str) -> str:
    for char in (",", ".", "!", "?", ";", ":", "'"):
        reply = reply.strip(char)
    return f" {reply} "


def _texts(options: Sequence[str]) -> dict[str, str]:
    return {letter: str(text).strip() for letter, text in zip(LETTERS, options, strict=False)}


def extract_lmms_eval_nextqa(reply: str, options: Sequence[str]) -> Extraction:
    """NExT-QA's parser: "(X)" anywhere, else "X " , else "X."; failing those, in a reply of more than 5
    words, the option texts it contains; several candidates: the one whose last occurrence is latest."""
    index2ans, choices = _texts(options), LETTERS[: len(options)]
    response = _strip_edges(reply)
    candidates = [ch for ch in choices if f"({ch})" in response]
    bracketed, by_index = bool(candidates), True
    if not candidates:
        candidates = [ch for ch in choices if f"{ch} " in response]
    if not candidates:
        candidates = [ch for ch in choices if f"{ch}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [ch for ch, text in index2ans.items() if text.lower() in response.lower()]
        by_index = not candidates
    if len(candidates) <= 1:
        return _one(candidates[0] if candidates else None)
    if not by_index:
        starts = [response.lower().rfind(index2ans[ch].lower()) for ch in candidates]
    elif bracketed:
        starts = [response.rfind(f"({ch})") for ch in candidates]
    else:
        starts = [response.rfind(f" {ch} ") for ch in candidates]
    return _one(candidates[starts.index(max(starts))])  # np.argmax: the first of equal maxima


def extract_lmms_eval_egoschema(reply: str, options: Sequence[str]) -> Extraction:
    """EgoSchema's parser: every "(X)", "X " and "X." form found is a candidate (not only the first kind);
    failing those, the option texts in a reply of more than 5 words; several: the one whose last
    occurrence comes first."""
    index2ans, choices = _texts(options), LETTERS[: len(options)]
    response = _strip_edges(reply)
    candidates = [form.format(ch) for form in ("({})", "{} ", "{}.") for ch in choices
                  if form.format(ch) in response]
    by_index = True
    if not candidates and len(response.split()) > 5:
        candidates = [ch for ch, text in index2ans.items() if text.lower() in response.lower()]
        by_index = not candidates
    if not candidates:
        return _one(None)
    if by_index:
        starts = [response.rfind(candidate) for candidate in candidates]
    else:
        starts = [response.lower().rfind(index2ans[ch].lower()) for ch in candidates]
    chosen = candidates[starts.index(min(starts))]  # np.argmin: the first of equal minima
    return _one(chosen.replace("(", "").replace(")", "").replace(".", "").strip())


LMMS_EVAL = "EvolvingLMMs-Lab/lmms-eval@75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3"
RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("videomme", "thanku-all/parse_answer@afd52cfe3dde5b3685e0d4f760c10c756860c758 "
                     "eval_your_results.py extract_characters_regex", extract_videomme),
    Rule("mvbench", "OpenGVLab/Ask-Anything@4dd8210b030374bb0c510a57dfbe916f70d3ef71 "
                    "video_chat2/mvbench.ipynb check_ans", extract_mvbench),
    Rule("lmms_eval", f"{LMMS_EVAL} lmms_eval/tasks/_task_utils/mcq_extract.py extract_mcq_answer",
         extract_lmms_eval),
    Rule("lmms_eval_mvbench", f"{LMMS_EVAL} lmms_eval/tasks/mvbench/utils.py mcq_acc",
         extract_lmms_eval_mvbench),
    Rule("lmms_eval_nextqa", f"{LMMS_EVAL} lmms_eval/tasks/nextqa/utils.py parse_multi_choice_response",
         extract_lmms_eval_nextqa),
    Rule("lmms_eval_egoschema", f"{LMMS_EVAL} lmms_eval/tasks/egoschema/utils.py "
                                "parse_multi_choice_response", extract_lmms_eval_egoschema),
)}  # fmt: skip
DEFAULT_RULE = "lmms_eval"  # the generic manifest's


def rule_named(name: str | None) -> Rule:
    """`RULES[name]` (None: the generic `DEFAULT_RULE`), or a ValueError naming the known rules."""
    if name is None:
        return RULES[DEFAULT_RULE]
    if name not in RULES:
        raise ValueError(f"rule={name!r} is not one of {', '.join(RULES)}")
    return RULES[name]


def extract(reply: object, options: Sequence[str], rule: str | None = None) -> Extraction:
    """`rule`'s reading of a reply (None or an empty reply: nothing chosen, still counted by rules that
    count every reply)."""
    return rule_named(rule).extract("" if reply is None else str(reply), options)


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = {"a", "an", "the"}


def normalize(text: object) -> str:
    """Lowercase, punctuation removed, articles dropped, whitespace collapsed; None -> ''."""
    if text is None:
        return ""
    words = _PUNCTUATION.sub(" ", str(text).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def answer_letter(row: dict) -> str:
    """The correct letter of a multiple-choice row: its `answer` as a letter (any case), or as exactly one
    option's text (normalised)."""
    options, answer = row["options"], str(row["answer"]).strip()
    if len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
        return answer.upper()
    texts = [normalize(option) for option in options]
    if normalize(answer) and texts.count(normalize(answer)) == 1:
        return LETTERS[texts.index(normalize(answer))]
    raise ValueError(f"row {row.get('id')!r}: answer {row['answer']!r} is not the letter of one of its "
                     f"{len(options)} options")
