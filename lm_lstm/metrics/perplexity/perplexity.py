"""Perplexity as an `evaluate` metric, with the interface of the Hub's `perplexity` metric.

Load it offline with `evaluate.load(lm_lstm.PERPLEXITY_METRIC)`; the computation is `lm_lstm.evaluation`'s.
"""

import datasets
import evaluate

from lm_lstm.evaluation import load_model_and_tokenizer, text_perplexities

_DESCRIPTION = """
Perplexity of a causal language model on each text: exp of the mean negative log-likelihood of the text's tokens,
each predicted from those before it. With `add_start_token=True` (the default) the token the model starts documents
from is prepended (EOS, which lm-lstm tokenizers also name as BOS), so the first token is predicted too. Texts are
scored in padded batches; lm-lstm models skip padding exactly.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the texts to score.
    model_id (`str`): a saved model folder (or Hub name) with its tokenizer.
    batch_size (`int`, defaults to 16): texts per forward pass.
    add_start_token (`bool`, defaults to True): prepend the document-start token (see above).
    device (`str`, optional): where to run, e.g. "cpu" or "cuda".
    max_length (`int`, optional): truncate each text to this many tokens (no truncation by default).
Returns:
    perplexities (`list[float]`): one per text.
    mean_perplexity (`float`): their mean.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, batch_size=16, add_start_token=True, device=None, max_length=None):
        model, tokenizer = load_model_and_tokenizer(model_id)
        if device is not None:
            model = model.to(device)
        perplexities = text_perplexities(model, tokenizer, predictions, batch_size, add_start_token, max_length)
        return {"perplexities": perplexities, "mean_perplexity": sum(perplexities) / len(perplexities)}
