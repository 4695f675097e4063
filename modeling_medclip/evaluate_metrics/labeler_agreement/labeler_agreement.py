"""Agreement of report labels with reference labels in the CheXpert CSV convention, as an `evaluate` module.

    import evaluate
    from modeling_medclip.metrics import evaluate_module_path

    metric = evaluate.load(evaluate_module_path("labeler_agreement"))
    # two reports, two classes; None is a blank cell (not mentioned)
    metric.compute(predictions=[[1.0, None], [0.0, -1.0]], references=[[1.0, 0.0], [0.0, -1.0]], class_names=["a", "b"])

Computed by `modeling_medclip.metrics.labeler_agreement` (scikit-learn underneath).
"""

import datasets
import evaluate

from modeling_medclip.metrics import labeler_agreement

_DESCRIPTION = """Per class and micro-averaged precision, recall and F1 of a labeler's positive (1.0), negative (0.0)
and uncertain (-1.0) labels against a reference labeler's, the CheXpert labeler's CSV convention (a blank cell, not
mentioned, is given as None or nan). For value v a cell is a true positive when both say v."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float` or None): `(N, C)` labels of the labeler scored.
    references (`list` of `list` of `float` or None): `(N, C)` reference labels.
    class_names (`list` of `str`, *optional*): the `C` column names.
    micro_classes (`list` of `str`, *optional*): the columns the micro average pools (default all; CheXpert's own
        scoring leaves `No Finding` out).
Returns:
    `{"per_class": {class: {"positive" | "negative" | "uncertain": {precision, recall, f1, support}}},
    "micro": {value: {...}}}`.
"""

_CITATION = """@inproceedings{irvin2019chexpert, title={CheXpert: A Large Chest Radiograph Dataset with Uncertainty
Labels and Expert Comparison}, author={Irvin, Jeremy and others}, booktitle={AAAI}, year={2019}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LabelerAgreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
            reference_urls=["https://github.com/stanfordmlgroup/chexpert-labeler"],
        )

    def _compute(self, predictions, references, class_names=None, micro_classes=None):
        return labeler_agreement(predictions, references, class_names=class_names, micro_classes=micro_classes)
