from klora.tasks.span_extractor import SpanExtractor, SpanLoss
from klora.tasks.token_classifier import MaskedTokenCrossentropy, TokenClassifier
