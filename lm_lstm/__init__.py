"""lm-lstm: the LSTM language model as a first-class Hugging Face `transformers` model.

Importing the package registers `LSTMConfig` and the LSTM models with the Auto classes, and marks them so that
`save_pretrained` writes `auto_map` and the model's code files (loadable with `trust_remote_code=True`).
"""

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_lstm import LSTMConfig
from .modeling_lstm import LSTMForCausalLM, LSTMModel, LSTMPreTrainedModel

__version__ = "0.1.0"

PERPLEXITY_METRIC = str(Path(__file__).with_name("metrics") / "perplexity")
"""The perplexity metric's folder, for `evaluate.load(lm_lstm.PERPLEXITY_METRIC)` (works offline)."""

AutoConfig.register(LSTMConfig.model_type, LSTMConfig, exist_ok=True)
AutoModel.register(LSTMConfig, LSTMModel, exist_ok=True)
AutoModelForCausalLM.register(LSTMConfig, LSTMForCausalLM, exist_ok=True)
LSTMConfig.register_for_auto_class()
LSTMModel.register_for_auto_class("AutoModel")
LSTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["PERPLEXITY_METRIC", "LSTMConfig", "LSTMForCausalLM", "LSTMModel", "LSTMPreTrainedModel", "__version__"]
