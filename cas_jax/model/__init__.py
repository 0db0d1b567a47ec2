"""The model: what cas_jax needs from a decoder and its own Llama-family one.

Holds the model config (`config`), the one contract every other part runs a model through
(`decoder.Decoder`, and the prefix's query start `decoder.num_prefix_tokens`), cas_jax's own
decoder (`llama`), reading and writing model weights (`weights`: HF safetensors, GGUF),
tokenizers and chat templates (`tokenizer`), loading a model by path (`loading`), the batched
sampler (`sampling`) and the one rendering of "document, then conversation" (`rendering`).

May import: nothing else of cas_jax (it is the bottom layer).
"""
