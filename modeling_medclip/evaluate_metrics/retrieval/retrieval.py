"""Retrieval metrics with relevance by shared label (ConVIRT) as an `evaluate` module: Precision@k, Recall@k, MRR.

    import evaluate
    from modeling_medclip.metrics import evaluate_module_path

    metric = evaluate.load(evaluate_module_path("retrieval"))
    # two queries of classes 0 and 1, each ranking a gallery of three items labelled 0, 1, 1
    metric.compute(predictions=[[0, 1, 2], [0, 2, 1]], references=[0, 1], gallery_labels=[0, 1, 1], ks=[1, 2])

Computed by `modeling_medclip.metrics.retrieval_metrics` on `label_relevance`.
"""

import datasets
import evaluate

from modeling_medclip.metrics import label_relevance, retrieval_metrics

_DESCRIPTION = """Precision@k, Recall@k and mean reciprocal rank of rankings, a retrieved gallery item being relevant
when it shares the query's label (multi-class, the default config: equal class ids; config `multilabel`: 0/1 rows
sharing a positive class). Image->text, text->image and image->image retrieval all fit: the query and gallery labels
are those of the items on either side."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per query, the gallery indices it retrieved, best first (all queries
        rank the same number of items; with the whole gallery ranked, `mrr` is the full MRR, otherwise MRR@length).
    references: per query, its class id (multi-class) or 0/1 row (multi-label).
    gallery_labels: per gallery item, its class id or 0/1 row.
    ks (`list` of `int`, defaults to `[1, 5, 10, 50]`): cut-offs; those longer than the rankings are left out.
Returns:
    `precision@k` and `recall@k` for every usable `k`, and `mrr`.
"""

_CITATION = """@inproceedings{zhang2022convirt, title={Contrastive Learning of Medical Visual Representations from
Paired Images and Text}, author={Zhang, Yuhao and Jiang, Hang and Miura, Yasuhide and Manning, Christopher D. and
Langlotz, Curtis P.}, booktitle={Machine Learning for Healthcare}, year={2022}}"""

_CONFIGS = ("default", "multiclass", "multilabel")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
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
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")), "references": reference}),
        )

    def _compute(self, predictions, references, gallery_labels, ks=(1, 5, 10, 50)):
        relevant = label_relevance(references, gallery_labels)
        return retrieval_metrics(predictions, relevant, ks=ks)
