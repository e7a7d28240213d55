"""gen_qa metrics: a model's answer against one or more reference answers.

Per row, each metric is the best over the references (SQuAD's and HELM's rule); the aggregate is the mean over rows,
except BLEU, which is sacrebleu's corpus BLEU. Values lie in [0, 1], BLEU in [0, 100] (sacrebleu's scale).

    exact_match        SQuAD v1.1: normalize_answer(pred) == normalize_answer(gold)
    f1                 SQuAD v1.1: token F1 with multiset (Counter) overlap of normalised tokens
    quasi_exact_match  HELM: 0 for an empty prediction, else normalised equality
    quasi_f1           HELM: nltk f_measure over the SETS of normalised tokens (differs from f1 on repeats)
    rouge1/2/L         rouge-score's F-measure (Porter stemmer on by default, as HELM); text with Chinese or
                       Japanese characters gets one token per character (rouge-score alone drops them all)
    bleu               sacrebleu sentence BLEU per row; corpus BLEU in the aggregate; 'zh' tokenisation when a
                       reference holds Chinese characters, else '13a'

The definitions follow ../shared/eval/REFERENCE.md; tests check them against metric_test_vectors.json.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from functools import lru_cache

# Row shapes, first match wins: When2Call rows (question, answers, correct_answer: the correct behaviour's answer);
# the prompt under one of PROMPT_KEYS and the answer under one of REFERENCE_KEYS (Nova's gen_qa rows are
# query/response, MedicalGPT's question/answer); else a preference row in any training format, whose chosen answer
# is the reference.
PROMPT_KEYS = ("prompt", "messages", "query", "question")
REFERENCE_KEYS = ("reference", "references", "response", "answer")

METRICS = ("exact_match", "f1", "quasi_exact_match", "quasi_f1", "rouge1", "rouge2", "rougeL", "bleu")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
EXAMPLES = 5  # rows shown side by side in results.json

# Han ideographs (with extensions and compatibility forms) and kana: scripts written without spaces.
_CJK_CHAR = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])")
_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def has_cjk(text: str) -> bool:
    return bool(_CJK_CHAR.search(text))


# The SQuAD v1.1 script and HELM's normalize_text are the same pipeline; written here because the only packaged
# copies (evaluate's "squad", crfm-helm) need the hub or pull a whole framework.
def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def squad_f1(prediction: str, reference: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(reference).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def quasi_exact_match(prediction: str, reference: str) -> float:
    if not prediction:
        return 0.0
    return float(normalize_answer(reference) == normalize_answer(prediction))


def quasi_f1(prediction: str, reference: str) -> float:
    from nltk.metrics.scores import f_measure

    score = f_measure(set(normalize_answer(reference).split()), set(normalize_answer(prediction).split()))
    return 0.0 if score is None else float(score)


class CjkAwareTokenizer:
    """rouge-score's tokeniser, except that each Chinese/Japanese character is a token of its own.

    Text without such characters goes through rouge-score's tokeniser unchanged, so English scores are identical.
    """

    def __init__(self, use_stemmer: bool):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        from rouge_score import tokenize

        tokens: list[str] = []
        for piece in _CJK_CHAR.split(text):
            if _CJK_CHAR.fullmatch(piece):
                tokens.append(piece)
            elif piece:
                tokens.extend(tokenize.tokenize(piece, self._stemmer))
        return tokens


@lru_cache(maxsize=4)
def rouge_scorer(use_stemmer: bool = True, cjk_chars: bool = True):
    from rouge_score import rouge_scorer as rs

    tokenizer = CjkAwareTokenizer(use_stemmer) if cjk_chars else None
    return rs.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer, tokenizer=tokenizer)


def rouge_f(prediction: str, reference: str, *, use_stemmer: bool = True, cjk_chars: bool = True) -> dict:
    scores = rouge_scorer(use_stemmer, cjk_chars).score(reference, prediction)  # target first
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def bleu_tokenizer(references: list[str]) -> str:
    return "zh" if any(has_cjk(r) for r in references) else "13a"


def sentence_bleu(prediction: str, references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, references, tokenize=bleu_tokenizer(references)).score)


def corpus_bleu(predictions: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU; rows with fewer references are padded with None (sacrebleu skips those)."""
    import sacrebleu

    if not predictions:
        return 0.0
    width = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    tokenize = bleu_tokenizer([r for refs in references for r in refs])
    return float(sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize).score)


def as_references(reference) -> list[str]:
    """A row's reference: one string or a list of strings (any of which counts as right)."""
    refs = [reference] if isinstance(reference, str) else [str(r) for r in reference]
    assert refs, "rows without references are rejected when the data is read"
    return refs


def score_row(prediction: str, reference, *, use_stemmer: bool = True, cjk_chars: bool = True) -> dict:
    """Every metric for one answer; each is its best over the references."""
    refs = as_references(reference)
    row = {
        "exact_match": max(squad_exact_match(prediction, r) for r in refs),
        "f1": max(squad_f1(prediction, r) for r in refs),
        "quasi_exact_match": max(quasi_exact_match(prediction, r) for r in refs),
        "quasi_f1": max(quasi_f1(prediction, r) for r in refs),
    }
    rouges = [rouge_f(prediction, r, use_stemmer=use_stemmer, cjk_chars=cjk_chars) for r in refs]
    row.update({name: max(s[name] for s in rouges) for name in ROUGE_TYPES})
    row["bleu"] = sentence_bleu(prediction, refs)
    return row


def aggregate(row_scores: list[dict], predictions: list[str], references: list) -> dict:
    """Means over rows; BLEU is corpus BLEU over all rows (sacrebleu's definition, not a mean of sentences)."""
    n = len(row_scores)
    out = {name: (sum(r[name] for r in row_scores) / n if n else 0.0) for name in METRICS if name != "bleu"}
    out["bleu"] = corpus_bleu(list(predictions), [as_references(r) for r in references])
    return out


