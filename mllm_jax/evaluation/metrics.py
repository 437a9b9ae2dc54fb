"""Task metrics as the field reports them, each equal to its reference implementation.

- Captioning: BLEU-1..4 and CIDEr-D computed exactly as pycocoevalcap's ``Bleu(4)`` and ``Cider()``
  (tests compare to 1e-6). ``ptb_tokenize`` is a Java-free stand-in for its PTBTokenizer step.
- VQAv2 accuracy exactly as the official ``vqaEval.py`` (GT-Vision-Lab/VQA, commit a013f00), including
  its quirks, so numbers are comparable with published ones.
- Exact match for short answers, grounding accuracy at an IoU threshold, retrieval recall@k.

Every function is pure (no state, no I/O) and takes plain Python / numpy inputs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Captioning: tokenisation
# ---------------------------------------------------------------------------------------------------------

# pycocoevalcap drops exactly these tokens after PTB tokenisation. The bracket names are uppercase but the
# tokenizer runs with -lowerCase, so "-lrb-" etc. survive in the real pipeline too (kept here on purpose).
PTB_REMOVED = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-"] + list(".?!,:-;") + ["--", "..."]
)
# Words whose final period PTB keeps (checked against stanford-corenlp 3.4.1 as shipped by pycocoevalcap).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr jr sr st mt vs etc prof inc ltd co corp bros gen gov sen rep lt col sgt capt ave blvd rd "
    "dept est al cf ft jan feb mar apr aug sept oct nov dec".split()
)
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_SPLIT_WORDS |= {"gimme": "gim me", "lemme": "lem me"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TEXT_RULES = (  # (pattern, replacement) applied in order to the lowercased text
    (re.compile(r"&amp;"), "&"),
    (re.compile(r'["`]'), " "),  # double quotes become `` / '' in PTB, both removed
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m.group()]} "),
    (re.compile(r"\.\.\.|--|;|[!?]+"), r" \g<0> "),
    (re.compile(r"(?<!\d)[,:]|[,:](?!\d)"), r" \g<0> "),  # "1,000" and "10:30" stay one token
    (re.compile(r"(\d:\d\d)(am|pm)\b"), r"\1 \2"),
    (re.compile(r"[$%+=*]|#(?=\d)"), r" \g<0> "),
)
_KEEP_WORDS = frozenset(
    ["...", "--", "'n'", "n't", "'s", "'re", "'ve", "'m", "'ll", "'d", *_BRACKETS.values()]
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'m|'ll|'d)$")


def _ptb_word(word: str) -> list[str]:
    """One whitespace-separated word -> PTB tokens (before punctuation removal)."""
    if word in _SPLIT_WORDS:
        return _SPLIT_WORDS[word].split()
    if word in _KEEP_WORDS or re.fullmatch(r"'\d+s?", word):  # "rock 'n' roll", "the '90s": kept whole
        return [word]
    head, tail = [], []
    while len(word) > 1 and word[0] in "'-":
        head.append(word[0])
        word = word[1:]
    if word.endswith(".") and len(word) > 1:
        stem = word[:-1]
        keeps = stem in _ABBREVIATIONS or re.fullmatch(r"[a-z](\.[a-z])*", stem)  # "mr.", "u.s.", "a."
        if not keeps:
            word, tail = stem, ["."]
    while len(word) > 1 and word[-1] in "'-":
        tail.insert(0, word[-1])
        word = word[:-1]
    m = _CLITIC.match(word)
    return head + ([m.group(1), m.group(2)] if m else [word]) + tail


def ptb_tokenize(text: str) -> str:
    """Java-free approximation of pycocoevalcap's ``PTBTokenizer().tokenize`` for one caption.

    Lowercases, splits clitics (``"dog's"`` -> ``"dog 's"``, ``"can't"`` -> ``"ca n't"``) and punctuation
    as Stanford's PTBTokenizer does, then removes the tokens pycocoevalcap removes (``PTB_REMOVED``).
    It agrees with the Java tokenizer on ordinary English captions (tests compare the two where Java is
    installed); exotic input (URLs, emoticons, unknown abbreviations) may tokenise differently.
    """
    text = " ".join(text.lower().split())
    for pattern, repl in _TEXT_RULES:
        text = pattern.sub(repl, text)
    tokens = [t for word in text.split() for t in _ptb_word(word)]
    return " ".join(t for t in tokens if t and t not in PTB_REMOVED)


# ---------------------------------------------------------------------------------------------------------
# Captioning: BLEU and CIDEr-D (inputs: {image_key: [reference, ...]} and {image_key: hypothesis})
# ---------------------------------------------------------------------------------------------------------


def _check_captions(references: Mapping, hypotheses: Mapping) -> list[Hashable]:
    if not references:
        raise ValueError("captioning metrics need at least one image")
    if set(references) != set(hypotheses):
        missing = sorted(map(str, set(references) ^ set(hypotheses)))[:5]
        raise ValueError(f"references and hypotheses must have the same image keys; differing: {missing}")
    for key, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{key!r}] must be a non-empty list of strings")
        if not isinstance(hypotheses[key], str):
            raise ValueError(f"hypotheses[{key!r}] must be one string, got {type(hypotheses[key]).__name__}")
    return list(references)  # pycocoevalcap iterates the references' key order


def _ngrams(sentence: str, n: int) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _bleu_from_counts(correct, guess, testlen, reflen, n: int) -> list[float]:
    """Cumulative BLEU-1..n with pycocoevalcap's smoothing constants and brevity penalty."""
    tiny, small = 1e-15, 1e-9
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(
    references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], n: int = 4
) -> tuple[list[float], np.ndarray]:
    """Corpus BLEU-1..n and per-image BLEU, as pycocoevalcap ``Bleu(n).compute_score``.

    Inputs are pre-tokenised (space-separated) strings. The effective reference length of each image is
    the "closest" one (ties to the shorter); clipped n-gram counts and lengths are summed over the corpus.
    Returns ``(corpus [n], per_image f64[n, num_images])`` with images in ``references`` order.
    """
    keys = _check_captions(references, hypotheses)
    total_correct, total_guess = [0] * n, [0] * n
    total_test = total_ref = 0
    per_image = []
    for key in keys:
        ref_lens = [len(r.split()) for r in references[key]]
        max_counts: dict = {}
        for ref in references[key]:
            for gram, c in _ngrams(ref, n).items():
                max_counts[gram] = max(max_counts.get(gram, 0), c)
        counts = _ngrams(hypotheses[key], n)
        testlen = len(hypotheses[key].split())
        reflen = min((abs(rl - testlen), rl) for rl in ref_lens)[1]
        guess = [max(0, testlen - k) for k in range(n)]
        correct = [0] * n
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), c)
        per_image.append(_bleu_from_counts(correct, guess, testlen, reflen, n))
        total_correct = [a + b for a, b in zip(total_correct, correct, strict=True)]
        total_guess = [a + b for a, b in zip(total_guess, guess, strict=True)]
        total_test, total_ref = total_test + testlen, total_ref + reflen
    corpus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref, n)
    return corpus, np.array(per_image, np.float64).T.reshape(n, len(keys))


