"""Inference: a model from a training checkpoint or an export, decoding, generation, evaluation, export.

Modules: load (checkpoint or export dir -> ready model), deepspeed_checkpoint (which tag, consolidated
weights), client_state (model config and tokenizer the trainer stored), native (our export format),
tokenizer (checks), decoding / incremental / recurrent / kv_cache (incremental decoding), sampling, streaming,
generate, evaluate, lm_eval_adapter, export; cli holds the options the three CLIs share.
"""
