"""Configuration of the LSTM language model.

This file is shipped with saved models as remote code: it imports nothing from `lm_lstm`.
"""

from transformers import PreTrainedConfig

_SIZE_FIELDS = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers")
_DROPOUT_FIELDS = ("embedding_dropout", "input_dropout", "hidden_dropout", "output_dropout", "weight_dropout")
_PENALTY_FIELDS = ("activation_regularization", "temporal_activation_regularization")
_FLOAT_FIELDS = _DROPOUT_FIELDS + _PENALTY_FIELDS + ("initializer_range",)
_SWITCH_FIELDS = ("tie_word_embeddings", "use_cache")
_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LSTMConfig(PreTrainedConfig):
    r"""
    Configuration of an [`LSTMForCausalLM`]: a stack of LSTM layers between a token embedding and a softmax
    output layer, regularised as in AWD-LSTM (Merity et al., 2017, "Regularizing and Optimizing LSTM Language
    Models"). The defaults reproduce the AWD-LSTM word-level Penn Treebank model.

    Args:
        vocab_size (`int`, *optional*, defaults to 10000):
            Number of tokens in the vocabulary.
        embedding_size (`int`, *optional*, defaults to 400):
            Size of the token embeddings; may differ from `hidden_size`.
        hidden_size (`int`, *optional*, defaults to 1150):
            Size of the hidden and cell states of every LSTM layer but the last. The last layer's size is
            `embedding_size` when `tie_word_embeddings` is set (so that its output feeds the tied softmax, as in
            AWD-LSTM), `hidden_size` otherwise.
        num_hidden_layers (`int`, *optional*, defaults to 3):
            Number of stacked LSTM layers.
        embedding_dropout (`float`, *optional*, defaults to 0.1):
            Probability of dropping a whole word type from the embedding matrix during training (every occurrence of
            a dropped token in the batch gets a zero embedding).
        input_dropout (`float`, *optional*, defaults to 0.65):
            Locked (variational) dropout on the embeddings fed to the first layer: one mask per sequence, reused at
            every time step.
        hidden_dropout (`float`, *optional*, defaults to 0.3):
            Locked dropout between LSTM layers.
        output_dropout (`float`, *optional*, defaults to 0.4):
            Locked dropout on the output of the last LSTM layer, before the softmax.
        weight_dropout (`float`, *optional*, defaults to 0.5):
            DropConnect on the hidden-to-hidden weight matrices: one mask per forward pass, shared by all time steps.
        activation_regularization (`float`, *optional*, defaults to 0.0):
            AR: in training, this coefficient times the mean square of the last layer's dropped-out output is added
            to the loss (AWD-LSTM uses 2.0).
        temporal_activation_regularization (`float`, *optional*, defaults to 0.0):
            TAR: in training, this coefficient times the mean square of the change of the last layer's output from
            one time step to the next (before dropout) is added to the loss (AWD-LSTM uses 1.0).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Share the weights of the input embedding and the output layer.
        initializer_range (`float`, *optional*, defaults to 0.1):
            Half-width of the uniform distribution used to initialise the embedding and output weights.
        pad_token_id (`int`, *optional*):
            Id of the padding token.
        bos_token_id (`int`, *optional*):
            Id of the beginning-of-sequence token.
        eos_token_id (`int`, *optional*):
            Id of the end-of-sequence token.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether the model returns its recurrent state (`cache`) for fast generation.

    Every `validate_*` method runs at construction and in `save_pretrained`, and raises a `ValueError` naming the
    argument. Integers are accepted for the float fields (`input_dropout=0`) and stored as floats.

    Example:

    ```python
    >>> from lm_lstm import LSTMConfig, LSTMForCausalLM
    >>> config = LSTMConfig(vocab_size=65, embedding_size=128, hidden_size=512, num_hidden_layers=2)
    >>> model = LSTMForCausalLM(config)
    ```
    """

    model_type = "lstm"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 10000
    embedding_size: int = 400
    hidden_size: int = 1150
    num_hidden_layers: int = 3
    embedding_dropout: float = 0.1
    input_dropout: float = 0.65
    hidden_dropout: float = 0.3
    output_dropout: float = 0.4
    weight_dropout: float = 0.5
    activation_regularization: float = 0.0
    temporal_activation_regularization: float = 0.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.1
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate()
        for name in _FLOAT_FIELDS:
            setattr(self, name, float(getattr(self, name)))

    def validate(self) -> None:
        """Runs every `validate_*` method, transformers' and this config's.

        Replaces the one `@strict` would add: that one wraps each `ValueError` in its own exception type, and its type
        checks refuse an integer for a float field.
        """
        for name in dir(self):
            if name.startswith("validate_"):
                getattr(self, name)()

    def validate_sizes(self) -> None:
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")

    def validate_dropouts(self) -> None:
        for name in _DROPOUT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")

    def validate_penalties(self) -> None:
        for name in _PENALTY_FIELDS:
            value = getattr(self, name)
            if not _is_number(value) or not value >= 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")

    def validate_initializer_range(self) -> None:
        if not _is_number(self.initializer_range) or not self.initializer_range > 0:
            raise ValueError(f"`initializer_range` must be a number > 0, got {self.initializer_range!r}.")

    def validate_switches(self) -> None:
        for name in _SWITCH_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")

    def validate_architecture(self) -> None:
        """Overrides transformers' check (attention heads), which has nothing to check here."""
        if self.tie_word_embeddings and self.num_hidden_layers == 1 and self.hidden_size != self.embedding_size:
            raise ValueError(
                "`tie_word_embeddings=True` with a single layer needs `hidden_size == embedding_size` (the last layer's "
                f"output feeds the tied output layer), got hidden_size={self.hidden_size} and "
                f"embedding_size={self.embedding_size}. Use more layers, equal sizes, or `tie_word_embeddings=False`."
            )

    def validate_token_ids(self) -> None:
        """Overrides transformers' check, which only warns: an id outside the vocabulary fails later, inside a kernel."""
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.vocab_size
            ):
                raise ValueError(f"`{name}` must be None or an id in [0, vocab_size={self.vocab_size}), got {value!r}.")

    # Derived from the fields on every read rather than stored in `__post_init__`: a field changed later (as
    # `update_from_string` and `resize_token_embeddings` do) never leaves them stale, and config.json holds only fields.
    @property
    def layer_sizes(self) -> list[tuple[int, int]]:
        """(input size, hidden size) of each LSTM layer, bottom to top."""
        sizes = [self.hidden_size] * self.num_hidden_layers
        if self.tie_word_embeddings:
            sizes[-1] = self.embedding_size
        inputs = [self.embedding_size] + sizes[:-1]
        return list(zip(inputs, sizes))

    @property
    def output_size(self) -> int:
        """Size of the last layer's output, which feeds the output layer."""
        return self.layer_sizes[-1][1]

    @property
    def layer_types(self) -> list[str]:
        """Every layer keeps a recurrent state in transformers' cache (`LinearAttentionLayer`)."""
        return ["linear_attention"] * self.num_hidden_layers

    @property
    def number_of_conv_states(self) -> int:
        """State slots per cache layer: the hidden state h (slot 0) and the cell state c (slot 1)."""
        return 2


__all__ = ["LSTMConfig"]
