"""A model written in the style of a Hugging Face remote-code repository (a `config.json`
with an `auto_map`, a configuration and a modeling file loaded with
`trust_remote_code=True`), by forward-rewrite's tests. Not from any real repository."""

from transformers import PretrainedConfig


class AcmeConfig(PretrainedConfig):
    model_type = "acme"

    def __init__(
        self,
        vocab_size=160,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pretraining_tp=1,
        rms_norm_eps=1e-6,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.pretraining_tp = pretraining_tp
        self.rms_norm_eps = rms_norm_eps
        super().__init__(**kwargs)
