"""Each extraction rule against its reference (`tasks.choice`), table-driven.

Every expected value below was derived by reading the reference's code (named in `tasks.choice`, at the
commit recorded there), not by running ours: where a case is not obvious the comment names the branch of
the reference that decides it. `None` means the reference extracts nothing ("" / no candidate); for the
NExT-QA and EgoSchema parsers that is where the reference would draw a random letter instead.
"""

from __future__ import annotations

import string

import pytest

from tasks.choice import RULES, answer_letter, extract

# Video-MME's first template question (evaluation/output_test_template.json), four options
VIDEOMME = ["Apples.", "Candles.", "Berries.", "The three kinds are of the same number."]
# NExT-QA val.csv line 2 (a0..a4)
NEXTQA = ["roll the handle", "tap their feet", "strum the string", "hit with sticks", "pat with hand"]
# EgoSchema questions.json's first record: every option starts with "C", the camera wearer
EGOSCHEMA = ["C stops scrolling to check notifications on their phone, indicating a possible distraction",
             "C briefly stops scrolling to engage in conversation with others, showcasing the social aspect",
             "C interrupts scrolling to type on the laptop, adding variety to the video's main focus",
             "C briefly stops scrolling, showing a drifting focus.",
             "C takes a break to drink from a cup, briefly shifting focus"]  # fmt: skip
FOUR = ["red circle", "blue square", "green triangle", "yellow star"]


def letters(reply: str, options: list[str], rule: str) -> str | set[str] | None:
    """The reference's reading: one letter, None for none, or the set of letters credited."""
    found = extract(reply, options, rule).letters
    return None if not found else next(iter(found)) if len(found) == 1 else set(found)


VIDEOMME_CASES = [
    # (reply, letter, counted). extract_characters_regex: the prefixes removed (case-sensitive, the list
    # as written: two missing commas join "The best option is"+"The correct option is" and "Best answer:"+
    # "Best option:"), then the first capital A-D anywhere; nothing found -> "" and not counted
    ("C. Berries.", "C", True), ("D.", "D", True), ("B", "B", True), ("(B)", "B", True), ("**C**", "C", True),
    ("Answer: C. Jade.", "C", True),  # "Answer:" removed
    ("The best answer is A.", "A", True), ("The answer is A because B is wrong", "A", True),  # first capital
    ("Option A", "A", True), ("It is A.", "A", True), ("My answer: A", "A", True),  # "answer:" not removed
    ("The correct choice is A", "A", True),
    ("Choice A", "C", True),  # the C of "Choice" comes first
    ("Based on the video, the answer is B.", "B", True),  # the B of "Based"
    ("Dogs are shown. The answer is C", "D", True),  # the D of "Dogs"
    ("Best option: (D)", "B", True),  # "Best option:" alone is not in the list: the B of "Best"
    ("Best answer: C", "B", True),  # likewise "Best answer:"
    ("The best option is C", "C", True),  # not removed either, but no capital A-D before the C
    ("The correct answer is (D)", "D", True), ("The correct answer (C) fits", "C", True),
    ("The answer is: D", "D", True), ("Answer: A", "A", True), ("Option: D", "D", True),
    ("Answer:B", "B", True),
    ("The Answer is C", "A", True),  # "The Answer is" is not "The answer is": the A of "Answer"
    ("I think the answer is D.", "D", True), ("I'd say C", "C", True), ("A) apples", "A", True),
    ("\n\nB. Candles.\n", "B", True),
    ("Apples.", "A", True), ("Candles.", "C", True), ("Berries.", "B", True),  # letters inside words
    ("Cannot determine.", "C", True), ("Both A and B", "B", True), ("Clearly, the answer is A", "C", True),
    ("a", None, False), ("d", None, False), ("the answer is b", None, False),  # lower case: nothing
    ("", None, False), ("E", None, False), ("None of the above", None, False),
    ("the video shows a man walking his dog in the park on a sunny day", None, False),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "letter", "counted"), VIDEOMME_CASES)
def test_videomme_authors_script(reply, letter, counted):
    assert letters(reply, VIDEOMME, "videomme") == letter
    assert extract(reply, VIDEOMME, "videomme").counted is counted


