"""data2vec pretraining with DeepSpeed ZeRO-3, megatron-core tensor parallelism and a sharded EMA teacher."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns at import time when Transformer Engine / Apex are absent; we do not use them.
_warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