def score_predictions(predictions: list[str], references: list, *, use_stemmer: bool = True,
                      cjk_chars: bool = True) -> tuple[list[dict], dict]:
    """(per-row scores, aggregate scores) for aligned lists of predictions and references."""
    assert len(predictions) == len(references), "one prediction per reference"
    rows = [score_row(p, r, use_stemmer=use_stemmer, cjk_chars=cjk_chars) for p, r in zip(predictions, references)]
    return rows, aggregate(rows, predictions, references)


# ---- reading evaluation rows ----


def _prompt_turns(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError("the prompt must be a string or a non-empty list of {role, content} messages")


def _reference(value):
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(r, str) and r.strip() for r in value):
        return list(value)
    raise ValueError("the reference must be a non-empty string or a non-empty list of strings")


def qa_fields(obj: dict) -> dict | None:
    """{"messages", "system", "reference", "tools"} of a question/answer row, or None when it is not one.

    Raises ValueError (with the reason) for a row that is one but is broken.
    """
    if isinstance(obj.get("answers"), dict) and "correct_answer" in obj and "question" in obj:  # When2Call
        tools = obj.get("tools")
        tools = json.dumps([json.loads(t) if isinstance(t, str) else t for t in tools]) if tools else None
        return {"messages": _prompt_turns(obj["question"]), "system": None, "tools": tools,
                "reference": _reference(obj["answers"].get(obj["correct_answer"]))}
    prompt_key = next((k for k in PROMPT_KEYS if k in obj), None)
    reference_key = next((k for k in REFERENCE_KEYS if k in obj), None)
    if reference_key is None:
        return None  # perhaps a preference pair: the caller asks the training formats
    if prompt_key is None:
        raise ValueError(f"no prompt: the row has {reference_key!r} but none of {', '.join(PROMPT_KEYS)}")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("system must be a string")
    return {"messages": _prompt_turns(obj[prompt_key]), "system": system or None, "tools": None,
            "reference": _reference(obj[reference_key])}


def read_qa_rows(path: str, *, fmt: str = "auto", key_map: dict | None = None,
                 max_rows: int | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows {"messages", "system", "tools", "reference", "source"}, bad rows [(file:line, reason)]).

    A preference row in any training format becomes a row whose reference is its chosen answer; one with images
    (Nova) keeps them as "media" (core/data/record.py), which generation hands to a vision-language model.
    """
    from core import storage
    from core.data.formats import parse_line
    from core.data.raw_rows import data_files, iter_raw_rows

    rows, bad, file_format = [], [], {}
    for file in data_files([path]):
        fs = storage.filesystem_for(file)[0] if storage.is_remote(file) else None
        for text, source in iter_raw_rows(file, fs):
            if max_rows is not None and len(rows) >= max_rows:
                return rows, bad
            try:
                obj = json.loads(text)
                obj = {(key_map or {}).get(k, k): v for k, v in obj.items()} if isinstance(obj, dict) else obj
                fields = qa_fields(obj) if isinstance(obj, dict) else None
            except (ValueError, TypeError, AttributeError) as err:
                bad.append((source, str(err)))
                continue
            if fields is None:
                record, reason = parse_line(text, source, fmt, key_map, file_format)
                if record is None:
                    prompt_key = next((k for k in PROMPT_KEYS if k in obj), None) if isinstance(obj, dict) else None
                    bad.append((source, f"no reference answer: the row has {prompt_key!r} but none of "
                                        f"{', '.join(REFERENCE_KEYS)}, and is no preference pair ({reason})"
                                if prompt_key else f"neither a question/answer row nor a preference pair: {reason}"))
                    continue
                fields = {"messages": record["prompt"], "system": record["system"], "tools": record["tools"],
                          "reference": record["chosen"]} | ({"media": record["media"]} if record["media"] else {})
            rows.append({**fields, "source": source})
    return rows, bad


# ---- the task: generate with each model, score against the references ----


def last_user_turn(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def evaluate(rows: list[dict], models: list[dict], generation, *, use_stemmer: bool = True, workers: int = 1,
             use_gpu: bool = False) -> tuple[dict, list[dict], list[dict]]:
    """(per-model entries, per-row records, examples) for rows from read_qa_rows and models [{"label", "path"}].

    generation: a generate.GenerationSettings. An entry is {"path", "metrics", "n", "truncated", "truncated_rate"}
    where truncated counts the answers that hit max_new_tokens without ending.
    """
    from core.generate import generate_answers

    references = [r["reference"] for r in rows]
    per_row = [{"source": r["source"], "messages": r["messages"], "system": r["system"], "reference": r["reference"]}
               for r in rows]
    entries = {}
    for model in models:
        answers = generate_answers(rows, model["path"], generation, workers=workers, use_gpu=use_gpu)
        scores, metrics = score_predictions([a["prediction"] for a in answers], references, use_stemmer=use_stemmer)
        cut = sum(a["hit_max_new_tokens"] for a in answers)
        entries[model["label"]] = {"path": model["path"], "metrics": metrics, "n": len(rows), "truncated": cut,
                                   "truncated_rate": cut / len(rows) if rows else 0.0}
        for record, answer, score in zip(per_row, answers, scores):
            record[model["label"]] = {**answer, "scores": score}
    examples = [{"prompt": last_user_turn(r["messages"]), "reference": r["reference"],
                 **{m["label"]: r[m["label"]]["prediction"] for m in models}} for r in per_row[:EXAMPLES]]
    return entries, per_row, examples
