"""Accuracy, as an `evaluate` metric module kept in this repository.

`evaluate.load("accuracy")` fetches the module from the Hugging Face Hub, which an offline machine cannot reach;
`evaluate.load("examples/metrics/accuracy")` loads this file instead, with the same inputs and output.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the proportion of predictions equal to their reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, defaults to `True`): return the fraction correct; if `False`, the number correct.
    sample_weight (`list` of `float`, *optional*): per-sample weights.
Returns:
    accuracy (`float` or `int`): fraction (or count) of correct predictions.
Example:
    >>> metric = evaluate.load("examples/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions and references differ in shape: {predictions.shape} vs {references.shape}")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is not None:
            correct = correct * np.asarray(sample_weight, dtype=np.float64)
        total = correct.sum()
        if not normalize:
            return {"accuracy": float(total)}
        denominator = np.sum(sample_weight) if sample_weight is not None else len(correct)
        return {"accuracy": float(total / denominator) if denominator else 0.0}