LMMS_EVAL_CASES = [
    # extract_mcq_answer over A-D: candidates in each format, the highest priority wins (start 10, end 9,
    # phrase 7, "(X)" 6, "X." 5, "X:" 4, "X)" 3, "X " 2), then the latest position; the fallback (any
    # occurrence) only when no format matched
    ("B", "B"), ("(C)", "C"), ("C", "C"), ("A", "A"),
    ("Option A", "A"), ("It is A.", "A"), ("Choice A", "A"), ("My answer: A", "A"),  # end
    ("The correct choice is A", "A"),  # phrase and end
    ("The answer is A because B is wrong", "B"),  # phrase: A and B both after it, the later one wins
    ("I choose B, since A is incomplete", "A"),  # phrase "i choose": the later A
    ("The correct answer is B: Candles", "C"),  # phrase: the C of "Candles" is later than the B
    ("B because A is wrong", "B"),  # start
    ("A cat is shown", "A"),  # start: "A" then a space (the article counts)
    ("I think (C) is right", "C"), ("(A) Apples", "A"),  # parentheses
    ("Apples.", "A"), ("Candles.", "C"),  # no format: the fallback finds the letter inside the word
    ("Best option: (d)", "B"),  # lower-case d is no candidate; the fallback finds the B of "Best"
    ("Both are wrong", "B"),  # fallback
    ("ABCD", "D"),  # neither start nor end (letters on both sides): fallback, the last position
    ("D. The three kinds are of the same number.", "D"), ("Answer: C. Jade.", "C"),  # start / period
    ("The best answer is C.", "C"), ("The answer is (D).", "D"), ("Answer: D", "D"), ("My choice is D.", "D"),
    ("**C**", "C"),  # no format around the C: fallback
    ("It's D", "D"), ("D\n", "D"), ("D) 3", "D"), ("Definitely B", "B"),  # end, not the D of "Definitely"
    ("A, B or C", "A"), ("C or D?", "C"),  # start beats end
    ("答案是C", "C"),  # phrase "答案是"; not end: "是".isalpha() is True
    ("b", None), ("option c", None), ("the video shows a cat", None), ("", None), ("   ", None),
    ("E", None), ("(E)", None),  # E is not one of the four choices
    ("The image shows a cat", None),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "letter"), LMMS_EVAL_CASES)
def test_lmms_eval_current(reply, letter):
    assert letters(reply, VIDEOMME, "lmms_eval") == letter
    assert extract(reply, VIDEOMME, "lmms_eval").counted  # its Video-MME task counts every reply


ALL4 = {"A", "B", "C", "D"}
MVBENCH_CASES = [
    # check_ans(pred="(" + the reply's first line, gt="(x) text"): the pred's first word, lower-cased, is
    # right for x when (with its dots removed) it lies inside "(x)", or "(x)" lies inside it
    ("A) Piling something up", "A"), ("B) x", "B"), ("A", "A"), ("a", "A"), ("C.", "C"), ("A).", "A"),
    ("(A) x", "A"),  # "((a)" holds "(a)"
    ("C)Drop", "C"), ("  D) 3", "D"), ("d)", "D"), ("b) sitting", "B"), ("B C", "B"), ("A B C", "A"),
    ("B)\nbecause it moves", "B"), (" \nB)", "B"),  # the stripped reply's first line
    ("A) x\nB) y", "A"), ("A). Something", "A"), ("d.", "D"), ("b...", "B"), ("B).", "B"), ("a)", "A"),
    ("c", "C"), ("D", "D"), ("(B)", "B"),
    ("a dog is walking", "A"),  # "(a" lies inside "(a)": the article reads as A
    ("A)B)", "A"),  # "(a)b)" holds "(a)" but not "(b)"
    ("", ALL4),  # pred "(" lies inside every "(x)": an empty reply is right whatever the answer
    (".", ALL4),  # "(." without its dot is "(" again
    ("Best option: (B)", None), ("The answer is C", None), ("Apples", None), ("Option A", None),
    ("Not sure", None), ("E)", None),  # E is not one of the four options
    (")", None), ("(", None), ("A.B", None), ("A,B", None), ("AB", None),
    ("B\tx", None),  # split on " " only: "(b\tx" is neither inside "(b)" nor holds it
]  # fmt: skip


@pytest.mark.parametrize(("reply", "letter"), MVBENCH_CASES)
def test_mvbench_authors_check(reply, letter):
    assert letters(reply, FOUR, "mvbench") == letter
    assert extract(reply, FOUR, "mvbench").counted  # the notebook divides by every question


