"""Evaluation: retrieval and classification metrics, feature extraction, and the tasks recipes list."""

from .classification import class_embeddings, classification_metrics, knn_classify, nearest_neighbour_predict
from .datasets import (evaluate_clip_benchmark_probe, evaluate_fewshot, evaluate_knn, evaluate_linear_probe,
                       evaluate_retrieval, evaluate_zeroshot, evaluate_zeroshot_sentences, read_class_folders)
from .features import embed_images, embed_texts
from .probe import (adamw_linear_probe, clip_benchmark_probe_rows, logistic_regression_probe, ridge_fewshot_probe,
                    ridge_regression)
from .retrieval import retrieval_metrics
from .sentence_pairs import finetune_sentence_pairs, read_sentence_pairs
from .shapes import evaluate_shapes, shapes_chance_levels
from .tasks import (ClipBenchmarkProbeEvalConfig, EvalTaskConfig, FewShotEvalConfig, KnnEvalConfig,
                    LinearProbeEvalConfig, RetrievalEvalConfig, SentencePairEvalConfig, SentenceZeroShotEvalConfig,
                    ShapesEvalConfig, ZeroShotEvalConfig)

__all__ = [
    "ClipBenchmarkProbeEvalConfig", "EvalTaskConfig", "FewShotEvalConfig", "KnnEvalConfig", "LinearProbeEvalConfig",
    "RetrievalEvalConfig", "SentencePairEvalConfig", "SentenceZeroShotEvalConfig", "ShapesEvalConfig",
    "ZeroShotEvalConfig",
    "adamw_linear_probe", "class_embeddings", "classification_metrics", "clip_benchmark_probe_rows", "embed_images",
    "embed_texts",
    "evaluate_clip_benchmark_probe", "evaluate_fewshot", "evaluate_knn", "evaluate_linear_probe",
    "evaluate_retrieval", "evaluate_shapes", "evaluate_zeroshot", "evaluate_zeroshot_sentences",
    "finetune_sentence_pairs", "knn_classify",
    "logistic_regression_probe", "nearest_neighbour_predict", "read_class_folders", "read_sentence_pairs",
    "retrieval_metrics", "ridge_fewshot_probe", "ridge_regression", "shapes_chance_levels",
]
