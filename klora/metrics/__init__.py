from klora.metrics.classification import classification_scores
from klora.metrics.cross_entropy import cross_entropy, span_cross_entropy
from klora.metrics.seqeval_f1 import entities, entity_scores
from klora.metrics.squad import (best_null_threshold, exact_match, f1_score, normalize_answer,
                                 squad_scores, squad_v2_scores)