MCQ_ACC_CASES = [
    # (reply, letter, counted). mcq_acc's process(): "X. text" at the start (A-E, any case); else the
    # reply cleaned (punctuation dropped or spaced, periods dropped), lower-cased, and its first single
    # letter a-e standing as a word; the aggregate counts only non-empty replies
    ("A", "A", True), ("a", "A", True), ("e", "E", True), ("(B)", "B", True), ("C. Berries", "C", True),
    ("D. 3", "D", True), ("D.5", "D", True),  # the "X." branch
    ("The answer is A because B is wrong", "A", True),  # the first single letter
    ("The image shows a cat", "A", True), ("A cat", "A", True),  # the article a is A
    ("I think it's D", "D", True),
    ("it'd be A", "D", True),  # the d after the apostrophe stands as a word
    ("Best option: (C)", "C", True), ("The correct option is (B).", "B", True), ("(c) red", "C", True),
    ("d.", "D", True), ("B. ", "B", True), ("A.", "A", True), ("b.", "B", True),  # no text: periods dropped
    ("Option B", "B", True), ("It's b!", "B", True), ("A/B", "A", True), ("A-B", "A", True),
    ("B, C", "B", True), ("1,2 or B", "B", True), ("**B**", "B", True), ('"C"', "C", True),
    ("\nC\n", "C", True), ("answer: e", "E", True), ("B is the best; A is not", "B", True),
    ("D) 3", "D", True),
    ("E", "E", True),  # a letter, though not one of the four options: wrong, not unparseable
    ("Candles", None, True), ("3", None, True), ("none of them", None, True), ("each", None, True),
    ("Cannot tell", None, True), ("abc", None, True), ("X", None, True), ("The video is dark", None, True),
    ("", None, False),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "letter", "counted"), MCQ_ACC_CASES)
def test_lmms_eval_mvbench_mcq_acc(reply, letter, counted):
    assert letters(reply, FOUR, "lmms_eval_mvbench") == letter
    assert extract(reply, FOUR, "lmms_eval_mvbench").counted is counted


NEXTQA_CASES = [
    # parse_multi_choice_response: edges stripped of , . ! ? ; : ' and padded with spaces; "(X)" anywhere,
    # else "X ", else "X."; else, in more than 5 words, the option texts; several: the latest last
    # occurrence ("(X)" / " X " / the text)
    ("C", "C"), ("(B)", "B"), ("B.", "B"), ("E", "E"), ("E.", "E"), ("A:", "A"), ("'D'", "D"),
    ("C. strum the string", "C"),  # "X." pass
    ("The answer is A because B is wrong", "B"),  # "A " and "B ": " B " is later
    ("(A) roll the handle (B) tap their feet", "B"), ("(A) or (E)", "E"),
    ("(B) A", "B"),  # only the "(X)" pass's candidates count when it has any
    ("A cat", "A"), ("I think it is D", "D"), ("Both A and E are plausible", "E"), ("C or D", "D"),
    ("A B", "B"), ("(C).", "C"), ("Answer: C", "C"), ("The answer: B.", "B"), ("A. roll the handle", "A"),
    ("B.C.", "C"),  # "B.C" padded: "C " (the padding's space) is found before the "X." pass
    ("Definitely E!", "E"), ("It is C.", "C"),
    ("The answer is E. pat with hand", "E"),  # no "X ": the "X." pass
    ("They strum the string with their fingers", "C"),  # 7 words: option C's text
    ("roll the handle and tap their feet together", "B"),  # two texts: B's is later
    ("hit with sticks, I think, is what they do", "D"),
    ("strum the string", None),  # 3 words: texts are not looked for
    ("D) hit with sticks", None), ("A) roll the handle", None),  # "X)" is none of the forms
    ("B, because he taps his feet", None),  # "B," is no form; no text matches
    ("The man hits with sticks and then he pats with hand", None),  # "hits with" is not "hit with"
    ("B\n", None),  # the edges keep the newline: neither "B " nor "B."
    ("AE", "E"),  # " AE ": the E before the padding's space
    ("a", None), ("c", None), ("option b", None), ("I would say (c)", None), ("", None),
    ("he tapped his feet on the floor", None),
]  # fmt: skip


@pytest.mark.parametrize(("reply", "letter"), NEXTQA_CASES)
def test_lmms_eval_nextqa(reply, letter):
    assert letters(reply, NEXTQA, "lmms_eval_nextqa") == letter


