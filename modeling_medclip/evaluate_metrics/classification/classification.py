"""Classification metrics of class scores as an `evaluate` module: accuracy, macro-F1, per-class and macro ROC AUC.

    import evaluate
    from modeling_medclip.metrics import evaluate_module_path

    metric = evaluate.load(evaluate_module_path("classification"))               # multi-class
    metric.compute(prediction_scores=[[0.9, 0.1], [0.3, 0.7]], references=[0, 1])
    evaluate.load(evaluate_module_path("classification"), "multilabel")          # references: 0/1 rows

Computed by `modeling_medclip.metrics.classification_metrics` (scikit-learn underneath).
"""

import datasets
import evaluate

from modeling_medclip.metrics import classification_metrics

_DESCRIPTION = """Accuracy, macro-F1, and one-vs-rest ROC AUC per class and macro-averaged, of per-class scores
(zero-shot probabilities, linear-probe or fine-tuned classifier outputs). Multi-class (config `multiclass`, the
default): the decision is the argmax, references are class ids. Multi-label (config `multilabel`): the decision is
`score >= threshold` per class, references are 0/1 rows, accuracy is the fraction of correct decisions over all
entries."""

_KWARGS_DESCRIPTION = """
Args:
    prediction_scores (`list` of `list` of `float`): `(N, C)` class scores.
    references: multi-class: `(N,)` class ids; multi-label: `(N, C)` 0/1 rows.
    class_names (`list` of `str`, *optional*): the `C` class names, keys of `per_class_auc`.
    threshold (`float`, defaults to 0.5): multi-label decision threshold.
Returns:
    accuracy, macro_f1, macro_auc (mean over the classes whose AUC is defined), per_class_auc (`{class: auc}`, nan
    for a class without positives or negatives).
"""

_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython}, author={Pedregosa, F. and
others}, journal={Journal of Machine Learning Research}, volume={12}, pages={2825--2830}, year={2011}}"""

_CONFIGS = ("default", "multiclass", "multilabel")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        if self.config_name not in _CONFIGS:
            raise ValueError(f"config_name must be one of {_CONFIGS}, got {self.config_name!r}")
        reference = (
            datasets.Sequence(datasets.Value("int32")) if self.config_name == "multilabel" else datasets.Value("int32")
        )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"prediction_scores": datasets.Sequence(datasets.Value("float32")), "references": reference}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, prediction_scores, references, class_names=None, threshold=0.5):
        return classification_metrics(prediction_scores, references, class_names=class_names, threshold=threshold)