def _tfidf(counts: Counter, doc_freq: Counter, log_num_images: float, n: int):
    """n-gram counts -> (per-order tf-idf dicts, per-order norms, length) as CiderScorer.counts2vec."""
    vec = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        vec[k][gram] = w = tf * (log_num_images - math.log(max(1.0, doc_freq[gram])))
        norm[k] += w * w
        if k == 1:  # pycocoevalcap's length counts bigrams (its `n == 1`); kept, though where the
            # similarity is non-zero both sides have words, so the difference equals the word-count one
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d(
    references: Mapping[Hashable, Sequence[str]],
    hypotheses: Mapping[Hashable, str],
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, np.ndarray]:
    """CIDEr-D (corpus mean, per-image f64[num_images]), as pycocoevalcap ``Cider().compute_score``.

    tf-idf n-gram vectors (n = 1..4) with document frequencies over the references of the images being
    scored (so the score depends on the evaluated set), hypothesis weights clipped to the reference's,
    a Gaussian length penalty ``exp(-delta^2 / (2 sigma^2))``, averaged over orders and references, x10.
    """
    keys = _check_captions(references, hypotheses)
    ref_counts = [[_ngrams(r, n) for r in references[key]] for key in keys]
    doc_freq = Counter(gram for refs in ref_counts for gram in set().union(*refs))
    log_num_images = math.log(float(len(keys)))
    scores = []
    for key, refs in zip(keys, ref_counts, strict=True):
        vec, norm, length = _tfidf(_ngrams(hypotheses[key], n), doc_freq, log_num_images, n)
        total = np.zeros(n)
        for ref in refs:
            vec_r, norm_r, length_r = _tfidf(ref, doc_freq, log_num_images, n)
            penalty = np.e ** (-(float(length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(np.mean(total) / len(refs) * 10.0)
    per_image = np.array(scores, np.float64)
    return float(np.mean(per_image)), per_image


def caption_scores(
    references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], tokenize: bool = True
) -> dict[str, float]:
    """``{"BLEU-1".."BLEU-4", "CIDEr"}`` for raw captions (``tokenize``: apply ``ptb_tokenize`` first)."""
    if tokenize:
        references = {k: [ptb_tokenize(r) for r in refs] for k, refs in references.items()}
        hypotheses = {k: ptb_tokenize(h) for k, h in hypotheses.items()}
    corpus_bleu, _ = bleu(references, hypotheses, 4)
    return {
        **{f"BLEU-{k + 1}": s for k, s in enumerate(corpus_bleu)},
        "CIDEr": cider_d(references, hypotheses)[0],
    }


# ---------------------------------------------------------------------------------------------------------
# VQAv2 accuracy and exact match
# ---------------------------------------------------------------------------------------------------------

# The official contractions table, verbatim (including its oddities, e.g. "somebody'd" -> "somebodyd").
_CONTRACTIONS = dict(
    pair.split("=")
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've
whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split()
)
_NUMBER_WORDS = dict(
    pair.split("=")
    for pair in "none=0 zero=0 one=1 two=2 three=3 four=4 five=5 six=6 seven=7 eight=8 nine=9 ten=10".split()
)
_ARTICLES = frozenset(["a", "an", "the"])
_VQA_PUNCT = tuple(';/[]"{}()=+\\_-><@`,?!')  # the official list, in its order
# The official pattern, verbatim: "(?!<=\d)" is a typo'd lookbehind (a lookahead that never fails here),
# so this removes every period not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _vqa_strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
    out = text
    number_with_comma = _COMMA_STRIP.search(text) is not None
    for p in _VQA_PUNCT:  # deleted where it touches a space (or the text has "1,000"), else a space
        out = out.replace(p, "" if (p + " " in text or " " + p in text or number_with_comma) else " ")
    # vqaEval passes re.UNICODE (== 32) positionally, i.e. as `count`: at most 32 periods go.
    return _PERIOD_STRIP.sub("", out, count=32)


def _vqa_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQA eval script's answer normalisation: whitespace, punctuation rules, lowercase, number words
    to digits, articles dropped, contractions restored (``"Two dogs."`` -> ``"2 dogs"``)."""
    return _vqa_digits_articles(_vqa_punctuation(_vqa_strip(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (10 in VQAv2), in [0, 1].

    Mean over the leave-one-out subsets of the answers of ``min(#matching answers in the subset / 3, 1)``.
    As in the official script, answers and prediction are normalised only when the humans disagree: if
    all answers are identical strings, the prediction must match them verbatim (after whitespace strip).
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    gts = [_vqa_strip(a) for a in answers]
    pred = _vqa_strip(prediction)
    if len(set(gts)) > 1:
        gts = [_vqa_digits_articles(_vqa_punctuation(a)) for a in gts]
        pred = _vqa_digits_articles(_vqa_punctuation(pred))
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def mean_vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean ``vqa_accuracy`` over questions (the official "overall" is 100x this, rounded to 2 places)."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(
            f"need as many predictions as answer lists (>0): {len(predictions)} vs {len(answers)}"
        )
    return float(np.mean([vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)]))


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals one of the normalised answers (``normalize_answer``)."""
    answers = [answers] if isinstance(answers, str) else answers
    return float(normalize_answer(prediction) in {normalize_answer(a) for a in answers})


# ---------------------------------------------------------------------------------------------------------
# Grounding and retrieval
# ---------------------------------------------------------------------------------------------------------


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes ``(x0, y0, x1, y1)`` in continuous coordinates; an inverted box has area 0."""
    if len(a) != 4 or len(b) != 4:
        raise ValueError(f"boxes must be (x0, y0, x1, y1), got {a!r} and {b!r}")
    area = lambda x0, y0, x1, y1: max(0.0, x1 - x0) * max(0.0, y1 - y0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(
    predictions: Sequence[Sequence[float] | None], targets: Sequence[Sequence[float]], threshold: float = 0.5
) -> float:
    """Fraction of predicted boxes with IoU >= ``threshold`` against their target (``None``: a miss, e.g.
    an output without a parseable box)."""
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"need as many predictions as targets (>0): {len(predictions)} vs {len(targets)}")
    hits = [p is not None and box_iou(p, t) >= threshold for p, t in zip(predictions, targets, strict=True)]
    return float(np.mean(hits))


def recall_at_k(
    similarity_QxC: np.ndarray, positives: Sequence[int | Iterable[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Retrieval recall@k: the fraction of queries with a positive candidate among the top k.

    ``similarity_QxC[q, c]`` scores candidate ``c`` for query ``q``; ``positives[q]`` is the index (or
    indices, e.g. the 5 captions of an image) of its correct candidates. A query's rank is the number of
    negatives scoring at least as high as its best positive, so ties count against the model.
    """
    sim = np.asarray(similarity_QxC, np.float64)
    if sim.ndim != 2 or len(positives) != sim.shape[0]:
        raise ValueError(
            f"similarity must be [queries, candidates] with one positives entry per query: {sim.shape}"
        )
    ranks = np.empty(sim.shape[0], np.int64)
    for q, pos in enumerate(positives):
        idx = np.array([pos] if isinstance(pos, int | np.integer) else list(pos), np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= sim.shape[1]:
            raise ValueError(f"positives[{q}] must be candidate indices in [0, {sim.shape[1]}), got {pos!r}")
        negative = np.ones(sim.shape[1], bool)
        negative[idx] = False
        ranks[q] = np.count_nonzero(sim[q, negative] >= sim[q, idx].max())
    return {int(k): float(np.mean(ranks < k)) for k in ks}