EGOSCHEMA_CASES = [
    # EgoSchema's own parse_multi_choice_response: every "(X)", "X " and "X." found is a candidate (the
    # later passes run whatever the earlier found); several: the one whose last occurrence comes first
    ("D", "D"), ("(B)", "B"), ("E", "E"), ("A", "A"), ("A.", "A"), ("B:", "B"), ("'C'", "C"), ("B!", "B"),
    ("(C)", "C"), ("E.\n", "E"), ("Option E.", "E"), ("I pick B", "B"), ("Definitely D", "D"),
    ("The answer is (E)", "E"), ("The correct option is D.", "D"),
    ("The answer is A because B is wrong", "A"),  # "A " comes before "B "
    ("(A) or (E)", "A"), ("(E) (A)", "E"), ("A (B)", "A"), ("A B C", "A"), ("C A", "C"), ("B or D", "B"),
    ("E is right, not A", "E"), ("Both are wrong: E", "E"), ("D.E.", "D"), ("B. C", "B"),
    ("D. C briefly stops scrolling", "D"),  # "D." at 1 before "C " at 4
    ("(D) C briefly stops scrolling", "D"),
    ("E. C takes a break to drink from a cup, briefly shifting focus", "E"),
    ("C briefly stops scrolling, showing a drifting focus.", "C"),  # option D's own text: its "C " wins
    ("C takes a break to drink from a cup, briefly shifting focus", "C"),  # option E's text: "C " again
    ("E) C takes a break", "C"), ("A) C stops", "C"),  # "X)" is no form; "C " is
    ("a", None), ("c", None), ("", None), ("x", None), ("answer is (c)", None), ("D, because", None),
    ("The man drinks from a cup", None),  # 6 words, no form, no option text inside
]  # fmt: skip


@pytest.mark.parametrize(("reply", "letter"), EGOSCHEMA_CASES)
def test_lmms_eval_egoschema(reply, letter):
    assert letters(reply, EGOSCHEMA, "lmms_eval_egoschema") == letter


def test_each_rule_has_at_least_40_cases():
    tables = {"videomme": VIDEOMME_CASES, "lmms_eval": LMMS_EVAL_CASES, "mvbench": MVBENCH_CASES,
              "lmms_eval_mvbench": MCQ_ACC_CASES, "lmms_eval_nextqa": NEXTQA_CASES,
              "lmms_eval_egoschema": EGOSCHEMA_CASES}  # fmt: skip
    assert set(tables) == set(RULES)
    assert all(len(cases) >= 40 for cases in tables.values())


# The same reply with any letter gives that letter wherever the reference does: no letter is special.
# (rule, the letters its reference can give, reply templates that give the letter for each of them)
SYMMETRY = [
    ("videomme", "ABCD", ["{L}", "({L})", "{L}. text", "Answer: {L}", "The answer is {L}.", "Option {L}",
                          "It is {L}.", "My answer: {L}", "The correct answer is ({L})", "\n{L}\n"]),
    ("lmms_eval", string.ascii_uppercase, ["{L}", "({L})", "{L}.", "{L}. text", "Option {L}", "It is {L}.",
                                           "Choice {L}", "My answer: {L}", "The correct choice is {L}",
                                           "The answer is {L}.", "The best answer is ({L})"]),
    ("mvbench", string.ascii_uppercase, ["{L}) text", "{L}", "{l}", "{L}.", "({L}) text", "{L}).",
                                         "{l}) text", "{L}) text\nmore"]),
    ("lmms_eval_mvbench", "ABCDE", ["{L}", "{l}", "({L})", "{L}. text", "Best option: ({L})", "Option {L}",
                                    "The answer is {L}.", "{L}) text"]),
    ("lmms_eval_nextqa", "ABCDE", ["{L}", "({L})", "{L}.", "{L}. text", "Answer: {L}", "I think it is {L}",
                                   "The answer is ({L}) text"]),
    ("lmms_eval_egoschema", "ABCDE", ["{L}", "({L})", "{L}.", "{L}. text", "Option {L}", "I pick {L}",
                                      "The answer is ({L})"]),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "alphabet", "templates"), SYMMETRY, ids=[s[0] for s in SYMMETRY])
def test_no_letter_is_special(rule, alphabet, templates):
    options = [f"option text {i}" for i in range(len(alphabet))]
    for letter in alphabet:
        for template in templates:
            reply = template.format(L=letter, l=letter.lower())
            assert letters(reply, options, rule) == letter, (rule, reply)


def test_the_issue_replies_with_a_parse_like_b_c_and_d():
    """The generic rule (lmms-eval's current one) no longer drops "A" (or "I") as English words."""
    for template in ("Option {L}", "It is {L}.", "Choice {L}", "My answer: {L}", "The correct choice is {L}"):
        assert [letters(template.format(L=x), FOUR, None) for x in "ABCD"] == list("ABCD"), template


def test_unknown_rule_and_answer_letters_are_named():
    with pytest.raises(ValueError, match="rule='gpt' is not one of videomme, mvbench, lmms_eval"):
        extract("A", FOUR, "gpt")
    assert answer_letter({"answer": "c", "options": FOUR}) == "C"
    assert answer_letter({"answer": "Blue square.", "options": FOUR}) == "B"  # one option's text
    with pytest.raises(ValueError, match="row 'q': answer 'E' is not the letter of one of its 4 options"):
        answer_letter({"id": "q", "answer": "E", "options": FOUR})
