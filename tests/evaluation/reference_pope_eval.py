"""Reference for the tests only (never imported by the package): POPE's official scoring, re-implemented
step by step from LLaVA's ``llava/eval/eval_pope.py`` (haotian-liu/LLaVA @ 4241f08, itself the POPE
repo's ``evaluate.py``) with the file reading replaced by lists. Deliberately literal: same order of
operations, same string tests, same division (so it raises ZeroDivisionError where the original does).
"""


def eval_pope(answer_texts, label_list):
    answers = [{"text": t} for t in answer_texts]
    labels = list(label_list)
    for answer in answers:
        text = answer["text"]
        if text.find(".") != -1:  # the first sentence only
            text = text.split(".")[0]
        text = text.replace(",", "")
        words = text.split(" ")
        answer["text"] = "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    labels = [0 if label == "no" else 1 for label in labels]
    pred_list = [0 if a["text"] == "no" else 1 for a in answers]
    pos, neg = 1, 0
    yes_ratio = pred_list.count(1) / len(pred_list)
    tp = tn = fp = fn = 0
    for pred, label in zip(pred_list, labels):  # noqa: B905 (as the original)
        if pred == pos and label == pos:
            tp += 1
        elif pred == pos and label == neg:
            fp += 1
        elif pred == neg and label == neg:
            tn += 1
        elif pred == neg and label == pos:
            fn += 1
    precision = float(tp) / float(tp + fp)
    recall = float(tp) / float(tp + fn)
    f1 = 2 * precision * recall / (precision + recall)
    acc = (tp + tn) / (tp + tn + fp + fn)
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}
